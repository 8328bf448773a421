"""Evaluation while distilling (DeCLIP, CVPR 2025; docs/method.md §6): every `--eval_every` updates the main process
runs a small held-out evaluation of the student, as the authors' script does each epoch (`--zeroshot-frequency 1`).

The specs are those of `declip-evaluate` (built-in names or YAML files): segmentation benchmarks give
mIoU / aAcc / mAcc, region benchmarks box and mask thing / stuff mAcc, over the first `--eval_max_images` samples.
The student is evaluated in eval mode, as trained (before `--ensemble_alpha`), with the run's autocast, and the
text tower of `--eval_text_model` (default: `--student`). Results go to `logs.jsonl` (`"event": "eval"`) and to
the trackers (`eval/<benchmark>/<metric>`). With `--eval_keep_best METRIC` the model folder of the best evaluation
so far is written to RUN_DIR/best_model (exported like the final model, `--ensemble_alpha` included).

The other processes wait at a collective while the main process evaluates; its outcome reaches them there
(`training/collectives.py`, as for checkpoint saves), so an error in the evaluation stops every process instead of
leaving them waiting.
"""

import argparse
import contextlib
import json
import math
import shutil
import time
from pathlib import Path


from declip_hf.models.loading_utils import image_normalisation, quiet_transformers
from declip_hf.segmentation.benchmarks import get_region_benchmark, get_segmentation_benchmark
from declip_hf.segmentation.evaluate import evaluate_regions, evaluate_segmentation, load_split
from declip_hf.segmentation.segmenter import DeCLIPSegmenter, load_text_tower, text_tower_subfolder
from training.collectives import FailedOnEveryProcess, failure_of, first_failure
from training.export import save_model

EVAL_EVENT = "eval"
BEST_MODEL_DIR = "best_model"
BEST_RECORD = "best_eval.json"
SEGMENTATION_METRICS = ("mIoU", "aAcc", "mAcc")
REGION_METRICS = tuple(f"{kind}/{metric}" for kind in ("box", "mask") for metric in ("thing_mAcc", "stuff_mAcc"))


class EvaluationFailed(FailedOnEveryProcess):
    """The evaluation during training failed on the main process; every process stops."""


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--eval_every", type=int, help="Evaluate the student every N optimizer updates on the main process "
        "(default: never); see --eval_benchmarks.")
    add("--eval_benchmarks", default="", help="Comma-separated segmentation specs for --eval_every: built-in names "
        "(voc21, ...) or YAML spec paths, as `declip-evaluate --benchmarks`.")
    add("--eval_region_benchmarks", default="", help="Comma-separated region-classification specs for --eval_every "
        "(coco_panoptic or YAML paths).")
    add("--eval_max_images", type=int, default=100, help="Samples of each eval benchmark used (the first N).")
    add("--eval_text_model", help="Checkpoint holding the CLIP text tower for evaluation (default: --student).")
    add("--eval_keep_best", metavar="BENCHMARK/METRIC", help="Keep the model of the best evaluation in "
        "RUN_DIR/best_model, by this metric (higher is better), e.g. voc21/mIoU or coco_panoptic/box/thing_mAcc.")


def _names(value: str) -> list[str]:
    return [name.strip() for name in (value or "").split(",") if name.strip()]


def evaluation_specs(args: argparse.Namespace) -> tuple[list, list]:
    """(segmentation specs, region specs) of an evaluating run, checked (ValueError naming the fix); both empty when
    --eval_every is not set. Each spec's split must open."""
    segmentation, regions = _names(args.eval_benchmarks), _names(args.eval_region_benchmarks)
    if args.eval_every is None:
        if segmentation or regions or args.eval_keep_best:
            raise ValueError("--eval_benchmarks / --eval_region_benchmarks / --eval_keep_best need --eval_every N.")
        return [], []
    if args.eval_every <= 0 or args.eval_max_images <= 0:
        raise ValueError(f"--eval_every and --eval_max_images must be positive integers, got {args.eval_every} and "
                         f"{args.eval_max_images}.")
    if not segmentation and not regions:
        raise ValueError("--eval_every needs something to evaluate: --eval_benchmarks and/or "
                         "--eval_region_benchmarks (built-in names or YAML spec paths).")
    try:
        specs = [get_segmentation_benchmark(name) for name in segmentation], [get_region_benchmark(n) for n in regions]
        _check_keep_best(args.eval_keep_best, *specs)
        text_tower_subfolder(args.eval_text_model or args.student)  # e.g. a vision-only student needs the flag
        for spec in specs[0]:
            load_split(spec.path, spec.config_name, spec.split, spec.data_files, (spec.image_column, spec.label_column))
        for spec in specs[1]:
            load_split(spec.path, spec.config_name, spec.split, spec.data_files,
                       (spec.image_column, spec.panoptic_column, spec.segments_column))
    except (OSError, ValueError) as error:  # a missing YAML file or dataset, a bad spec
        raise ValueError(f"Evaluation during training (--eval_*): {error}") from error
    return specs


def _check_keep_best(metric: str | None, segmentation: list, regions: list) -> None:
    if metric is None:
        return
    valid = [f"{spec.name}/{name}" for spec in segmentation for name in SEGMENTATION_METRICS]
    valid += [f"{spec.name}/{name}" for spec in regions for name in REGION_METRICS]
    if metric not in valid:
        raise ValueError(f"--eval_keep_best {metric!r} is not a metric of the eval benchmarks; choose one of "
                         f"{', '.join(valid)}.")


