"""Evaluate a DeCLIP (or CLIP) checkpoint: training-free segmentation mIoU on the 8 benchmarks of DeCLIP (CVPR 2025,
docs/method.md §6) and region classification (box and mask) on COCO-panoptic-style data.

    declip-evaluate --model PATH_OR_ID --benchmarks voc21,context60 --output results.json

`--protocol declip|sclip|naclip|clearclip|proxyclip` gives the built-in benchmarks one project's published settings
(docs/method.md §6.7; `--pamr` adds NACLIP's refinement); region classification follows the DeCLIP authors' protocol
unless a spec says `protocol: area_weighted` (docs/method.md §6.6).

Bad input never turns into a silently wrong number:
- a label value outside the class list (other than the ignore index), or a segment with an unknown category:
  error, naming the sample (the spec's class list or label mapping is wrong, so every number would be);
- an image and label map of different sizes, or an undecodable image: the sample is skipped, warned about and
  counted under `skipped` in the results;
- a split with no usable sample: error;
- a NaN or inf score (e.g. a checkpoint with NaN weights), a spec whose stride exceeds its window or whose logit
  scale is not finite, repeated or shared class names: error, never a number.
Every error ends the command with one `error: ...` line and exit status 2; spec, flag, dataset-path and output
problems are found before the model loads, and a checkpoint lacking weights (or not a CLIP) is refused as it loads.
"""

import argparse
import contextlib
import dataclasses
import importlib.metadata
import io
import json
import logging
import math
import platform
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from datasets import Image as ImageFeature
from datasets import load_dataset
from PIL import Image
from tqdm.auto import tqdm

from ..models.preprocessing import letterbox
from ..models.region_pooling import pool_boxes, pool_masks
from .benchmarks import (
    REGION_BENCHMARKS,
    SEGMENTATION_BENCHMARKS,
    RegionBenchmark,
    SegmentationBenchmark,
    get_region_benchmark,
    get_segmentation_benchmark,
)
from .cli import add_model_arguments, check_model_arguments, exits_on_user_error, load_segmenter, make_parser
from .pamr import PAMR
from .protocols import DEFAULT_PROTOCOL, PAMR_STEPS, PROTOCOLS, get_protocol
from .region_protocols import ImageRegions, get_region_protocol
from .segmenter import ClassEmbeddings, DeCLIPSegmenter, image_to_tensor, require_finite, split_class_names

logger = logging.getLogger(__name__)

DISTRIBUTION = "declip-hf"  # the name pip knows the package by


PRECISIONS = {
    "fp32": lambda device_type: contextlib.nullcontext(),
    "bf16": lambda device_type: torch.autocast(device_type, dtype=torch.bfloat16),
    "fp16": lambda device_type: torch.autocast(device_type, dtype=torch.float16),
}


# --------------------------------------------------------------------------------------------------------------------
# Metric
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class SegmentationMetrics:
    """Percentages; per-class entries are NaN for classes with neither ground truth nor prediction."""

    per_class_iou: np.ndarray
    per_class_accuracy: np.ndarray
    mean_iou: float
    all_accuracy: float
    mean_accuracy: float


