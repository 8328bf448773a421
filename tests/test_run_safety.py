"""Training-run safety of training/distill.py: one run per output folder, resumes that continue the same run,
non-finite losses, checkpoint pruning and logs that survive kills, early argument errors, and honest records.
Real entry points (`main([...])` in this process, `accelerate launch` for several processes) on tiny models."""

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from datasets import Dataset, Features, Image

from declip_hf import DeCLIPVisionModel
from training import distill
from training.checkpointing import (
    COMPLETED_MARKER,
    completed_checkpoints,
    orphans,
    prune_checkpoints,
    remove_orphans,
    write_file_atomically,
)
from training.collectives import first_failure
from training.progress import TrainingProgress, read_log_records, uneven_ranks_warning
from training.tiny_assets import bad_images, encode, synthetic_image, write_image_shards
from training.views import SKIP_REASONS

from tests.conftest import REPO_ROOT
from tests.test_distill import _launch
from tests.test_distill import _run_in_process as _run  # `main` in this process, Accelerate's singletons reset

STUDENT_SIZE = 64  # tiny CLIP patch 4 -> a 16 x 16 grid




def _fails(argv: list, capsys, exit_code: int) -> str:
    """Run and expect a one-line error with `exit_code`; returns the line."""
    with pytest.raises(SystemExit) as exit_info:
        _run(argv)
    assert exit_info.value.code == exit_code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("distill.py: error:")]
    assert len(lines) == 1 and "usage:" not in err, err
    return lines[0]


