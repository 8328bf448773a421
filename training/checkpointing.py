"""Training checkpoints of the distillation run: `accelerator.save_state` plus the loop's own state, written so that
an interrupted save is never resumed from, pruned to a retention limit.

`RUN_DIR/checkpoints/checkpoint-<step>/` holds Accelerate's files (model, optimizer, scheduler, one RNG file per
process), `trainer_state.json` (step, epoch, totals), `data_position_rank<r>.json` (each process's place in its
stream) and, written last, the `COMPLETED` marker. A checkpoint is first written under a hidden temporary name and
renamed only once complete; `latest` only considers folders with the marker. Pruning removes the marker before the
files, so a kill mid-prune never leaves a half-deleted folder that claims to be complete; such leftovers (unmarked
`checkpoint-*` and `.tmp-*` folders) are removed at start-up and after every save. Every process must call the save
and load functions (they contain collectives), on a file system all processes share; a save that fails on any
process fails on all of them (`training/collectives.py`).

`trainer_state.json` also records the run's identity (`RUN_IDENTITY_KEY`): the arguments and launch settings that
determine what the run computes, so that a resume can refuse to continue a different run (`identity_differences`).
"""

import json
import os
import re
import shutil
import sys
from pathlib import Path

from training.collectives import FailedOnEveryProcess, failure_of, first_failure

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STAGING_PREFIX = ".tmp-"
COMPLETED_MARKER = "COMPLETED"
TRAINER_STATE = "trainer_state.json"
RUN_IDENTITY_KEY = "run_identity"


class CheckpointSaveError(FailedOnEveryProcess):
    """A checkpoint could not be written on some process (e.g. the disk is full); it was not marked complete. Raised on
    every process."""


def write_file_atomically(path: Path, text: str) -> None:
    """Replace `path`'s contents with `text` in one step: a kill leaves the old file or the new one, never a part."""
    path = Path(path)
    staging = path.with_name(f".tmp-{path.name}")
    staging.write_text(text)
    os.replace(staging, path)


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def completed_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Completed checkpoints, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in checkpoints_dir.iterdir()
        if (match := CHECKPOINT_PATTERN.match(path.name)) and (path / COMPLETED_MARKER).exists()
    ]
    return [path for _, path in sorted(found)]


def resolve_resume(resume: str | None, checkpoints_dir: Path) -> Path | None:
    """`latest` -> the newest completed checkpoint (None if there is none yet); a path -> that checkpoint.

    Raises ValueError for a path that is not a completed checkpoint.
    """
    if resume is None:
        return None
    if resume == "latest":
        completed = completed_checkpoints(checkpoints_dir)
        return completed[-1] if completed else None
    path = Path(resume)
    if not (path / COMPLETED_MARKER).exists():
        raise ValueError(
            f"--resume_from_checkpoint {resume!r} is not a completed checkpoint folder (no {COMPLETED_MARKER} file); "
            f"pass a RUN_DIR/checkpoints/checkpoint-<step> folder or 'latest'."
        )
    return path


def _data_position_file(rank: int) -> str:
    return f"data_position_rank{rank}.json"


def save_checkpoint(
    accelerator, checkpoints_dir: Path, step: int, trainer_state: dict, data_position: dict, total_limit: int | None
) -> Path:
    """Save a complete checkpoint of `step` (call on every process).

    Raises `CheckpointSaveError` naming the fix, on every process, when the files cannot be written on any one of
    them (disk full, quota, permissions): each stage ends with one collective at which all processes learn whether
    any failed (`first_failure`), so none is left waiting at a barrier. The partial copy stays unmarked under its
    temporary name and is removed at the next start.
    """
    final = checkpoints_dir / checkpoint_name(step)
    staging = checkpoints_dir / f"{STAGING_PREFIX}{checkpoint_name(step)}"
    stages = (
        lambda: _prepare_staging(accelerator, staging),
        lambda: _write_process_files(accelerator, staging, data_position),
        # Only once every process's files are written: the marker, then the rename (the main process's part).
        lambda: _complete(accelerator, staging, final, trainer_state, step, total_limit),
    )
    for stage in stages:
        failure = first_failure(accelerator, failure_of(stage))
        if failure:
            raise CheckpointSaveError(_save_failure_message(failure, final, checkpoints_dir))
    return final


