"""Per-benchmark settings of the published training-free segmentation protocols (DeCLIP, CVPR 2025; docs/method.md §6).

DeCLIP, SCLIP, NACLIP, ClearCLIP and ProxyCLIP evaluate the same 8 benchmarks with the same metric but with
different test resizes, sliding windows, logit scales and background thresholds (and SCLIP an area threshold on
VOC21, ClearCLIP and ProxyCLIP plainer class names). A `SegmentationProtocol` holds one project's settings for
every built-in benchmark, read from that project's own configs and segmentor code, so that
`declip-evaluate --protocol NAME` gives numbers comparable with that project's published table. A
protocol applies to the built-in benchmarks only; a YAML spec keeps its own settings.
"""

from dataclasses import dataclass, field, replace

from .benchmarks import SegmentationBenchmark

PAMR_STEPS = 10  # NACLIP's PAMR: 10 iterations at dilations (8, 16) (see declip_hf/segmentation/pamr.py)


@dataclass(frozen=True)
class BenchmarkSettings:
    r"""
    One benchmark's inference settings under one protocol.

    Args:
        shorter_side (`int`): Test resize, mmcv's `Resize(scale=(2048, shorter_side), keep_ratio=True)`.
        window (`int` or `None`), stride (`int` or `None`): Sliding window; `None` for both: the whole resized
            image in one pass (NACLIP's `slide_crop=0`).
        logit_scale (`float`): Multiplies the cosine similarities before the softmax over names.
        background_threshold (`float` or `None`): Below it a pixel becomes background (class 0); `None`: no
            background class (the projects' `prob_thd=0`, which never fires).
        area_threshold (`float` or `None`): SCLIP's `area_thd`: a non-background class predicted on at most this
            share of the non-background pixels is removed before the argmax.
    """

    shorter_side: int
    window: int | None
    stride: int | None
    logit_scale: float
    background_threshold: float | None = None
    area_threshold: float | None = None


@dataclass(frozen=True)
class SegmentationProtocol:
    r"""
    name (`str`): The `--protocol` value.
    comparable_with (`str`): The published table whose numbers these settings reproduce.
    settings (`dict[str, BenchmarkSettings]`): One entry per built-in benchmark.
    class_names (`dict[str, dict[int, str]]`): Class-name replacements per benchmark (class index -> names, "; "
        between synonyms), where the project's class files differ from SCLIP's, which the built-in specs use.
    differences (`str`): What this implementation does not reproduce of the project's inference.
    """

    name: str
    comparable_with: str
    settings: dict
    class_names: dict = field(default_factory=dict)
    differences: str = ""

    def apply(self, spec: SegmentationBenchmark, pamr: bool = False) -> SegmentationBenchmark:
        """A copy of the built-in `spec` with this protocol's settings (and NACLIP's PAMR when `pamr`)."""
        if spec.name not in self.settings:
            raise ValueError(
                f"Protocol {self.name!r} has no settings for benchmark {spec.name!r}; it covers "
                f"{', '.join(self.settings)}. Evaluate a custom benchmark with its YAML spec's own settings."
            )
        chosen = self.settings[spec.name]
        class_names = list(spec.class_names)
        for index, names in self.class_names.get(spec.name, {}).items():
            class_names[index] = names
        whole_image = chosen.window is None
        return replace(
            spec, class_names=class_names, shorter_side=chosen.shorter_side, logit_scale=chosen.logit_scale,
            # One window as large as the longest resized side covers the whole image in one pass.
            window=spec.max_longer_side if whole_image else chosen.window,
            stride=spec.max_longer_side if whole_image else chosen.stride,
            background_threshold=chosen.background_threshold, area_threshold=chosen.area_threshold,
            pamr_steps=PAMR_STEPS if pamr else 0, protocol=self.name,
        )

    def describe(self, pamr: bool = False) -> str:
        return f"{self.name}: comparable with {self.comparable_with}" + (", with PAMR" if pamr else "")


def _table(rows: dict) -> dict:
    """{benchmark: (shorter_side, window, stride, logit_scale, background_threshold[, area_threshold])}."""
    return {name: BenchmarkSettings(*values) for name, values in rows.items()}