def flat_metrics(segmentation_results: dict, region_results: dict) -> dict[str, float | None]:
    """{"voc21/mIoU": ..., "coco_panoptic/box/thing_mAcc": ...} from `declip-evaluate`'s result dicts."""
    metrics = {}
    for name, result in segmentation_results.items():
        metrics.update({f"{name}/{metric}": result[metric] for metric in SEGMENTATION_METRICS})
    for name, result in region_results.items():
        metrics.update({f"{name}/{kind_metric}": result[kind_metric.split("/")[0]][kind_metric.split("/")[1]]
                        for kind_metric in REGION_METRICS})
    return metrics


class TrainingEvaluator:
    """Runs the evaluation of `--eval_every` (call `after_update` on every process after each update)."""

    def __init__(self, args: argparse.Namespace, specs: tuple[list, list], accelerator, student, run_dir: Path,
                 resumed_step: int | None):
        self.args, self.accelerator, self.student = args, accelerator, student
        self.segmentation_specs, self.region_specs = specs
        self.best_dir = Path(run_dir) / BEST_MODEL_DIR
        self.best = self._read_best(resumed_step) if resumed_step is not None else None
        self.segmenter = None  # built at the first evaluation, where a failure reaches every process

    @property
    def enabled(self) -> bool:
        return bool(self.segmentation_specs or self.region_specs)

    def _build_segmenter(self) -> DeCLIPSegmenter:
        name = self.args.eval_text_model or self.args.student
        with quiet_transformers():
            text_model, tokenizer = load_text_tower(name)
        mean, std = image_normalisation(self.args.student)
        was_training = self.student.training
        # The segmenter puts its modules in eval mode; the student is shared with training, so its mode is restored.
        segmenter = DeCLIPSegmenter(self.student, text_model, tokenizer, mean, std).to(self.accelerator.device)
        self.student.train(was_training)
        return segmenter

    def _read_best(self, resumed_step: int) -> dict | None:
        """The kept best of the resumed run, if it still counts: measured with the metric now asked for (which may
        change on resume) and at or before the resumed checkpoint (a later one belongs to the abandoned part)."""
        try:
            best = json.loads((self.best_dir / BEST_RECORD).read_text())
        except (OSError, ValueError):
            return None
        still_counts = best.get("metric") == self.args.eval_keep_best and best.get("step", math.inf) <= resumed_step
        return best if still_counts else None

    def after_update(self, step: int, epoch: int, progress) -> None:
        """Evaluate at every `--eval_every`-th update: the main process measures, the others wait for its outcome."""
        if not self.enabled or step % self.args.eval_every:
            return
        error = ""
        if self.accelerator.is_main_process:
            # any failure must reach the waiting processes, not leave them hanging
            error = failure_of(lambda: self._evaluate_and_record(step, epoch, progress))
        failure = first_failure(self.accelerator, error)  # the others learn the main process's outcome here
        if failure:
            message = (f"The evaluation at update {step} failed ({failure}). Check the eval benchmark specs and data, "
                       f"then resume with --resume_from_checkpoint latest.")
            # Best effort: a full disk may be why it failed, and the error must still reach every process.
            with contextlib.suppress(OSError):
                progress.log_event("error", epoch=epoch, message=message)
            raise EvaluationFailed(message)

    def _evaluate_and_record(self, step: int, epoch: int, progress) -> None:
        started = time.monotonic()
        if self.segmenter is None:
            self.segmenter = self._build_segmenter()
        was_training = self.student.training
        self.student.eval()
        try:
            with self.accelerator.autocast():
                segmentation = {spec.name: evaluate_segmentation(self.segmenter, spec, self.args.eval_max_images)
                                for spec in self.segmentation_specs}
                regions = {spec.name: evaluate_regions(self.segmenter, spec, self.args.eval_max_images)
                           for spec in self.region_specs}
        finally:
            self.student.train(was_training)
        metrics = flat_metrics(segmentation, regions)
        num_images = {name: result["num_images"] for name, result in {**segmentation, **regions}.items()}
        progress.log_event(EVAL_EVENT, epoch=epoch, metrics=metrics, num_images=num_images,
                           seconds=round(time.monotonic() - started, 3))
        scalars = {f"eval/{key}": value for key, value in metrics.items() if isinstance(value, (int, float))}
        self.accelerator.log(scalars, step=step)
        self._keep_if_best(step, metrics)

    def _keep_if_best(self, step: int, metrics: dict) -> None:
        key = self.args.eval_keep_best
        value = metrics.get(key) if key else None
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        if self.best is not None and value <= self.best["value"]:
            return
        best = {"metric": key, "value": value, "step": step}
        # Written whole under a temporary name, then swapped in: a kill never leaves new weights beside an old record.
        staging, previous = self.best_dir.with_name(f".tmp-{BEST_MODEL_DIR}"), self.best_dir.with_name(
            f".old-{BEST_MODEL_DIR}")
        shutil.rmtree(staging, ignore_errors=True)
        with quiet_transformers():
            save_model(self.student, staging, self.args.student, self.args.ensemble_alpha, self.args.student_size)
        (staging / BEST_RECORD).write_text(json.dumps(best, indent=2) + "\n")
        shutil.rmtree(previous, ignore_errors=True)
        if self.best_dir.exists():
            self.best_dir.rename(previous)
        staging.rename(self.best_dir)
        shutil.rmtree(previous, ignore_errors=True)
        self.best = best