def _prepare_staging(accelerator, staging: Path) -> None:
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left over by an interrupted save
        staging.mkdir(parents=True)


def _write_process_files(accelerator, staging: Path, data_position: dict) -> None:
    accelerator.save_state(str(staging))
    (staging / _data_position_file(accelerator.process_index)).write_text(json.dumps(data_position))


def _complete(accelerator, staging: Path, final: Path, trainer_state: dict, step: int, total_limit: int | None):
    if not accelerator.is_main_process:
        return
    (staging / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
    (staging / COMPLETED_MARKER).write_text(f"{step}\n")  # last: only a complete copy is ever marked
    remove_checkpoint(final)  # an older save of the same step (after resuming further back)
    staging.rename(final)
    # The checkpoint is complete from here on: a failed clean-up of older ones must not report it as unsaved.
    cleanup_error = failure_of(lambda: (prune_checkpoints(final.parent, total_limit), remove_orphans(final.parent)))
    if cleanup_error:
        print(f"warning: saved {final.name}, but could not remove older checkpoints in {final.parent} "
              f"({cleanup_error}); remove them by hand.", file=sys.stderr)


def _save_failure_message(cause: str, final: Path, checkpoints_dir: Path) -> str:
    completed = completed_checkpoints(checkpoints_dir)
    fallback = f"the newest complete one is {completed[-1].name}" if completed else "there is no complete one yet"
    return (f"Could not save {final.name} in {checkpoints_dir} ({cause}); it was not marked complete and "
            f"{fallback}. Free space (or lower --checkpoints_total_limit, or choose another --output_dir), then "
            f"relaunch with --resume_from_checkpoint latest.")


def prune_checkpoints(checkpoints_dir: Path, total_limit: int | None) -> None:
    """Keep the newest `total_limit` completed checkpoints (all when None)."""
    completed = completed_checkpoints(checkpoints_dir)
    if total_limit is None or len(completed) <= total_limit:
        return
    for path in completed[: len(completed) - total_limit]:
        remove_checkpoint(path)


def remove_checkpoint(path: Path) -> None:
    """Unmark, then delete: a kill in between leaves an unmarked folder (an orphan), never a marked partial one."""
    (path / COMPLETED_MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def orphans(checkpoints_dir: Path) -> list[Path]:
    """Folders no resume can use: unmarked `checkpoint-*` (interrupted prunes) and `.tmp-*` (interrupted saves)."""
    if not checkpoints_dir.is_dir():
        return []
    return sorted(
        path
        for path in checkpoints_dir.iterdir()
        if path.is_dir()
        and (path.name.startswith(STAGING_PREFIX)
             or (CHECKPOINT_PATTERN.match(path.name) and not (path / COMPLETED_MARKER).exists()))
    )


def remove_orphans(checkpoints_dir: Path) -> list[Path]:
    """Delete `orphans(checkpoints_dir)` (main process only, while no save is in progress); returns them."""
    found = orphans(checkpoints_dir)
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return found


def load_checkpoint(accelerator, path: Path) -> tuple[dict, dict]:
    """Restore model, optimizer, scheduler and RNG states; return (trainer state, this process's data position)."""
    data_position_path = path / _data_position_file(accelerator.process_index)
    if not data_position_path.exists():
        raise ValueError(
            f"{path} holds no data position for process {accelerator.process_index}: it was saved with fewer "
            f"processes; resume with the same number of processes."
        )
    accelerator.load_state(str(path))
    return read_trainer_state(path), json.loads(data_position_path.read_text())


def read_trainer_state(path: Path) -> dict:
    return json.loads((Path(path) / TRAINER_STATE).read_text())


def identity_differences(saved: dict, current: dict) -> dict[str, tuple]:
    """{key: (saved value, current value)} for every key whose value differs between two run identities."""
    return {
        key: (saved.get(key), current.get(key))
        for key in sorted(set(saved) | set(current))
        if _comparable(saved.get(key)) != _comparable(current.get(key))
    }


def _comparable(value):
    # JSON turns tuples into lists; compare what a round trip through trainer_state.json would give.
    return json.loads(json.dumps(value))