# VOC21 / COCO-Object have a background class; the other six none. Window None: whole image.
PROTOCOLS = {
    "declip": SegmentationProtocol(
        "declip", "DeCLIP (CVPR 2025): its training-free segmentation table (docs/method.md §6, §7)",
        _table({
            "voc21": (448, 336, 112, 80.0, 0.4), "context60": (448, 336, 112, 40.0, 0.15),
            "coco_object": (448, 336, 112, 40.0, 0.2), "voc20": (448, 336, 112, 40.0, None),
            "context59": (448, 336, 112, 40.0, None), "coco_stuff": (448, 336, 112, 40.0, None),
            "cityscapes": (560, 336, 112, 40.0, None), "ade20k": (448, 336, 112, 40.0, None),
        }),
    ),
    "sclip": SegmentationProtocol(
        "sclip", "SCLIP (ECCV 2024): its main training-free segmentation table",
        _table({
            "voc21": (336, 224, 112, 65.0, 0.1, 0.1), "context60": (336, 224, 112, 50.0, 0.1),
            "coco_object": (336, 224, 112, 50.0, 0.1), "voc20": (336, 224, 112, 40.0, None),
            "context59": (336, 224, 112, 40.0, None), "coco_stuff": (448, 224, 112, 40.0, None),
            "cityscapes": (560, 224, 112, 40.0, None), "ade20k": (336, 224, 112, 40.0, None),
        }),
    ),
    "naclip": SegmentationProtocol(
        "naclip", "NACLIP (WACV 2025): its main results table, which uses PAMR (pass --pamr)",
        _table({
            "voc21": (336, None, None, 40.0, 0.1), "context60": (336, 224, 112, 40.0, 0.1),
            "coco_object": (336, 224, 112, 40.0, 0.1), "voc20": (336, None, None, 40.0, None),
            "context59": (336, 224, 112, 40.0, None), "coco_stuff": (336, 224, 112, 40.0, None),
            "cityscapes": (560, 224, 112, 40.0, None), "ade20k": (336, 224, 112, 40.0, None),
        }),
        differences="NACLIP truncates the whole image to a multiple of the patch size; here it is zero-padded.",
    ),
    "clearclip": SegmentationProtocol(
        "clearclip", "ClearCLIP (ECCV 2024): its main training-free segmentation table",
        _table({
            "voc21": (448, 448, 224, 50.0, 0.5), "context60": (448, 448, 224, 50.0, 0.15),
            "coco_object": (448, 448, 224, 50.0, 0.4), "voc20": (448, 448, 224, 50.0, None),
            "context59": (448, 448, 224, 50.0, None), "coco_stuff": (448, 448, 224, 50.0, None),
            "cityscapes": (448, 224, 224, 50.0, None), "ade20k": (448, 448, 224, 50.0, None),
        }),
        class_names={
            "voc21": {0: "background", 15: "person", 20: "tvmonitor"},
            "coco_object": {0: "background", 1: "person"},
            "voc20": {14: "person", 19: "tvmonitor"},
        },
        differences="ClearCLIP runs in fp16 (pass --precision fp16) and pads crops to a multiple of 16 in its own "
        "way; here crops are padded to the patch size, split evenly as SCLIP does.",
    ),
    "proxyclip": SegmentationProtocol(
        "proxyclip", "ProxyCLIP (ECCV 2024): its main training-free segmentation table",
        _table({
            "voc21": (336, 336, 112, 40.0, 0.2), "context60": (336, 336, 112, 40.0, 0.15),
            "coco_object": (336, 336, 112, 40.0, 0.25), "voc20": (336, 336, 112, 40.0, None),
            "context59": (336, 336, 112, 40.0, None), "coco_stuff": (336, 336, 112, 40.0, None),
            "cityscapes": (448, 224, 112, 40.0, None), "ade20k": (448, 336, 112, 40.0, None),
        }),
        class_names={
            "voc21": {15: "person", 20: "tvmonitor"},
            # Its 17 background words: SCLIP's 26 less lamp, door, window, wardrobe, ceiling, shelf, curtain, stair
            # and fence.
            "coco_object": {
                0: "sky; wall; tree; wood; grass; road; sea; river; mountain; sands; desk; bed; building; cloud; "
                "floor; hill; rail",
                1: "person",
            },
            "voc20": {14: "person", 19: "tvmonitor"},
        },
        differences="ProxyCLIP runs in fp16 (pass --precision fp16) and pads crops to a multiple of 56; here crops "
        "are padded to the patch size, split evenly as SCLIP does.",
    ),
}
DEFAULT_PROTOCOL = "declip"


def get_protocol(name: str) -> SegmentationProtocol:
    if name not in PROTOCOLS:
        raise ValueError(f"Unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}.")
    return PROTOCOLS[name]
