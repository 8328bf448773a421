"""Training checkpoints of the distillation run: `accelerator.save_state` plus the loop's own state, written so that
an interrupted save is never resumed from, pruned to a retention limit.

`RUN_DIR/checkpoints/checkpoint-<step>/` holds Accelerate's files (model, optimizer, scheduler, one RNG file per
process), `trainer_state.json` (step, epoch, totals), `data_position_rank<r>.json` (each process's place in its
stream) and, written last, the `COMPLETED` marker. A checkpoint is first written under a hidden temporary name and
renamed only once complete; `latest` only considers folders with the marker. Every process must call these
functions (they contain barriers), on a file system all processes share.
"""

import json
import re
import shutil
from pathlib import Path

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
COMPLETED_MARKER = "COMPLETED"
TRAINER_STATE = "trainer_state.json"


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
    """Save a complete checkpoint of `step` (call on every process)."""
    final = checkpoints_dir / checkpoint_name(step)
    staging = checkpoints_dir / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left over by an interrupted save
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    (staging / _data_position_file(accelerator.process_index)).write_text(json.dumps(data_position))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staging / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        (staging / COMPLETED_MARKER).write_text(f"{step}\n")
        shutil.rmtree(final, ignore_errors=True)  # an older save of the same step (after resuming further back)
        staging.rename(final)
        prune_checkpoints(checkpoints_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(checkpoints_dir: Path, total_limit: int | None) -> None:
    """Keep the newest `total_limit` completed checkpoints (all when None)."""
    completed = completed_checkpoints(checkpoints_dir)
    if total_limit is None or len(completed) <= total_limit:
        return
    for path in completed[: len(completed) - total_limit]:
        shutil.rmtree(path)


def load_checkpoint(accelerator, path: Path) -> tuple[dict, dict]:
    """Restore model, optimizer, scheduler and RNG states; return (trainer state, this process's data position)."""
    data_position_path = path / _data_position_file(accelerator.process_index)
    if not data_position_path.exists():
        raise ValueError(
            f"{path} holds no data position for process {accelerator.process_index}: it was saved with fewer "
            f"processes; resume with the same number of processes."
        )
    accelerator.load_state(str(path))
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    return trainer_state, json.loads(data_position_path.read_text())
