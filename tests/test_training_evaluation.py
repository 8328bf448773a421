"""Evaluation during distillation (issue 11, training/evaluation.py): `--eval_every` in the tiny default run and in a
two-process run (no deadlock while the main process evaluates), keep-best, resume, and the start-up checks."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from datasets import Dataset, Features, Image as ImageFeature, List, Value
from PIL import Image

from declip_hf import DeCLIPVisionModel
from tests.test_distill import REPO_ROOT, _base_argv, _events, _launch, _logs, _run_in_process
from training import evaluation
from training.evaluation import BEST_MODEL_DIR, BEST_RECORD, TrainingEvaluator
from training.progress import _kept_after_resume
from training.run_folder import RESUMABLE_CHANGES
from training.tiny_assets import write_image_shards


@pytest.fixture(scope="module")
def eval_specs(tmp_path_factory) -> tuple[Path, Path]:
    """A 3-class segmentation spec and a 3-category region spec over a few generated images (YAML paths)."""
    folder = tmp_path_factory.mktemp("eval_data")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)) for _ in range(3)]
    labels = [Image.fromarray(rng.integers(0, 3, (20, 28)).astype(np.uint8)) for _ in range(3)]
    Dataset.from_dict({"image": images, "label": labels},
                      features=Features({"image": ImageFeature(), "label": ImageFeature()})
                      ).to_parquet(folder / "seg.parquet")
    segmentation = {"name": "toy", "path": "parquet", "data_files": {"validation": str(folder / "seg.parquet")},
                    "class_names": ["background", "cat", "dog"], "background_threshold": 0.3, "shorter_side": 24,
                    "window": 16, "stride": 8}
    (folder / "toy.yaml").write_text(yaml.safe_dump(segmentation))

    ids = np.zeros((40, 40), dtype=np.int64)
    ids[:, 20:] = 2
    ids[5:15, 5:15] = 3
    panoptic = Image.fromarray(np.stack([ids, ids * 0, ids * 0], axis=-1).astype(np.uint8))
    segments = [{"id": 2, "category_id": 90, "iscrowd": 0}, {"id": 3, "category_id": 1, "iscrowd": 0}]
    segment_feature = {"id": Value("int64"), "category_id": Value("int64"), "iscrowd": Value("int64")}
    features = Features({"image": ImageFeature(), "label": ImageFeature(), "segments_info": List(segment_feature)})
    Dataset.from_dict({"image": [images[0].resize((40, 40))], "label": [panoptic], "segments_info": [segments]},
                      features=features).to_parquet(folder / "regions.parquet")
    regions = {"name": "toy_regions", "path": "parquet",
               "data_files": {"validation": str(folder / "regions.parquet")}, "image_size": 32,
               "categories": [{"id": 1, "name": "cat", "isthing": True}, {"id": 2, "name": "dog", "isthing": True},
                              {"id": 90, "name": "sky", "isthing": False}]}
    (folder / "regions.yaml").write_text(yaml.safe_dump(regions))
    return folder / "toy.yaml", folder / "regions.yaml"


def test_eval_every_in_the_tiny_default_run_keeps_the_best(tmp_path, monkeypatch, eval_specs):
    segmentation, regions = eval_specs
    monkeypatch.chdir(tmp_path)
    summary = _run_in_process([
        "--config", REPO_ROOT / "configs" / "tiny.yaml", "--report_to", "none", "--max_steps", 6,
        "--warmup_steps", 1, "--checkpointing_steps", 3, "--checkpoints_total_limit", 2, "--eval_every", 3,
        "--eval_benchmarks", segmentation, "--eval_region_benchmarks", regions, "--eval_max_images", 2,
        "--eval_keep_best", "toy/mIoU"])
    assert summary["finished"]
    run_dir = tmp_path / "outputs" / "tiny"
    evals = _events(run_dir, "eval")
    assert [record["step"] for record in evals] == [3, 6]
    for record in evals:
        assert set(record["metrics"]) == {"toy/mIoU", "toy/aAcc", "toy/mAcc", "toy_regions/box/thing_mAcc",
                                          "toy_regions/box/stuff_mAcc", "toy_regions/mask/thing_mAcc",
                                          "toy_regions/mask/stuff_mAcc"}
        assert record["num_images"] == {"toy": 2, "toy_regions": 1}
    # The update records are untouched: one per logging step.
    assert [record["step"] for record in _logs(run_dir)] == [6]
    best = json.loads((run_dir / "best_model" / "best_eval.json").read_text())
    values = {record["step"]: record["metrics"]["toy/mIoU"] for record in evals}
    assert best["metric"] == "toy/mIoU" and best["value"] == max(values.values())
    assert best["step"] == min(step for step, value in values.items() if value == best["value"])  # ties keep the first
    assert DeCLIPVisionModel.from_pretrained(run_dir / "best_model").config.decoupled_attention == "qq"

    # Resuming from checkpoint-3 keeps the evaluation of step 3 (it ran before that checkpoint) and redoes step 6.
    _run_in_process([
        "--config", REPO_ROOT / "configs" / "tiny.yaml", "--report_to", "none", "--max_steps", 6,
        "--warmup_steps", 1, "--checkpointing_steps", 3, "--eval_every", 3, "--eval_benchmarks", segmentation,
        "--eval_max_images", 2, "--no-overwrite_output_dir", "--resume_from_checkpoint",
        run_dir / "checkpoints" / "checkpoint-3"])
    resumed = _events(run_dir, "eval")
    assert [record["step"] for record in resumed] == [3, 6]
    assert resumed[0] == evals[0] and "toy_regions/box/thing_mAcc" not in resumed[1]["metrics"]
    assert resumed[1]["metrics"]["toy/mIoU"] == evals[1]["metrics"]["toy/mIoU"]  # the same student, measured again


def test_eval_records_survive_a_resume_from_their_step():
    assert _kept_after_resume({"event": "eval", "step": 3}, 3)
    assert not _kept_after_resume({"event": "epoch", "step": 3}, 3)  # written after the checkpoint: redone
    assert _kept_after_resume({"step": 3, "loss/total": 1.0}, 3) and not _kept_after_resume({"step": 4}, 3)
    assert {flag for flag in RESUMABLE_CHANGES if flag.startswith("eval_")} == {
        "eval_every", "eval_benchmarks", "eval_region_benchmarks", "eval_max_images", "eval_text_model",
        "eval_keep_best"}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--eval_benchmarks", "voc21"], "need --eval_every"),
        (["--eval_every", 2], "needs something to evaluate"),
        (["--eval_every", 0, "--eval_benchmarks", "voc21"], "must be positive integers"),
        (["--eval_every", 2, "--eval_benchmarks", "nowhere.yaml"], "Evaluation during training"),
        (["--eval_every", 2, "--eval_benchmarks", "SEG", "--eval_keep_best", "toy/IoU"], "not a metric"),
        (["--eval_every", 2, "--eval_benchmarks", "SEG", "--eval_text_model", "DINO"], "holds no CLIP text tower"),
    ],
)
def test_bad_eval_flags_fail_at_start(extra, message, eval_specs, tiny_clip_dir, tiny_dinov2_dir, tmp_path,
                                      capsys):
    images = tmp_path / "images"
    write_image_shards(images, num_images=4, num_shards=1)
    extra = [{"SEG": str(eval_specs[0]), "DINO": str(tiny_dinov2_dir)}.get(value, value) for value in extra]
    with pytest.raises(SystemExit) as exit_info:
        _run_in_process(_base_argv(tiny_clip_dir, tiny_dinov2_dir, images, tmp_path / "run")
                        + ["--max_steps", 2, *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run" / "model").exists()


def test_a_failing_evaluation_stops_the_run_with_one_error(eval_specs, tiny_clip_dir, tiny_dinov2_dir, tmp_path,
                                                          monkeypatch, capsys):
    images = tmp_path / "images"
    write_image_shards(images, num_images=6, num_shards=1)

    def broken(*args, **kwargs):
        raise RuntimeError("the eval data went away")

    monkeypatch.setattr("training.evaluation.evaluate_segmentation", broken)
    with pytest.raises(SystemExit) as exit_info:
        _run_in_process(_base_argv(tiny_clip_dir, tiny_dinov2_dir, images, tmp_path / "run")
                        + ["--max_steps", 3, "--per_device_batch_size", 2, "--eval_every", 1,
                           "--eval_benchmarks", eval_specs[0]])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert "evaluation at update 1 failed (RuntimeError: the eval data went away)" in error
    assert _events(tmp_path / "run", "error")


def test_two_processes_evaluate_on_the_main_process_without_deadlock(tmp_path, tiny_clip_dir, tiny_dinov2_dir,
                                                                   eval_specs):
    images = tmp_path / "images"
    write_image_shards(images, num_images=12, num_shards=2)
    run_dir = tmp_path / "run"
    argv = _base_argv(tiny_clip_dir, tiny_dinov2_dir, images, run_dir) + [
        "--max_steps", 4, "--per_device_batch_size", 2, "--warmup_steps", 1, "--logging_steps", 2,
        "--eval_every", 2, "--eval_benchmarks", eval_specs[0], "--eval_max_images", 2]
    result = _launch(argv, processes=2, port=29533)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    evals = _events(run_dir, "eval")
    assert [record["step"] for record in evals] == [2, 4]  # once per evaluation: only the main process writes
    assert all(record["num_images"] == {"toy": 2} for record in evals)
    assert [record["step"] for record in _logs(run_dir)] == [2, 4]
    assert json.loads((run_dir / "training_args.json").read_text())["summary"]["steps"] == 4


def _evaluator(run_dir: Path, keep_best: str | None, resumed_step: int | None) -> TrainingEvaluator:
    args = argparse.Namespace(eval_keep_best=keep_best, student="unused", ensemble_alpha=1.0, student_size=32)
    return TrainingEvaluator(args, ([], []), accelerator=None, student=None, run_dir=run_dir,
                             resumed_step=resumed_step)


def test_a_resume_keeps_the_best_only_for_the_same_metric_and_an_earlier_step(tmp_path):
    (tmp_path / BEST_MODEL_DIR).mkdir()
    (tmp_path / BEST_MODEL_DIR / BEST_RECORD).write_text(json.dumps({"metric": "toy/mIoU", "value": 5.0, "step": 3}))
    assert _evaluator(tmp_path, "toy/mIoU", resumed_step=3).best == {"metric": "toy/mIoU", "value": 5.0, "step": 3}
    assert _evaluator(tmp_path, "toy/mIoU", resumed_step=None).best is None  # a fresh run
    assert _evaluator(tmp_path, "toy/mIoU", resumed_step=2).best is None  # kept after the resumed checkpoint
    assert _evaluator(tmp_path, "toy/aAcc", resumed_step=6).best is None  # another metric: not comparable


def test_a_failed_best_model_save_leaves_the_previous_best_whole(tmp_path, monkeypatch):
    best_dir = tmp_path / BEST_MODEL_DIR
    best_dir.mkdir()
    record = {"metric": "toy/mIoU", "value": 5.0, "step": 3}
    (best_dir / BEST_RECORD).write_text(json.dumps(record))
    (best_dir / "model.safetensors").write_text("previous weights")
    evaluator = _evaluator(tmp_path, "toy/mIoU", resumed_step=3)

    def save_half_then_fail(student, folder, *args):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "model.safetensors").write_text("half of the new weights")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluation, "save_model", save_half_then_fail)
    with pytest.raises(OSError):
        evaluator._keep_if_best(6, {"toy/mIoU": 9.0})
    assert json.loads((best_dir / BEST_RECORD).read_text()) == record
    assert (best_dir / "model.safetensors").read_text() == "previous weights"

    monkeypatch.setattr(evaluation, "save_model", lambda student, folder, *args: Path(folder).mkdir(parents=True))
    evaluator._keep_if_best(6, {"toy/mIoU": 9.0})
    assert json.loads((best_dir / BEST_RECORD).read_text()) == {"metric": "toy/mIoU", "value": 9.0, "step": 6}
    assert not (best_dir / "model.safetensors").exists() and sorted(path.name for path in tmp_path.iterdir()) == [
        BEST_MODEL_DIR]
