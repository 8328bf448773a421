"""Which run a RUN_DIR and its checkpoints belong to (training/distill.py).

A run's identity is every setting that changes what it computes: all flags except `RESUMABLE_CHANGES`, plus the
number of processes and the effective precision. It is stored in each checkpoint's `trainer_state.json` and in
`training_args.json`. A fresh run refuses a RUN_DIR holding another run's outputs (unless `--overwrite_output_dir`,
which deletes the run outputs only), and a resume refuses a checkpoint whose identity differs, naming the settings.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

from accelerate import Accelerator

from training.checkpointing import RUN_IDENTITY_KEY, identity_differences, read_trainer_state, remove_orphans


# Flags that may change when a run is resumed: they decide how the run is watched, saved or stopped, not what it
# computes. Every other flag, the number of processes and the effective precision identify the run (the dataloader
# workers too: the data order and the saved stream positions depend on them).
RESUMABLE_CHANGES = (
    "config", "make_tiny_assets", "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "logging_steps",
    "checkpointing_steps", "checkpoints_total_limit", "stop_after_steps", "report_to", "log_image_hashes",
    "on_nonfinite",
    # how the same computation is executed: compiled kernels round differently at most, as other kernels would
    "compile", "compile_backend",
    # what is evaluated along the way (training/evaluation.py): measured, never part of what the run computes
    "eval_every", "eval_benchmarks", "eval_region_benchmarks", "eval_max_images", "eval_text_model", "eval_keep_best",
)
# What the launcher decides, with how to set it when it differs.
LAUNCH_SETTINGS = {
    "num_processes": "processes (relaunch with `accelerate launch --num_processes {saved}`: the schedule, the "
                     "learning-rate scaling and each process's data shard depend on it)",
    "mixed_precision": "precision (relaunch with `accelerate launch --mixed_precision {saved}` or pass "
                       "--mixed_precision {saved})",
}
RUN_OUTPUTS = ("model", "checkpoints", "logs.jsonl", "training_args.json", "tensorboard", "debug", "best_model")


def run_identity(args: argparse.Namespace, accelerator: Accelerator) -> dict:
    """The settings that determine what the run computes (stored in checkpoints and training_args.json)."""
    identity = {key: value for key, value in vars(args).items() if key not in RESUMABLE_CHANGES}
    identity.update(num_processes=accelerator.num_processes, mixed_precision=accelerator.mixed_precision)
    return identity


def resumable_args(args: argparse.Namespace) -> dict:
    return {key: getattr(args, key) for key in RESUMABLE_CHANGES}


def claim_output_dir(args: argparse.Namespace, resume_path: Path | None, accelerator: Accelerator) -> dict:
    """Check that RUN_DIR and the resumed checkpoint belong to this run (ValueError naming the differing settings
    otherwise), then prepare RUN_DIR; returns the run's identity. Runs before any model is built."""
    identity = run_identity(args, accelerator)
    run_dir = Path(args.output_dir)
    if resume_path is not None:
        check_resume_matches(resume_path, identity, args, accelerator.is_main_process)
    if resume_path is None or resume_path.resolve().parent != (run_dir / "checkpoints").resolve():
        # a fresh start, or a checkpoint from elsewhere continued here: RUN_DIR must not hold a different run
        check_output_dir_free(run_dir, identity, args, resuming=resume_path is not None)
    accelerator.wait_for_everyone()  # every process has checked before the main one deletes anything
    if accelerator.is_main_process:
        prepare_run_dir(run_dir, args, resuming=resume_path is not None)
    accelerator.wait_for_everyone()
    return identity


def check_resume_matches(resume_path: Path, identity: dict, args: argparse.Namespace, report: bool) -> None:
    state = read_trainer_state(resume_path)
    saved = state.get(RUN_IDENTITY_KEY)
    if saved is None:
        if report:
            print(f"Warning: {resume_path} predates recorded run settings; it cannot be checked that this launch "
                  f"continues the same run.", file=sys.stderr)
        return
    differences = identity_differences(saved, identity)
    if differences:
        raise ValueError(f"{resume_path} was saved by a run with other settings, and resuming it would mix two "
                         f"runs: {_describe_differences(differences)}. Resume with the checkpoint's settings, or "
                         f"start a new run in another --output_dir (or with --overwrite_output_dir). Only "
                         f"{', '.join('--' + key for key in RESUMABLE_CHANGES)} may change on resume.")
    changed = identity_differences(state.get("resumable_args", {}), resumable_args(args))
    changed = {key: values for key, values in changed.items() if key not in ("resume_from_checkpoint", "config")}
    if changed and report:
        print(f"Resuming with changed {_describe_differences(changed)} (these may change on resume).")


def _describe_differences(differences: dict[str, tuple], where: str = "in the checkpoint") -> str:
    lines = []
    for key, (saved, current) in differences.items():
        label = LAUNCH_SETTINGS.get(key, "--" + key).format(saved=saved)
        lines.append(f"{label}: {saved!r} {where}, {current!r} now")
    return "; ".join(lines)


def check_output_dir_free(run_dir: Path, identity: dict, args: argparse.Namespace, resuming: bool) -> None:
    """A run may only write into a folder without another run's outputs (or with --overwrite_output_dir)."""
    outputs = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not outputs or args.overwrite_output_dir:
        return
    recorded = _recorded_identity(run_dir)
    differences = identity_differences(recorded, identity) if recorded is not None else None
    if differences == {} and (resuming or args.resume_from_checkpoint == "latest"):
        return  # the same run: continued from a copied checkpoint, or killed before its first checkpoint
    owner = "an earlier run with the same settings" if differences == {} else "another run"
    detail = f" ({_describe_differences(differences, 'recorded there')})" if differences else ""
    raise ValueError(f"--output_dir {str(run_dir)!r} already holds {', '.join(outputs)} of {owner}{detail}. "
                     f"Continue it with --resume_from_checkpoint latest (and its settings), choose a new "
                     f"--output_dir, or pass --overwrite_output_dir to delete those outputs.")


def _recorded_identity(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "training_args.json").read_text()).get(RUN_IDENTITY_KEY)
    except (OSError, ValueError, AttributeError):
        return None


def prepare_run_dir(run_dir: Path, args: argparse.Namespace, resuming: bool) -> None:
    """Main process: clear RUN_DIR for --overwrite_output_dir (run outputs only, never other files), create it,
    and remove what interrupted saves and prunes left behind."""
    if args.overwrite_output_dir:
        for name in RUN_OUTPUTS:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resuming:
        shutil.rmtree(run_dir / "debug", ignore_errors=True)  # traces of an earlier run in the same folder
    removed = remove_orphans(run_dir / "checkpoints")
    if removed:
        print(f"Removed {len(removed)} incomplete checkpoint folder(s) left by an interrupted save or prune: "
              f"{', '.join(path.name for path in removed)}.", file=sys.stderr)