def _strict_json_lines(path: Path) -> list[dict]:
    """Parse like a strict JSON reader: NaN/Infinity are not JSON."""
    def refuse(constant):
        raise ValueError(f"non-JSON constant {constant} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("safety_images")
    write_image_shards(folder, num_images=14, num_shards=1, seed=3)  # 12 usable, 2 unusable
    return folder


def _common_argv(clip, dinov2, images, output_dir) -> list:
    return ["--student", clip, "--vfm", dinov2, "--dataset", images, "--student_size", STUDENT_SIZE,
            "--output_dir", output_dir, "--dataloader_num_workers", 0, "--report_to", "none", "--shuffle_buffer", 4,
            "--shuffle_input_shards", 1, "--lr_scaling", "none", "--warmup_steps", 1, "--logging_steps", 1,
            "--seed", 5]


TRAINING = ["--per_device_batch_size", 3, "--lr", 3e-3]


def _argv(clip, dinov2, images, output_dir, *extra) -> list:
    return _common_argv(clip, dinov2, images, output_dir) + TRAINING + list(extra)


# ------------------------------------------------------------------------------------------------ §2.1 output folders


def test_output_folder_belongs_to_one_run(tmp_path, tiny_clip_dir, tiny_dinov2_dir, shards, capsys):
    """The recipe YAML's `resume_from_checkpoint: latest`, relaunched after an edit, must not resume (or prune) the
    old run; a new run needs its own folder or --overwrite_output_dir."""
    run_dir = tmp_path / "run"
    config = tmp_path / "recipe.yaml"
    config.write_text("resume_from_checkpoint: latest\nmax_steps: 4\ncheckpointing_steps: 2\nlr: 3.0e-3\n"
                      "per_device_batch_size: 3\n")
    base = _common_argv(tiny_clip_dir, tiny_dinov2_dir, shards, run_dir)
    _run(["--config", config, *base])
    first_record = json.loads((run_dir / "training_args.json").read_text())
    assert first_record["run_identity"]["lr"] == 3e-3 and first_record["run_identity"]["num_processes"] == 1
    capsys.readouterr()

    config.write_text("resume_from_checkpoint: latest\nmax_steps: 4\ncheckpointing_steps: 2\nlr: 1.0e-3\n"
                      "per_device_batch_size: 2\n")
    line = _fails(["--config", config, *base], capsys, exit_code=2)
    assert "--lr: 0.003 in the checkpoint, 0.001 now" in line and "--per_device_batch_size: 3" in line
    assert "--logging_steps" in line  # what may change is listed
    # The old run is intact: its checkpoints are neither pruned nor overwritten.
    assert [path.name for path in completed_checkpoints(run_dir / "checkpoints")] == ["checkpoint-2", "checkpoint-4"]

    # A fresh run (no resume) into the folder is refused too, even with identical settings.
    line = _fails(base + TRAINING + ["--max_steps", 4, "--checkpointing_steps", 2], capsys, exit_code=2)
    assert "already holds" in line and "an earlier run with the same settings" in line
    assert "--resume_from_checkpoint latest" in line and "--overwrite_output_dir" in line

    # Changing only what may change on resume is accepted, and said.
    _run(["--config", config, *base, *TRAINING, "--logging_steps", 2, "--checkpoints_total_limit", 1])
    out = capsys.readouterr().out
    assert "Resuming from checkpoint-4" in out and "Resuming with changed" in out
    assert "--logging_steps: 1 in the checkpoint, 2 now" in out

    # A checkpoint continued in another folder: that folder must not hold a different run either.
    other = tmp_path / "other"
    other.mkdir()
    (other / "training_args.json").write_text(json.dumps({"run_identity": {"lr": 1.0}}))
    line = _fails(["--config", config, *base, *TRAINING, "--resume_from_checkpoint",
                   run_dir / "checkpoints" / "checkpoint-4", "--output_dir", other], capsys, exit_code=2)
    assert "already holds training_args.json of another run" in line

    # --overwrite_output_dir starts afresh: the old checkpoints are gone, the record is the new run's.
    (run_dir / "notes.txt").write_text("not a run output")
    _run(base + ["--max_steps", 2, "--lr", 1e-3, "--per_device_batch_size", 3, "--overwrite_output_dir"])
    assert not (run_dir / "checkpoints").exists()
    assert json.loads((run_dir / "training_args.json").read_text())["args"]["lr"] == 1e-3
    assert (run_dir / "notes.txt").exists()  # only run outputs are deleted


def test_same_run_restarts_when_killed_before_its_first_checkpoint(tmp_path, tiny_clip_dir, tiny_dinov2_dir, shards):
    run_dir = tmp_path / "run"
    argv = _argv(tiny_clip_dir, tiny_dinov2_dir, shards, run_dir, "--max_steps", 2, "--resume_from_checkpoint",
                 "latest")
    _run(argv)  # no checkpoints: as if killed before the first one, with training_args.json written at start
    summary = _run(argv)
    assert summary["steps"] == 2 and summary["finished"]


# ------------------------------------------------------------------------------------------------ §2.2 non-finite


def test_diverging_run_stops_without_saving_non_finite_weights(tmp_path, tiny_clip_dir, tiny_dinov2_dir, shards,
                                                                capsys):
    run_dir = tmp_path / "run"
    argv = _argv(tiny_clip_dir, tiny_dinov2_dir, shards, run_dir, "--max_steps", 6, "--lr", 1e30,
                 "--warmup_steps", 0, "--checkpointing_steps", 3)
    line = _fails(argv, capsys, exit_code=1)
    assert "Non-finite loss" in line and "--on_nonfinite skip" in line and "Lower --lr" in line
    assert not (run_dir / "model").exists()
    assert not completed_checkpoints(run_dir / "checkpoints")  # the diverged weights were not checkpointed
    records = _strict_json_lines(run_dir / "logs.jsonl")
    assert records[-1]["event"] == "error" and "Non-finite loss" in records[-1]["message"]


def test_skip_mode_drops_non_finite_updates(tmp_path, tiny_clip_dir, tiny_dinov2_dir, shards, monkeypatch, capsys):
    real_step, calls = distill.training_step, []

    def nan_on_second_call(*args, **kwargs):
        terms = real_step(*args, **kwargs)
        calls.append(1)
        return {name: value * float("nan") for name, value in terms.items()} if len(calls) == 2 else terms

    monkeypatch.setattr(distill, "training_step", nan_on_second_call)
    run_dir = tmp_path / "run"
    summary = _run(_argv(tiny_clip_dir, tiny_dinov2_dir, shards, run_dir, "--max_steps", 3, "--on_nonfinite", "skip"))
    assert summary["steps"] == 3 and summary["nonfinite_updates"] == 1
    assert "update skipped" in capsys.readouterr().err
    records = [record for record in _strict_json_lines(run_dir / "logs.jsonl") if "event" not in record]
    assert records[1]["loss/total"] is None and records[1]["nonfinite_updates"] == 1
    assert all(isinstance(record["loss/total"], float) for record in (records[0], records[2]))
    model = DeCLIPVisionModel.from_pretrained(run_dir / "model")
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())