class ConfusionMatrix:
    """Confusion matrix accumulated over a whole split, with mmseg `IoUMetric` semantics.

    Pixels labelled `ignore_index` are left out (whatever is predicted there). A class with no ground truth and no
    prediction has IoU 0/0 = NaN and is excluded from the mean; one predicted but absent from the ground truth
    has IoU 0 and counts.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64)  # rows: label, columns: prediction

    def update(self, prediction: torch.Tensor, label: torch.Tensor) -> None:
        if prediction.shape != label.shape:
            raise ValueError(f"Prediction {tuple(prediction.shape)} and label {tuple(label.shape)} differ in size.")
        valid = label != self.ignore_index
        label, prediction = label[valid].long(), prediction[valid].long()
        if len(label) and (label.min() < 0 or label.max() >= self.num_classes):
            raise ValueError(f"Label values outside [0, {self.num_classes}) and not {self.ignore_index}.")
        if len(prediction) and (prediction.min() < 0 or prediction.max() >= self.num_classes):
            raise ValueError(f"Predicted classes outside [0, {self.num_classes}).")
        pairs = label * self.num_classes + prediction
        self.matrix += torch.bincount(pairs, minlength=self.num_classes**2).view(self.num_classes, self.num_classes)

    def compute(self) -> SegmentationMetrics:
        matrix = self.matrix.double()
        intersection = matrix.diag()
        label_area, predicted_area = matrix.sum(dim=1), matrix.sum(dim=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = (intersection / (label_area + predicted_area - intersection)).numpy() * 100
            accuracy = (intersection / label_area).numpy() * 100
        total = label_area.sum().item()
        return SegmentationMetrics(
            per_class_iou=iou,
            per_class_accuracy=accuracy,
            mean_iou=float(np.nanmean(iou)) if not np.isnan(iou).all() else math.nan,
            all_accuracy=intersection.sum().item() / total * 100 if total else math.nan,
            mean_accuracy=float(np.nanmean(accuracy)) if not np.isnan(accuracy).all() else math.nan,
        )


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


def load_split(path: str, config_name, split: str, data_files, columns: tuple[str, ...]):
    """Stream one split; image columns are left undecoded so a broken file is skipped, not fatal."""
    dataset = load_dataset(path, config_name, split=split, data_files=data_files, streaming=True)
    features = dataset.features
    if features is not None:
        missing = [column for column in columns if column not in features]
        if missing:
            raise ValueError(f"{path} ({split}) has no column(s) {missing}; its columns are {list(features)}.")
        for column in columns:
            if isinstance(features[column], ImageFeature):
                dataset = dataset.cast_column(column, ImageFeature(decode=False))
    return dataset


def _split_size(dataset) -> int | None:
    try:
        return dataset.info.splits[dataset.split].num_examples
    except (AttributeError, KeyError, TypeError):
        return None


def decode_image(value) -> Image.Image | None:
    """A PIL image from what a dataset column holds (PIL image, `{"bytes", "path"}`, bytes or a path); `None` when
    it cannot be decoded."""
    try:
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        source = io.BytesIO(value) if isinstance(value, (bytes, bytearray)) else value
        image = Image.open(source)
        image.load()
        return image
    except Exception as error:  # PIL raises many types for broken files
        logger.warning("Skipping an undecodable image: %s", error)
        return None


def prepare_label(label_image: Image.Image, spec: SegmentationBenchmark, sample_index: int) -> torch.LongTensor:
    """Raw label map -> class indices (reduce_zero_label, then label_map), ignore pixels kept at `ignore_index`."""
    raw = np.array(label_image)  # palette PNGs give their indices, as mmseg reads them
    if raw.ndim == 3:
        if not (raw == raw[..., :1]).all():
            raise ValueError(
                f"Sample {sample_index} of {spec.name}: the label map has colour channels; "
                "a single-channel map of class ids is needed."
            )
        raw = raw[..., 0]
    label = torch.from_numpy(raw.astype(np.int64))
    ignored = label == spec.ignore_index
    if spec.reduce_zero_label:
        label = torch.where(label == 0, spec.ignore_index, label - 1)
        label[ignored] = spec.ignore_index
    if spec.label_map is not None:
        mapped = torch.full_like(label, spec.ignore_index)
        for raw_value, class_index in spec.label_map.items():
            mapped[label == int(raw_value)] = class_index
        label = mapped
    invalid = (label != spec.ignore_index) & ((label < 0) | (label >= spec.num_classes))
    if invalid.any():
        raise ValueError(
            f"Sample {sample_index} of {spec.name}: label values {sorted(label[invalid].unique().tolist())[:10]} "
            f"are outside the {spec.num_classes} classes and not the ignore index {spec.ignore_index}; "
            "check the spec's class_names, reduce_zero_label and label_map."
        )
    return label


# --------------------------------------------------------------------------------------------------------------------
# Segmentation benchmark
# --------------------------------------------------------------------------------------------------------------------


def _display_names(spec: SegmentationBenchmark) -> list[str]:
    """One unique, readable key per class for the results file: its first name ("background" for class 0 when
    the benchmark has a background class, whose names are a list of stuff words)."""
    names = [names[0] for names in split_class_names(spec.class_names, spec.allow_shared_names)]
    if spec.has_background:
        names[0] = "background"
    counts = Counter(names)
    return [name if counts[name] == 1 else f"{name} ({index})" for index, name in enumerate(names)]


def _percent_or_none(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 4)


def evaluate_segmentation(
    segmenter: DeCLIPSegmenter, spec: SegmentationBenchmark, max_images=None, windows_per_batch: int = 16
) -> dict:
    """mIoU, aAcc, mAcc and per-class IoU of one benchmark, as the results file records them."""
    columns = (spec.image_column, spec.label_column)
    dataset = load_split(spec.path, spec.config_name, spec.split, spec.data_files, columns)
    classes = segmenter.encode_classes(spec.class_names, allow_shared_names=spec.allow_shared_names)
    matrix = ConfusionMatrix(spec.num_classes, spec.ignore_index)
    refine = PAMR(spec.pamr_steps) if spec.pamr_steps else None
    skipped, num_images = Counter(), 0
    total = min(filter(None, (_split_size(dataset), max_images)), default=None)
    for index, sample in enumerate(tqdm(islice(dataset, max_images), total=total, desc=spec.name)):
        image, label_image = decode_image(sample[spec.image_column]), decode_image(sample[spec.label_column])
        if image is None or label_image is None:
            skipped["undecodable"] += 1
            continue
        label = prepare_label(label_image, spec, index)
        if tuple(label.shape) != (image.height, image.width):
            logger.warning("Skipping sample %d of %s: image %dx%d, label %dx%d.", index, spec.name, image.height,
                           image.width, *label.shape)
            skipped["size_mismatch"] += 1
            continue
        prediction = segmenter(
            [image.convert("RGB")], classes, shorter_side=spec.shorter_side, max_longer_side=spec.max_longer_side,
            window=spec.window, stride=spec.stride, logit_scale=spec.logit_scale,
            background_threshold=spec.background_threshold, windows_per_batch=windows_per_batch,
            area_threshold=spec.area_threshold, refine=refine,
        ).label_maps[0]
        matrix.update(prediction, label)
        num_images += 1
    if num_images == 0:
        raise ValueError(f"{spec.name}: no usable sample in {spec.path} ({spec.split}); skipped: {dict(skipped)}.")
    metrics = matrix.compute()
    return {
        "mIoU": _percent_or_none(metrics.mean_iou),
        "aAcc": _percent_or_none(metrics.all_accuracy),
        "mAcc": _percent_or_none(metrics.mean_accuracy),
        "per_class_IoU": dict(zip(_display_names(spec), map(_percent_or_none, metrics.per_class_iou))),
        "num_images": num_images,
        "skipped": dict(skipped),
        "settings": {**spec.settings(), "num_templates": len(segmenter.templates)},
    }


# --------------------------------------------------------------------------------------------------------------------
# Region classification
# --------------------------------------------------------------------------------------------------------------------


def padded_square_view(image: Image.Image, size: int, segmenter: DeCLIPSegmenter) -> torch.Tensor:
    """The student view of training (docs/method.md §3): longest side to `size` (bicubic), black padding
    right and bottom to a square, then normalised. (1, 3, size, size)."""
    # The same `letterbox` as training/views.py, so region classification sees exactly the student's view.
    pixels = image_to_tensor(letterbox(image.convert("RGB"), size)).to(segmenter.device)
    return ((pixels - segmenter.image_mean) / segmenter.image_std)[None]


def _pool_masks_allowing_empty(dense_embeds: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mask-pooled features (K, D); a mask left empty on the feature grid (the authors' binarisation can erase a
    small segment) gets the zero vector, as their `sum(m * f) / (sum(m) + 1e-12)` gives: all its scores are equal
    and the first class wins the argmax."""
    selects = masks.flatten(1).sum(dim=1) > 0
    embeds = dense_embeds.new_zeros((len(masks), dense_embeds.shape[1]))
    if selects.any():
        embeds[selects.to(embeds.device)] = pool_masks(dense_embeds, [masks[selects].to(dense_embeds.device)])
    return embeds


