"""Protocol presets (issue 11): every preset's settings per benchmark, SCLIP's area threshold, PAMR against a plain
written-out computation, and `--protocol` / `--pamr` through the evaluation command."""

import json

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image as ImageFeature
from PIL import Image

from declip_hf.segmentation.benchmarks import SEGMENTATION_BENCHMARKS, get_segmentation_benchmark
from declip_hf.segmentation.evaluate import main
from declip_hf.segmentation.pamr import PAMR
from declip_hf.segmentation.protocols import PROTOCOLS, get_protocol
from declip_hf.segmentation.segmenter import DeCLIPSegmenter, _threshold_labels, sliding_windows, split_class_names

BENCHMARKS = ("voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff", "cityscapes", "ade20k")
WHOLE = (2048, 2048)  # whole image: one window as large as the longest resized side can be

# (shorter side, (window, stride), logit scale, background threshold, area threshold), written from each project's
# configs (docs/method.md §6); 0 thresholds are None (never fire; no background class).
EXPECTED = {
    "declip": {
        "voc21": (448, (336, 112), 80, 0.4, None), "context60": (448, (336, 112), 40, 0.15, None),
        "coco_object": (448, (336, 112), 40, 0.2, None), "voc20": (448, (336, 112), 40, None, None),
        "context59": (448, (336, 112), 40, None, None), "coco_stuff": (448, (336, 112), 40, None, None),
        "cityscapes": (560, (336, 112), 40, None, None), "ade20k": (448, (336, 112), 40, None, None),
    },
    "sclip": {
        "voc21": (336, (224, 112), 65, 0.1, 0.1), "context60": (336, (224, 112), 50, 0.1, None),
        "coco_object": (336, (224, 112), 50, 0.1, None), "voc20": (336, (224, 112), 40, None, None),
        "context59": (336, (224, 112), 40, None, None), "coco_stuff": (448, (224, 112), 40, None, None),
        "cityscapes": (560, (224, 112), 40, None, None), "ade20k": (336, (224, 112), 40, None, None),
    },
    "naclip": {
        "voc21": (336, WHOLE, 40, 0.1, None), "context60": (336, (224, 112), 40, 0.1, None),
        "coco_object": (336, (224, 112), 40, 0.1, None), "voc20": (336, WHOLE, 40, None, None),
        "context59": (336, (224, 112), 40, None, None), "coco_stuff": (336, (224, 112), 40, None, None),
        "cityscapes": (560, (224, 112), 40, None, None), "ade20k": (336, (224, 112), 40, None, None),
    },
    "clearclip": {
        "voc21": (448, (448, 224), 50, 0.5, None), "context60": (448, (448, 224), 50, 0.15, None),
        "coco_object": (448, (448, 224), 50, 0.4, None), "voc20": (448, (448, 224), 50, None, None),
        "context59": (448, (448, 224), 50, None, None), "coco_stuff": (448, (448, 224), 50, None, None),
        "cityscapes": (448, (224, 224), 50, None, None), "ade20k": (448, (448, 224), 50, None, None),
    },
    "proxyclip": {
        "voc21": (336, (336, 112), 40, 0.2, None), "context60": (336, (336, 112), 40, 0.15, None),
        "coco_object": (336, (336, 112), 40, 0.25, None), "voc20": (336, (336, 112), 40, None, None),
        "context59": (336, (336, 112), 40, None, None), "coco_stuff": (336, (336, 112), 40, None, None),
        "cityscapes": (448, (224, 112), 40, None, None), "ade20k": (448, (336, 112), 40, None, None),
    },
}


@pytest.mark.parametrize("protocol_name", list(EXPECTED))
def test_every_preset_resolves_to_its_table(protocol_name):
    assert set(PROTOCOLS) == set(EXPECTED)
    protocol = get_protocol(protocol_name)
    for name in BENCHMARKS:
        spec = protocol.apply(get_segmentation_benchmark(name))
        shorter_side, window_stride, logit_scale, background, area = EXPECTED[protocol_name][name]
        assert (spec.shorter_side, (spec.window, spec.stride), spec.logit_scale) == (
            shorter_side, window_stride, logit_scale), (protocol_name, name)
        assert (spec.background_threshold, spec.area_threshold) == (background, area), (protocol_name, name)
        assert spec.protocol == protocol_name and spec.pamr_steps == 0
        assert protocol.apply(get_segmentation_benchmark(name), pamr=True).pamr_steps == 10
        assert spec.settings()["protocol"] == protocol_name
    with pytest.raises(ValueError, match="Unknown protocol 'mine'"):
        get_protocol("mine")


def test_declip_preset_is_the_builtin_specs_and_class_names_follow_each_project():
    for name, builtin in SEGMENTATION_BENCHMARKS.items():
        assert get_protocol("declip").apply(builtin) == builtin
    # A whole-image window is one window over any resized image.
    assert sliding_windows(336, 470, *WHOLE) == [(0, 336, 0, 470)]

    def names(protocol_name, benchmark, index):
        spec = get_protocol(protocol_name).apply(get_segmentation_benchmark(benchmark))
        return split_class_names(spec.class_names, spec.allow_shared_names)[index]

    assert names("sclip", "voc21", 0)[:3] == ("sky", "wall", "tree") and len(names("sclip", "voc21", 15)) == 7
    assert names("clearclip", "voc21", 0) == ("background",) and names("clearclip", "voc21", 20) == ("tvmonitor",)
    assert names("clearclip", "coco_object", 1) == ("person",) and names("clearclip", "voc20", 14) == ("person",)
    assert len(names("proxyclip", "voc21", 0)) == 26 and names("proxyclip", "voc21", 15) == ("person",)
    proxy_background = names("proxyclip", "coco_object", 0)
    assert len(proxy_background) == 17 and "lamp" not in proxy_background and proxy_background[-1] == "rail"