def test_log_records_stay_json_with_non_finite_values(tmp_path):
    class OneProcess:
        device, is_main_process, num_processes = torch.device("cpu"), True, 1

        def reduce(self, tensor, reduction):
            return tensor

        def log(self, values, step):
            pass

    progress = TrainingProgress(OneProcess(), tmp_path / "logs.jsonl", total_steps=1, logging_steps=1)
    progress.add_micro_batch({name: torch.tensor(1.0) for name in ("content", "context", "total")}, 2,
                             torch.zeros(len(SKIP_REASONS), dtype=torch.long))
    progress.end_update(epoch=0, lr=float("nan"))
    progress.close()
    (record,) = _strict_json_lines(tmp_path / "logs.jsonl")
    assert record["lr"] == "nan"


# ------------------------------------------------------------------------------------------------ §3 crash safety


def _fake_checkpoint(folder: Path, step: int, completed: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    (path / "random_states_0.pkl").write_bytes(b"rng")
    if completed:
        (path / COMPLETED_MARKER).write_text(f"{step}\n")
    return path


def test_a_kill_during_pruning_never_leaves_a_marked_partial_checkpoint(tmp_path, monkeypatch):
    for step in (2, 4, 6):
        _fake_checkpoint(tmp_path, step)

    def killed_mid_delete(path, *args, **kwargs):
        (Path(path) / "model.safetensors").unlink()  # some files gone, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr("training.checkpointing.shutil.rmtree", killed_mid_delete)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoints(tmp_path, total_limit=2)
    monkeypatch.undo()
    # The half-deleted checkpoint-2 is no longer marked, so `latest` and the limit ignore it; it is an orphan.
    assert [path.name for path in completed_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    (tmp_path / ".tmp-checkpoint-8").mkdir()  # an interrupted save
    assert [path.name for path in orphans(tmp_path)] == [".tmp-checkpoint-8", "checkpoint-2"]
    remove_orphans(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6"]


def test_resume_survives_a_torn_log_line_and_cleans_orphans(tmp_path, tiny_clip_dir, tiny_dinov2_dir, shards,
                                                            capsys):
    run_dir = tmp_path / "run"
    argv = _argv(tiny_clip_dir, tiny_dinov2_dir, shards, run_dir, "--max_steps", 4, "--checkpointing_steps", 2)
    _run(argv + ["--stop_after_steps", 2])
    with (run_dir / "logs.jsonl").open("a") as log:
        log.write('{"step": 3, "loss/con')  # killed mid-write
    _fake_checkpoint(run_dir / "checkpoints", 3, completed=False)  # a prune killed after unmarking
    (run_dir / "checkpoints" / ".tmp-checkpoint-4").mkdir()  # a save killed before its rename
    capsys.readouterr()
    summary = _run(argv + ["--resume_from_checkpoint", "latest"])
    captured = capsys.readouterr()
    assert summary["steps"] == 4
    assert "dropped 1 unreadable line" in captured.err and "Removed 2 incomplete checkpoint folder" in captured.err
    records, torn = read_log_records(run_dir / "logs.jsonl")
    assert not torn and [record["step"] for record in records if "event" not in record] == [1, 2, 3, 4]
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_disk_full_while_saving_is_a_clear_error_and_leaves_no_marked_checkpoint(
        tmp_path, tiny_clip_dir, tiny_dinov2_dir, shards, monkeypatch, capsys):
    def disk_full(self, output_dir=None, **kwargs):
        Path(output_dir, "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", disk_full)
    run_dir = tmp_path / "run"
    line = _fails(_argv(tiny_clip_dir, tiny_dinov2_dir, shards, run_dir, "--max_steps", 4, "--checkpointing_steps",
                        2), capsys, exit_code=1)
    assert "Could not save checkpoint-2" in line and "the disk is full" in line and "not marked complete" in line
    assert not completed_checkpoints(run_dir / "checkpoints")


def test_a_failed_clean_up_of_older_checkpoints_keeps_the_new_one_complete(
        tmp_path, tiny_clip_dir, tiny_dinov2_dir, shards, monkeypatch, capsys):
    """Pruning runs after the rename: if it fails, the new checkpoint is complete and the run goes on, with a warning
    (before: the run stopped saying the complete checkpoint was not marked complete)."""
    from training import checkpointing

    def stuck(checkpoints_dir, total_limit):
        raise PermissionError(errno.EACCES, "Permission denied", str(checkpoints_dir))

    monkeypatch.setattr(checkpointing, "prune_checkpoints", stuck)
    run_dir = tmp_path / "run"
    result = _run(_argv(tiny_clip_dir, tiny_dinov2_dir, shards, run_dir, "--max_steps", 4, "--checkpointing_steps", 2))
    assert result["finished"]
    assert [path.name for path in completed_checkpoints(run_dir / "checkpoints")] == ["checkpoint-2", "checkpoint-4"]
    assert "warning: saved checkpoint-2, but could not remove older checkpoints" in capsys.readouterr().err


def test_first_failure_on_one_process_is_its_error_and_empty_when_none_failed():
    AcceleratorState._reset_state(True)
    try:
        accelerator = Accelerator(cpu=True)
        assert first_failure(accelerator, "") == ""
        assert first_failure(accelerator, "the disk is full") == "the disk is full"  # one process: no number
    finally:
        AcceleratorState._reset_state(True)  # no Accelerate singleton left for the tests that follow


# Runs in every launched process at start-up: the process of rank DISK_FULL_RANK cannot write its checkpoint files.
_DISK_FULL_SITECUSTOMIZE = """
import errno, os
if os.environ.get("RANK") == os.environ.get("DISK_FULL_RANK", "none"):
    from accelerate import Accelerator

    def disk_full(self, output_dir=None, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    Accelerator.save_state = disk_full
"""


def test_disk_full_on_one_of_two_processes_stops_both_with_one_error_line(tmp_path, tiny_clip_dir, tiny_dinov2_dir,
                                                                         shards, monkeypatch):
    """Process 1 (not the main one, which prints the errors) hits ENOSPC: both processes stop at the save's
    collective, the main one names the cause, and nothing is marked complete."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_DISK_FULL_SITECUSTOMIZE)
    monkeypatch.setenv("DISK_FULL_RANK", "1")
    run_dir = tmp_path / "run"
    argv = _argv(tiny_clip_dir, tiny_dinov2_dir, shards, run_dir, "--max_steps", 2, "--checkpointing_steps", 1,
                 "--per_device_batch_size", 2)
    result = _launch(argv, processes=2, port=29573, python_path=(hook,), timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-5000:]
    lines = [line for line in output.splitlines() if line.startswith("distill.py: error:")]
    assert len(lines) == 1, output[-5000:]
    assert "Could not save checkpoint-1" in lines[0] and "the disk is full; on process 1" in lines[0]
    assert "not marked complete" in lines[0]
    # Both processes ended by themselves with exit status 1 (the launcher killed neither).
    # Both processes stopped (within the timeout), each with a non-zero status: the launcher's summary lists both.
    statuses = dict(re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s*exitcode\s*: (-?\d+)", output))
    assert set(statuses) == {"0", "1"} and "0" not in statuses.values(), output[-3000:]
    assert not completed_checkpoints(run_dir / "checkpoints")
    assert not (run_dir / "checkpoints" / "checkpoint-1").exists()


def test_disk_full_while_saving_the_model_is_a_clear_error(tmp_path, tiny_clip_dir, tiny_dinov2_dir, shards,
                                                            monkeypatch, capsys):
    def disk_full(student, folder, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(distill, "save_model", disk_full)
    line = _fails(_argv(tiny_clip_dir, tiny_dinov2_dir, shards, tmp_path / "run", "--max_steps", 1), capsys, 1)
    assert "Could not save the model" in line and "(the disk is full)" in line and "Free space" in line


def test_any_error_while_saving_the_model_is_one_error_line(tmp_path, tiny_clip_dir, tiny_dinov2_dir, shards,
                                                            monkeypatch, capsys):
    """Not only disk errors: whatever the main process's save raises must reach the other processes as one error
    (before: anything but an OSError escaped on the main process alone, leaving the others at the gather)."""
    def broken_processor(student, folder, *args, **kwargs):
        raise ValueError("the image processor cannot be written")

    monkeypatch.setattr(distill, "save_model", broken_processor)
    line = _fails(_argv(tiny_clip_dir, tiny_dinov2_dir, shards, tmp_path / "run", "--max_steps", 1), capsys, 1)
    assert "Could not save the model" in line and "ValueError: the image processor cannot be written" in line


# ------------------------------------------------------------------------------------------------ §4 early errors


@pytest.mark.parametrize(
    "change, message",
    [
        (["--lr", 0], "--lr must be a finite number > 0"),
        (["--lr", "nan"], "--lr must be a finite number > 0"),
        (["--lr", "inf"], "--lr must be a finite number > 0"),
        (["--lr=-1e-5"], "--lr must be a finite number > 0"),
        (["--betas", 0.9, 1.0], "--betas must both be in [0, 1)"),
        (["--betas", -0.1, 0.9], "--betas must both be in [0, 1)"),
        (["--eps", 0], "--eps must be a finite number > 0"),
        (["--dataloader_num_workers", -1], "--dataloader_num_workers must be 0 or more"),
        (["--content_weight", -1], "--content_weight must be a finite number >= 0"),
        (["--context_weight", "nan"], "--context_weight must be a finite number >= 0"),
        (["--content_weight", 0, "--context_weight", 0], "are both 0"),
        (["--warmup_steps", -1], "--warmup_steps must be 0 or more"),
        (["--shuffle_buffer", -1], "--shuffle_buffer must be 0 or more"),
        (["--teacher_size", 0], "--teacher_size must be a positive integer"),
        (["--teacher_size", 30], "--teacher_size 30 is not a multiple of the student's patch size 4"),
        (["--report_to", "tensorbord"], "unknown tracker(s) ['tensorbord']"),
        (["--report_to", "wandb"], "wandb is not installed"),
        (["--student", "no/such/folder"], "no such folder, and not a Hub id"),
        (["--student", "./missing_model"], "no such folder, and not a Hub id"),
        (["--student", "EMPTY_FOLDER"], "is a folder without config.json"),
        (["--output_dir", "A_FILE"], "is a file"),
        (["--output_dir", "A_FILE/run"], "cannot be written"),
        (["--max_step", 3], "unrecognized arguments: --max_step"),
    ],
)
def test_bad_arguments_fail_before_any_model_naming_the_flag(change, message, tmp_path, tiny_clip_dir,
                                                             tiny_dinov2_dir, shards, monkeypatch, capsys):
    def no_models(*args, **kwargs):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(distill, "build_models", no_models)
    (tmp_path / "EMPTY_FOLDER").mkdir()
    (tmp_path / "A_FILE").write_text("x")
    change = [str(tmp_path / value) if value in ("EMPTY_FOLDER", "A_FILE", "A_FILE/run") else value
              for value in change]
    monkeypatch.chdir(tmp_path)
    line = _fails(_argv(tiny_clip_dir, tiny_dinov2_dir, shards, tmp_path / "run", "--max_steps", 2) + change, capsys,
                  exit_code=2)
    assert message in line


def test_unwritable_output_dir_is_refused(tmp_path, tiny_clip_dir, tiny_dinov2_dir, shards, monkeypatch, capsys):
    # The tests may run as root, for whom permission bits do not apply: the check itself is what is tested.
    real_access = os.access
    monkeypatch.setattr(distill.os, "access", lambda path, mode: False if Path(path) == tmp_path else
                        real_access(path, mode))
    line = _fails(_argv(tiny_clip_dir, tiny_dinov2_dir, shards, tmp_path / "run", "--max_steps", 2), capsys, 2)
    assert "--output_dir" in line and "cannot be written" in line


@pytest.mark.parametrize("text, kind", [("just a string\n", "str"), ("- lr\n- 1e-5\n", "list")])
def test_yaml_that_is_not_a_mapping_is_explained(text, kind, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        distill.parse_args(["--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "must map flag names to values" in err and f"holds a {kind}" in err and "usage:" not in err


def test_abbreviated_keys_are_refused_in_yaml_too(tmp_path, capsys):
    config = tmp_path / "abbrev.yaml"
    config.write_text("max_step: 3\n")
    with pytest.raises(SystemExit):
        distill.parse_args(["--config", str(config)])
    assert "Unknown keys ['max_step']" in capsys.readouterr().err


def test_help_shows_defaults():
    text = distill.build_parser().format_help()
    assert "(default: 1e-05)" in text and "(default: stop)" in text
    assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2" in text


def test_all_unusable_dataset_reports_skip_counts_and_logs_them(tmp_path, tiny_clip_dir, tiny_dinov2_dir, capsys):
    images = tmp_path / "bad_images"
    images.mkdir()
    cells = [{"bytes": data, "path": None} for data in bad_images() * 3]
    Dataset.from_dict({"image": cells}, features=Features({"image": Image()})).to_parquet(
        str(images / "train-00000-of-00001.parquet"))
    run_dir = tmp_path / "run"
    line = _fails(_argv(tiny_clip_dir, tiny_dinov2_dir, images, run_dir, "--max_steps", 2), capsys, exit_code=1)
    assert "Epoch 0 produced no update" in line and "rank 0: 0 usable" in line
    (record,) = _strict_json_lines(run_dir / "logs.jsonl")
    assert record["event"] == "error" and record["per_rank"][0]["usable"] == 0
    assert sum(record["per_rank"][0]["skipped"].values()) == 6


# ------------------------------------------------------------------------------------------------ §5 records


def test_record_holds_the_effective_precision_and_the_launcher_flags(tmp_path, tiny_clip_dir, tiny_dinov2_dir,
                                                                      shards, monkeypatch, capsys):
    # What `accelerate launch --mixed_precision bf16` (or an `accelerate config` file saying bf16) passes on.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    run_dir = tmp_path / "run"
    _run(_argv(tiny_clip_dir, tiny_dinov2_dir, shards, run_dir, "--max_steps", 1))
    record = json.loads((run_dir / "training_args.json").read_text())
    assert record["args"]["mixed_precision"] == "bf16" and record["launch"]["mixed_precision"] == "bf16"
    assert record["command"].startswith("accelerate launch --mixed_precision bf16 ")
    assert record["launch"]["num_processes"] == 1 and record["launch"]["accelerate_env"]["ACCELERATE_MIXED_PRECISION"]
    out = capsys.readouterr().out
    assert "Distilling on 1 process(es)" in out and "total batch 3" in out and "precision bf16" in out


# ------------------------------------------------------------------------------------------------ processes


def test_a_bad_flag_under_accelerate_launch_quiet_is_one_line(tmp_path, tiny_clip_dir, tiny_dinov2_dir):
    """What the README tells users: the script prints its error once; `accelerate launch -q` leaves out the
    launcher's own CalledProcessError traceback (single process)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--cpu", "--num_processes", "1",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "training/distill.py",
               "--student", str(tiny_clip_dir), "--vfm", str(tiny_dinov2_dir), "--dataset", str(tmp_path),
               "--output_dir", str(tmp_path / "run"), "--lr", "-1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == ["distill.py: error: --lr must be a finite number > 0, got -1.0 (the recipe: 1e-5 for a total "
                      "batch of 16)."], result.stderr
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr


def _uneven_shards(folder: Path) -> Path:
    """Two shards (one per process): shard 0 has 2 usable images and 8 unusable, shard 1 has 10 usable."""
    rng = np.random.default_rng(0)
    good = [encode(synthetic_image(index, rng)) for index in range(12)]
    shard_cells = [good[:2] + bad_images() * 4, good[2:]]
    folder.mkdir(parents=True)
    for shard, cells in enumerate(shard_cells):
        rows = [{"bytes": data, "path": None} for data in cells]
        Dataset.from_dict({"image": rows}, features=Features({"image": Image()})).to_parquet(
            str(folder / f"train-{shard:05d}-of-00002.parquet"))
    return folder


@pytest.fixture(scope="module")
def uneven_two_process_run(tmp_path_factory, tiny_clip_dir, tiny_dinov2_dir) -> tuple[Path, list, str]:
    root = tmp_path_factory.mktemp("uneven")
    images = _uneven_shards(root / "images")
    argv = ["--student", tiny_clip_dir, "--vfm", tiny_dinov2_dir, "--dataset", images, "--student_size",
            STUDENT_SIZE, "--output_dir", root / "run", "--dataloader_num_workers", 0, "--report_to", "none",
            "--shuffle_buffer", 0, "--shuffle_input_shards", 1, "--per_device_batch_size", 1, "--max_steps", 3,
            "--warmup_steps", 1, "--logging_steps", 1, "--checkpointing_steps", 3]
    result = _launch(argv, processes=2, port=29541)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return root / "run", argv, result.stderr


def test_uneven_shards_are_counted_per_process_and_warned_about(uneven_two_process_run):
    run_dir, _, stderr = uneven_two_process_run
    epochs = [record for record in _strict_json_lines(run_dir / "logs.jsonl") if record.get("event") == "epoch"]
    first = epochs[0]
    assert first["epoch"] == 0 and first["ended_by"] == "data"
    assert first["usable_per_rank"] == [2, 2]  # every process stops when rank 0 runs out
    assert first["skipped_per_rank"][0] == 8 and first["skipped_per_rank"][1] == 0
    assert first["ran_out_per_rank"] == [True, False]
    assert "rank 0: 2 usable of 10 read" in first["warning"] and "rank 0: 2 usable of 10 read" in stderr
    assert uneven_ranks_warning({"epoch": 0, "usable_per_rank": [5, 5], "skipped_per_rank": [1, 0]}) is None


def test_resuming_with_fewer_processes_is_refused(uneven_two_process_run, capsys):
    run_dir, argv, _ = uneven_two_process_run
    line = _fails(argv + ["--max_steps", 3, "--resume_from_checkpoint", "latest"], capsys, exit_code=2)
    assert "processes (relaunch with `accelerate launch --num_processes 2`" in line
    assert "2 in the checkpoint, 1 now" in line


def test_resuming_with_more_processes_is_refused(tmp_path, tiny_clip_dir, tiny_dinov2_dir, shards):
    run_dir = tmp_path / "run"
    argv = _argv(tiny_clip_dir, tiny_dinov2_dir, shards, run_dir, "--max_steps", 2, "--checkpointing_steps", 1)
    _run(argv)
    result = _launch(argv + ["--resume_from_checkpoint", "latest"], processes=2, port=29543)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("distill.py: error:")]
    assert len(errors) == 1, result.stderr[-3000:]  # printed once, not once per process
    assert "1 in the checkpoint, 2 now" in errors[0]


def test_processes_the_launcher_started_but_accelerate_did_not_join_are_refused(tmp_path, tiny_clip_dir,
                                                                                 tiny_dinov2_dir, shards):
    """`--multi_gpu --num_processes 2` on a machine without GPUs and without ACCELERATE_USE_CPU=1 starts two
    independent one-process runs."""
    run_dir = tmp_path / "run"
    result = _launch(_argv(tiny_clip_dir, tiny_dinov2_dir, shards, run_dir, "--max_steps", 1), processes=2,
                     port=29545, cpu=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("distill.py: error:")]
    assert errors and "WORLD_SIZE=2" in errors[0] and "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu" in errors[0]
    assert not (run_dir / "logs.jsonl").exists()


def test_log_and_record_rewrites_replace_the_file_whole(tmp_path, monkeypatch):
    """A kill while the log is trimmed on resume (or the run's record rewritten) leaves the old file, not a part."""
    path = tmp_path / "logs.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    write_file_atomically(path, '{"step": 1}\n')
    assert path.read_text() == '{"step": 1}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["logs.jsonl"]

    def killed(*args):
        raise KeyboardInterrupt  # stands in for the process dying between writing and replacing

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_file_atomically(path, "")
    assert path.read_text() == '{"step": 1}\n'