def classify_regions(
    segmenter: DeCLIPSegmenter, image: Image.Image, regions: ImageRegions, classes: ClassEmbeddings, image_size: int
) -> dict[str, torch.LongTensor]:
    """Predicted class (K,) of every region from its box (RoIAlign) and from its mask (mask pooling), on the CPU.
    `classes.name_embeds` should already sit on the segmenter's device."""
    with torch.no_grad():
        # One dense map serves both poolings (what get_region_features and get_mask_features each compute).
        pixels = padded_square_view(image, image_size, segmenter)
        dense_embeds = segmenter.vision_model.get_dense_features(pixels).dense_embeds.float()
        pooled = {"box": pool_boxes(dense_embeds, [regions.boxes]),
                  "mask": _pool_masks_allowing_empty(dense_embeds, regions.masks)}
    predictions = {}
    for kind, embeds in pooled.items():
        scores = require_finite(embeds @ classes.name_embeds.T, f"The {kind}-pooled region scores")  # (K, names)
        predictions[kind] = classes.max_over_names(scores, dim=1).argmax(dim=1).cpu()
    return predictions


def _feature_grid_size(segmenter: DeCLIPSegmenter, spec: RegionBenchmark) -> int:
    patch_size = segmenter.vision_model.patch_size
    if spec.image_size % patch_size:
        raise ValueError(f"{spec.name}: image_size {spec.image_size} is not a multiple of the patch size "
                         f"{patch_size}; use e.g. {spec.image_size // patch_size * patch_size}.")
    return spec.image_size // patch_size