def test_area_threshold_removes_small_classes_as_sclip_does():
    # 3 classes over 10 pixels: argmax gives class 1 on 8 pixels, class 2 on 2; non-background area 10.
    probs = torch.zeros(3, 1, 10)
    probs[0] = 0.2
    probs[1, 0, :8], probs[2, 0, :8] = 0.7, 0.1
    probs[1, 0, 8:], probs[2, 0, 8:] = 0.35, 0.45
    assert _threshold_labels(probs.clone(), 0.1, None).tolist() == [[1] * 8 + [2] * 2]
    # 2 <= 0.25 * 10: class 2 is removed; its pixels go to the best remaining class (class 1, 0.35).
    assert _threshold_labels(probs.clone(), 0.1, 0.25).tolist() == [[1] * 10]
    # ... and then the background threshold applies to what is left: 0.35 < 0.4 -> background.
    assert _threshold_labels(probs.clone(), 0.4, 0.25).tolist() == [[1] * 8 + [0] * 2]
    # 2 > 0.1 * 10: kept.
    assert _threshold_labels(probs.clone(), 0.1, 0.1).tolist() == [[1] * 8 + [2] * 2]


def plain_pamr(image: np.ndarray, scores: np.ndarray, iterations: int, dilations) -> np.ndarray:
    """PAMR written out pixel by pixel: image (3, H, W), scores (C, H, W), borders replicated."""
    _, height, width = image.shape

    def at(array, y, x):
        return array[:, min(max(y, 0), height - 1), min(max(x, 0), width - 1)]

    steps = [(d * dy, d * dx) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    neighbours = [(dy, dx) for dy, dx in steps if (dy, dx) != (0, 0)]
    weights = np.zeros((len(neighbours), height, width))
    for y in range(height):
        for x in range(width):
            stencil = np.stack([at(image, y + dy, x + dx) for dy, dx in steps])  # (9 * len(dilations), 3)
            spread = stencil.std(axis=0, ddof=1)
            logits = [np.mean(-np.abs(image[:, y, x] - at(image, y + dy, x + dx)) / (1e-8 + 0.1 * spread))
                      for dy, dx in neighbours]
            weights[:, y, x] = np.exp(logits) / np.exp(logits).sum()
    for _ in range(iterations):
        refined = np.zeros_like(scores)
        for y in range(height):
            for x in range(width):
                refined[:, y, x] = sum(weights[k, y, x] * at(scores, y + dy, x + dx)
                                       for k, (dy, dx) in enumerate(neighbours))
        scores = refined
    return scores


def test_pamr_against_a_plain_computation():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, 7, 9))
    image[:, :, 5:] += 3  # an edge the refinement should respect
    scores = rng.random((4, 7, 9))
    expected = plain_pamr(image, scores, iterations=3, dilations=(1, 2))
    refined = PAMR(3, dilations=(1, 2))(torch.from_numpy(image)[None].float(), torch.from_numpy(scores)[None].float())
    np.testing.assert_allclose(refined[0].numpy(), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="scores at the image's size"):
        PAMR()(torch.zeros(1, 3, 5, 5), torch.zeros(1, 2, 4, 5))


def test_protocol_and_pamr_through_the_command(tmp_path, tiny_clip_dir):
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8))
    label = Image.fromarray(rng.integers(0, 59, (20, 28)).astype(np.uint8))  # raw context59: 0 ignored, 1-59
    features = Features({"image": ImageFeature(), "label": ImageFeature()})
    Dataset.from_dict({"image": [image], "label": [label]}, features=features).to_parquet(tmp_path / "c59.parquet")
    output = tmp_path / "results.json"
    main(["--model", str(tiny_clip_dir), "--benchmarks", "context59", "--protocol", "naclip", "--pamr",
          "--dataset", "context59=parquet", "--data-files", f"context59={tmp_path / 'c59.parquet'}",
          "--output", str(output)])
    results = json.loads(output.read_text())
    assert results["protocol"].startswith("naclip: comparable with NACLIP") and "PAMR" in results["protocol"]
    settings = results["benchmarks"]["context59"]["settings"]
    assert (settings["protocol"], settings["shorter_side"], settings["window"], settings["stride"]) == (
        "naclip", 336, 224, 112)
    assert settings["pamr_steps"] == 10 and settings["area_threshold"] is None

    # The same prediction from the segmenter called directly with those settings and PAMR.
    segmenter = DeCLIPSegmenter.from_pretrained(tiny_clip_dir)
    spec = SEGMENTATION_BENCHMARKS["context59"]
    kwargs = {"shorter_side": 336, "window": 224, "stride": 112, "logit_scale": 40.0}
    with_pamr = segmenter([image], spec.class_names, refine=PAMR(10), **kwargs).label_maps[0]
    truth = torch.from_numpy(np.array(label)).long() - 1
    valid = truth >= 0
    accuracy = (with_pamr[valid] == truth[valid]).float().mean().item() * 100
    assert abs(results["benchmarks"]["context59"]["aAcc"] - accuracy) < 1e-3