def _region_accuracies(correct: dict, total: torch.Tensor, is_thing: torch.Tensor, protocol) -> dict:
    """thing / stuff mAcc per pooling kind: the mean over classes with regions of the protocol-rounded accuracy."""
    results = {}
    for kind, kind_correct in correct.items():
        per_class = protocol.round_accuracy(kind_correct / total.clamp(min=1))
        results[kind] = {"thing_mAcc": _mean_over_present(per_class, total, is_thing),
                         "stuff_mAcc": _mean_over_present(per_class, total, ~is_thing)}
    return results


def _mean_over_present(per_class: torch.Tensor, total: torch.Tensor, selected: torch.Tensor) -> float | None:
    present = selected & (total > 0)
    return round(per_class[present].mean().item() * 100, 4) if present.any() else None


def evaluate_regions(segmenter: DeCLIPSegmenter, spec: RegionBenchmark, max_images=None) -> dict:
    """Top-1 mean class accuracy of box (RoIAlign) and mask-pooled features, for things and stuff separately, under
    the spec's region protocol (`declip_hf.segmentation.region_protocols`)."""
    protocol = get_region_protocol(spec.protocol)
    dataset = load_split(
        spec.path, spec.config_name, spec.split, spec.data_files,
        (spec.image_column, spec.panoptic_column, spec.segments_column),
    )
    classes = protocol.class_embeddings(segmenter, spec.categories)
    # Names on the device for the matmul; name_to_class stays on the CPU (no device sync in max_over_names).
    classes = ClassEmbeddings(name_embeds=classes.name_embeds.to(segmenter.device), name_to_class=classes.name_to_class)
    category_to_class = {category["id"]: index for index, category in enumerate(spec.categories)}
    is_thing = torch.tensor([bool(category["isthing"]) for category in spec.categories])
    grid_size = _feature_grid_size(segmenter, spec)
    total = torch.zeros(len(spec.categories))
    correct = {"box": torch.zeros(len(spec.categories)), "mask": torch.zeros(len(spec.categories))}
    skipped, num_images = Counter(), 0
    for sample in tqdm(islice(dataset, max_images), desc=spec.name):
        image, panoptic = decode_image(sample[spec.image_column]), decode_image(sample[spec.panoptic_column])
        if image is None or panoptic is None:
            skipped["undecodable"] += 1
            continue
        if panoptic.size != image.size:
            skipped["size_mismatch"] += 1
            continue
        regions = protocol.regions(panoptic, sample[spec.segments_column], category_to_class, is_thing, grid_size,
                                   skipped)
        if len(regions.class_indices) == 0:
            skipped["no_regions"] += 1
            continue
        target = regions.class_indices
        for kind, prediction in classify_regions(segmenter, image, regions, classes, spec.image_size).items():
            correct[kind] += torch.bincount(target[prediction == target], minlength=len(total)).float()
        total += torch.bincount(target, minlength=len(total)).float()
        num_images += 1
    if num_images == 0:
        raise ValueError(f"{spec.name}: no usable sample in {spec.path} ({spec.split}); skipped: {dict(skipped)}.")
    return {**_region_accuracies(correct, total, is_thing, protocol), "num_regions": int(total.sum()),
            "num_images": num_images, "skipped": dict(skipped), "settings": spec.settings()}


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = make_parser(__doc__)
    add_model_arguments(parser)
    parser.add_argument("--benchmarks", default=",".join(SEGMENTATION_BENCHMARKS),
                        help=f"Comma-separated built-in names ({', '.join(SEGMENTATION_BENCHMARKS)}) "
                        "or YAML spec paths; '' for none.")
    parser.add_argument("--region-benchmark", default="",
                        help="Comma-separated region-classification specs "
                        f"(built-in: {', '.join(REGION_BENCHMARKS)}) or YAML paths.")
    parser.add_argument("--output", required=True, help="Results JSON file (rewritten after each benchmark).")
    parser.add_argument("--max-images", type=int, default=None,
                        help="Evaluate only the first N samples of each split (a smoke test, not the protocol).")
    parser.add_argument("--dataset", action="append", default=[], metavar="NAME=PATH_OR_ID",
                        help="Replace a benchmark's dataset (load_dataset path: Hub id or local folder). Repeatable.")
    parser.add_argument("--data-files", action="append", default=[], metavar="NAME=FILES",
                        help="Set a benchmark's data_files (e.g. with --dataset NAME=parquet). Repeatable.")
    parser.add_argument("--split", action="append", default=[], metavar="NAME=SPLIT",
                        help="Replace a benchmark's split. Repeatable.")
    parser.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS),
                        help="Autocast precision of the forward passes.")
    parser.add_argument("--protocol", default=DEFAULT_PROTOCOL, choices=list(PROTOCOLS),
                        help="Per-benchmark settings of the built-in segmentation benchmarks, as the named project "
                        "evaluates (docs/method.md §6 and the README list the published table each is comparable "
                        "with); YAML specs keep their own settings.")
    parser.add_argument("--pamr", action="store_true",
                        help="Refine the similarity maps with PAMR as NACLIP does (10 steps, dilations 8 and 16) "
                        "on every segmentation benchmark; off by default.")
    return parser.parse_args(argv)


def _overrides(pairs: list[str], option: str) -> dict[str, str]:
    parsed = {}
    for pair in pairs:
        name, separator, value = pair.partition("=")
        if not separator:
            raise ValueError(f"{option} expects NAME=VALUE, got {pair!r}.")
        parsed[name] = value
    return parsed


def _apply_overrides(spec, args) -> None:
    """--dataset / --split / --data-files NAME=VALUE, for the spec called NAME."""
    paths = _overrides(args.dataset, "--dataset")
    splits = _overrides(args.split, "--split")
    data_files = _overrides(args.data_files, "--data-files")
    spec.path = paths.get(spec.name, spec.path)
    spec.split = splits.get(spec.name, spec.split)
    if spec.name in data_files:
        # Keyed by the evaluated split: `datasets` would file a bare path under "train".
        spec.data_files = {spec.split: data_files[spec.name]}


def collect_versions() -> dict:
    import datasets
    import transformers

    return {"declip_hf": installed_version(DISTRIBUTION), "torch": torch.__version__,
            "transformers": transformers.__version__, "datasets": datasets.__version__,
            "python": platform.python_version()}


def installed_version(distribution: str) -> str | None:
    """The installed distribution's version (read from its metadata, so this subpackage never imports the package
    root); None for a source checkout that was never installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _specs(names: str, resolve) -> list:
    return [resolve(name.strip()) for name in names.split(",") if name.strip()]


def build_segmentation_specs(names: str, protocol_name: str, pamr: bool) -> list[SegmentationBenchmark]:
    """The specs named in `names`: built-in ones under the protocol's settings, YAML ones as written (with PAMR
    switched on when asked)."""
    protocol = get_protocol(protocol_name)
    specs = []
    for spec in _specs(names, get_segmentation_benchmark):
        if spec.name in SEGMENTATION_BENCHMARKS and spec.protocol != "custom":
            specs.append(protocol.apply(spec, pamr=pamr))
        else:
            specs.append(dataclasses.replace(spec, pamr_steps=PAMR_STEPS) if pamr else spec)
    return specs


def write_results(results: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2, allow_nan=False, ensure_ascii=False) + "\n")


def check_arguments(args: argparse.Namespace) -> None:
    """The flags that can be checked before the model loads (the specs check themselves as they are built)."""
    check_model_arguments(args)
    if args.max_images is not None and args.max_images <= 0:
        raise ValueError(f"--max-images must be a positive integer, got {args.max_images}.")
    if Path(args.output).is_dir():
        raise ValueError(f"--output {args.output!r} is a folder; give the path of the results JSON file.")


@exits_on_user_error
def main(argv=None) -> dict:
    args = parse_args(argv)
    check_arguments(args)
    protocol = get_protocol(args.protocol)
    segmentation_specs = build_segmentation_specs(args.benchmarks, args.protocol, args.pamr)
    region_specs = _specs(args.region_benchmark, get_region_benchmark)
    if not segmentation_specs and not region_specs:
        raise ValueError("Nothing to evaluate: --benchmarks and --region-benchmark are both empty.")
    for spec in segmentation_specs + region_specs:
        _apply_overrides(spec, args)
    segmenter = load_segmenter(args)
    precision = PRECISIONS[args.precision]
    device_type = torch.device(args.device).type
    results = {"model": args.model, "protocol": protocol.describe(args.pamr), "benchmarks": {},
               "region_classification": {}, "versions": collect_versions()}
    # Recorded with every number: max_images so a smoke test is never mistaken for the full split.
    run_settings = {"precision": args.precision, "max_images": args.max_images,
                    "decoupled_attention": segmenter.vision_model.config.decoupled_attention}
    for spec in segmentation_specs:
        with precision(device_type):
            result = evaluate_segmentation(segmenter, spec, args.max_images, windows_per_batch=args.windows_per_batch)
        results["benchmarks"][spec.name] = {**result, "settings": {**result["settings"], **run_settings}}
        write_results(results, args.output)
        logger.info("%s: mIoU %s", spec.name, result["mIoU"])
    for spec in region_specs:
        with precision(device_type):
            result = evaluate_regions(segmenter, spec, args.max_images)
        results["region_classification"][spec.name] = {**result, "settings": {**result["settings"], **run_settings}}
        write_results(results, args.output)
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
