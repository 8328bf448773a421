"""Evaluation: the mIoU metric against plain per-class counts, label handling, benchmark specs, and the evaluation
command end to end on small local datasets in the Hub layout (parquet with image columns)."""

import json
import math
import re

import numpy as np
import pytest
import torch
import yaml
from datasets import Dataset, Features, Image as ImageFeature, List, Value
from PIL import Image

from declip_hf.segmentation.benchmarks import SEGMENTATION_BENCHMARKS, SegmentationBenchmark, get_segmentation_benchmark
from declip_hf.segmentation.evaluate import ConfusionMatrix, main, prepare_label
from declip_hf.segmentation.region_protocols import AreaWeightedRegionProtocol


def panoptic_regions(panoptic, segments, category_to_class, skipped):
    """The "area_weighted" protocol's regions (the only protocol before issue 11)."""
    return AreaWeightedRegionProtocol().regions(panoptic, segments, category_to_class, None, None, skipped)
from declip_hf.segmentation.segmenter import DeCLIPSegmenter, split_class_names
from tests.test_segmentation import expect_cli_error

# --------------------------------------------------------------------------------------------------------------------
# Metric
# --------------------------------------------------------------------------------------------------------------------


def plain_metrics(pairs, num_classes, ignore_index=255):
    """Per-class TP / FP / FN counted pixel by pixel over all images, then mmseg's IoU, aAcc and mAcc."""
    tp, fp, fn = [0] * num_classes, [0] * num_classes, [0] * num_classes
    valid_pixels = 0
    for prediction, label in pairs:
        for predicted, true in zip(prediction.flatten().tolist(), label.flatten().tolist()):
            if true == ignore_index:
                continue
            valid_pixels += 1
            if predicted == true:
                tp[true] += 1
            else:
                fp[predicted] += 1
                fn[true] += 1
    iou = [tp[c] / (tp[c] + fp[c] + fn[c]) if tp[c] + fp[c] + fn[c] else math.nan for c in range(num_classes)]
    accuracy = [tp[c] / (tp[c] + fn[c]) if tp[c] + fn[c] else math.nan for c in range(num_classes)]
    present_iou = [value for value in iou if not math.isnan(value)]
    present_accuracy = [value for value in accuracy if not math.isnan(value)]
    return {
        "iou": [value * 100 for value in iou],
        "mIoU": 100 * sum(present_iou) / len(present_iou),
        "aAcc": 100 * sum(tp) / valid_pixels,
        "mAcc": 100 * sum(present_accuracy) / len(present_accuracy),
    }


def test_confusion_matrix_matches_plain_counts():
    generator = torch.Generator().manual_seed(0)
    num_classes = 5
    pairs = []
    for shape in ((6, 7), (5, 9)):
        label = torch.randint(0, 3, shape, generator=generator)  # classes 3 and 4 never in the ground truth
        label[torch.rand(shape, generator=generator) < 0.2] = 255
        prediction = torch.randint(0, 4, shape, generator=generator)  # class 3 predicted, class 4 never
        pairs.append((prediction, label))
    matrix = ConfusionMatrix(num_classes)
    for prediction, label in pairs:
        matrix.update(prediction, label)
    metrics = matrix.compute()
    expected = plain_metrics(pairs, num_classes)

    np.testing.assert_allclose(metrics.per_class_iou[:4], expected["iou"][:4], rtol=1e-12)
    assert metrics.per_class_iou[3] == 0  # predicted but absent: IoU 0, counted in the mean
    assert math.isnan(metrics.per_class_iou[4])  # absent and never predicted: excluded
    assert math.isclose(metrics.mean_iou, expected["mIoU"], rel_tol=1e-12)
    assert math.isclose(metrics.all_accuracy, expected["aAcc"], rel_tol=1e-12)
    assert math.isclose(metrics.mean_accuracy, expected["mAcc"], rel_tol=1e-12)


def test_oracle_scores_100_and_a_known_corruption_its_hand_computed_value():
    label = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    oracle = ConfusionMatrix(2)
    oracle.update(label.clone(), label)
    assert oracle.compute().mean_iou == 100 and oracle.compute().all_accuracy == 100

    # Four of the eight class-1 pixels predicted as class 0:
    # class 0: TP 8, FP 4, FN 0 -> IoU 8/12; class 1: TP 4, FP 0, FN 4 -> IoU 4/8.
    corrupted = label.clone()
    corrupted[2] = 0
    matrix = ConfusionMatrix(2)
    matrix.update(corrupted, label)
    metrics = matrix.compute()
    assert math.isclose(metrics.mean_iou, (8 / 12 + 4 / 8) / 2 * 100)  # 58.33
    assert math.isclose(metrics.all_accuracy, 12 / 16 * 100)  # 75
    assert math.isclose(metrics.mean_accuracy, (8 / 8 + 4 / 8) / 2 * 100)  # 75

    # Predictions on ignored pixels do not count.
    ignored = label.clone()
    ignored[2] = 255
    matrix = ConfusionMatrix(2)
    matrix.update(corrupted, ignored)
    assert matrix.compute().mean_iou == 100


# --------------------------------------------------------------------------------------------------------------------
# Labels and specs
# --------------------------------------------------------------------------------------------------------------------


def label_image(values) -> Image.Image:
    return Image.fromarray(np.array(values, dtype=np.uint8))


def test_reduce_zero_label_and_label_map():
    spec = SegmentationBenchmark("ade", "x", ["a", "b", "c"], reduce_zero_label=True)
    label = prepare_label(label_image([[0, 1, 2], [3, 255, 1]]), spec, 0)
    assert label.tolist() == [[255, 0, 1], [2, 255, 0]]

    cityscapes = get_segmentation_benchmark("cityscapes")
    raw = [[7, 8, 33], [0, 1, 255], [26, 24, 4]]  # road, sidewalk, bicycle / unlabelled ids / car, person, void
    assert prepare_label(label_image(raw), cityscapes, 0).tolist() == [[0, 1, 18], [255, 255, 255], [13, 11, 255]]


def test_label_outside_the_class_list_is_an_error():
    spec = SegmentationBenchmark("toy", "x", ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"Sample 4 of toy: label values \[3, 7\]"):
        prepare_label(label_image([[0, 3], [7, 255]]), spec, 4)


def test_builtin_benchmarks_follow_section_6():
    expected_classes = {"voc21": 21, "context60": 60, "coco_object": 81, "voc20": 20, "context59": 59,
                        "coco_stuff": 171, "cityscapes": 19, "ade20k": 150}
    assert {name: spec.num_classes for name, spec in SEGMENTATION_BENCHMARKS.items()} == expected_classes
    thresholds = {name: spec.background_threshold for name, spec in SEGMENTATION_BENCHMARKS.items()}
    assert thresholds == {"voc21": 0.4, "context60": 0.15, "coco_object": 0.2, "voc20": None, "context59": None,
                          "coco_stuff": None, "cityscapes": None, "ade20k": None}
    for name, spec in SEGMENTATION_BENCHMARKS.items():
        assert (spec.window, spec.stride, spec.ignore_index) == (336, 112, 255)
        assert spec.shorter_side == (560 if name == "cityscapes" else 448)
        assert spec.logit_scale == (80.0 if name == "voc21" else 40.0)
        names = [names for entry in split_class_names(spec.class_names, spec.allow_shared_names) for names in entry]
        assert all(names), name
    # The published background words hold "bed", one of COCO-Object's classes: kept as published, by an explicit
    # exception to the unique-names rule that no other built-in spec needs.
    coco_object_spec = SEGMENTATION_BENCHMARKS["coco_object"]
    with pytest.raises(ValueError, match="'bed' in classes \\[0, 60\\]"):
        split_class_names(coco_object_spec.class_names)
    coco_object = split_class_names(coco_object_spec.class_names, allow_shared_names=True)
    assert "bed" in coco_object[0] and coco_object[60] == ("bed",) and len(coco_object[0]) == 26
    assert [name for name, spec in SEGMENTATION_BENCHMARKS.items() if spec.allow_shared_names] == ["coco_object"]
    assert "bed" in split_class_names(SEGMENTATION_BENCHMARKS["voc21"].class_names)[0]  # VOC has no bed class
    assert split_class_names(SEGMENTATION_BENCHMARKS["voc21"].class_names)[15][0] == "person"
    assert SEGMENTATION_BENCHMARKS["ade20k"].reduce_zero_label and SEGMENTATION_BENCHMARKS["voc20"].reduce_zero_label
    with pytest.raises(ValueError, match="Unknown benchmark 'voc'"):
        get_segmentation_benchmark("voc")


def test_yaml_spec_rejects_unknown_fields(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"path": "parquet", "class_names": ["a"], "windw": 3}))
    with pytest.raises(ValueError, match="windw"):
        get_segmentation_benchmark(str(path))


# --------------------------------------------------------------------------------------------------------------------
# The evaluation command end to end
# --------------------------------------------------------------------------------------------------------------------

TOY_CLASSES = ["background", "cat; kitty", "dog"]
TOY_SETTINGS = {"shorter_side": 24, "window": 16, "stride": 8, "logit_scale": 50.0, "background_threshold": 0.3}


def random_sample(rng, height, width, label_height=None, label_width=None, max_label=3):
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    label = rng.integers(0, max_label, (label_height or height, label_width or width)).astype(np.uint8)
    label[0, :3] = 255
    return image, Image.fromarray(label)


def write_segmentation_dataset(folder, samples) -> str:
    features = Features({"image": ImageFeature(), "label": ImageFeature()})
    data = {"image": [image for image, _ in samples], "label": [label for _, label in samples]}
    path = folder / "validation.parquet"
    Dataset.from_dict(data, features=features).to_parquet(path)
    return str(path)


def write_spec(folder, data_file, name="toy") -> str:
    spec = {"name": name, "path": "parquet", "data_files": {"validation": data_file}, "class_names": TOY_CLASSES,
            **TOY_SETTINGS}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_evaluation_command_end_to_end(tmp_path, tiny_clip_dir):
    rng = np.random.default_rng(0)
    samples = [random_sample(rng, 20, 28), random_sample(rng, 26, 18), random_sample(rng, 20, 28, 21, 28),
               random_sample(rng, 22, 22)]
    spec_path = write_spec(tmp_path, write_segmentation_dataset(tmp_path, samples))
    output = tmp_path / "results" / "results.json"
    main(["--model", str(tiny_clip_dir), "--benchmarks", spec_path, "--output", str(output), "--max-images", "3"])
    results = json.loads(output.read_text())

    assert results["model"] == str(tiny_clip_dir)
    # Issue 11: the protocol's name leads the description (was "DeCLIP training-free segmentation (...)").
    assert results["protocol"].startswith("declip: comparable with DeCLIP (CVPR 2025)")
    assert "docs/method.md §6" in results["protocol"]
    assert set(results["versions"]) >= {"torch", "transformers", "datasets", "declip_hf"}
    toy = results["benchmarks"]["toy"]
    assert toy["num_images"] == 2 and toy["skipped"] == {"size_mismatch": 1}  # the third label is 21x28
    assert list(toy["per_class_IoU"]) == ["background", "cat", "dog"]
    assert toy["settings"]["background_threshold"] == 0.3 and toy["settings"]["window"] == 16
    assert toy["settings"]["logit_scale"] == 50.0 and toy["settings"]["shorter_side"] == 24
    assert toy["settings"]["max_images"] == 3 and toy["settings"]["decoupled_attention"] == "qq"

    # The same numbers from the segmenter called directly and plain per-class counting.
    segmenter = DeCLIPSegmenter.from_pretrained(tiny_clip_dir)
    pairs = []
    for image, label in samples[:2]:
        prediction = segmenter([image], TOY_CLASSES, **TOY_SETTINGS).label_maps[0]
        pairs.append((prediction, torch.from_numpy(np.array(label)).long()))
    expected = plain_metrics(pairs, 3)
    assert math.isclose(toy["mIoU"], expected["mIoU"], abs_tol=1e-3)
    assert math.isclose(toy["aAcc"], expected["aAcc"], abs_tol=1e-3)
    for reported, plain in zip(toy["per_class_IoU"].values(), expected["iou"]):
        assert (reported is None and math.isnan(plain)) or math.isclose(reported, plain, abs_tol=1e-3)


def test_bad_label_is_an_error_and_an_empty_split_too(tmp_path, tiny_clip_dir, capsys):
    # The command ends with one error line and exit status 2 (it raised the ValueError before issue 8).
    rng = np.random.default_rng(1)
    bad = tmp_path / "bad"
    bad.mkdir()
    spec_path = write_spec(bad, write_segmentation_dataset(bad, [random_sample(rng, 20, 20, max_label=5)]))
    argv = ["--model", str(tiny_clip_dir), "--benchmarks", spec_path, "--output", str(tmp_path / "r.json")]
    assert "outside the 3 classes" in expect_cli_error(main, argv, capsys)

    empty = tmp_path / "empty"
    empty.mkdir()
    spec_path = write_spec(empty, write_segmentation_dataset(empty, [random_sample(rng, 20, 20, 21, 20)]))
    argv = ["--model", str(tiny_clip_dir), "--benchmarks", spec_path, "--output", str(tmp_path / "r.json")]
    assert "no usable sample" in expect_cli_error(main, argv, capsys)


def test_dataset_split_and_data_files_overrides(tmp_path, tiny_clip_dir):
    rng = np.random.default_rng(2)
    data_file = write_segmentation_dataset(tmp_path, [random_sample(rng, 16, 24), random_sample(rng, 18, 18)])
    spec = yaml.safe_load(open(write_spec(tmp_path, data_file)))
    spec.update(path="nowhere/unverified-id", data_files=None)  # as a built-in spec whose Hub copy is absent
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(spec))
    output = tmp_path / "r.json"
    main(["--model", str(tiny_clip_dir), "--benchmarks", str(tmp_path / "toy.yaml"), "--dataset", "toy=parquet",
          "--split", "toy=test", "--data-files", f"toy={data_file}", "--output", str(output)])
    toy = json.loads(output.read_text())["benchmarks"]["toy"]
    assert toy["num_images"] == 2
    assert (toy["settings"]["path"], toy["settings"]["split"]) == ("parquet", "test")


# --------------------------------------------------------------------------------------------------------------------
# Region classification
# --------------------------------------------------------------------------------------------------------------------

REGION_CATEGORIES = [{"id": 1, "name": "cat", "isthing": True}, {"id": 5, "name": "dog; puppy", "isthing": True},
                     {"id": 90, "name": "sky", "isthing": False}, {"id": 91, "name": "grass", "isthing": False}]


def panoptic_png(segment_ids: np.ndarray) -> Image.Image:
    rgb = np.stack([segment_ids % 256, segment_ids // 256 % 256, segment_ids // 256**2], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def toy_panoptic_sample(rng, height=20, width=30):
    segment_ids = np.full((height, width), 300, dtype=np.int64)  # 300 = sky, above 255 to exercise the G channel
    segment_ids[2:9, 3:12] = 7  # a cat
    segment_ids[10:18, 15:27] = 8  # a dog
    segment_ids[height - 2 :, :] = 9  # grass
    segment_ids[0, 0] = 11  # a crowd segment
    segments = [{"id": 7, "category_id": 1, "iscrowd": 0}, {"id": 8, "category_id": 5, "iscrowd": 0},
                {"id": 300, "category_id": 90, "iscrowd": 0}, {"id": 9, "category_id": 91, "iscrowd": 0},
                {"id": 11, "category_id": 1, "iscrowd": 1}]
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return image, panoptic_png(segment_ids), segments, segment_ids


def test_panoptic_regions_boxes_and_masks():
    from collections import Counter

    _, panoptic, segments, segment_ids = toy_panoptic_sample(np.random.default_rng(0))
    skipped = Counter()
    regions = panoptic_regions(panoptic, segments, {1: 0, 5: 1, 90: 2, 91: 3}, skipped)
    assert skipped == {"crowd_regions": 1}
    assert regions.class_indices.tolist() == [0, 1, 2, 3]
    # Boxes in the padded 30x30 frame: the cat spans columns 3..11 and rows 2..8.
    torch.testing.assert_close(regions.boxes[0], torch.tensor([3, 2, 12, 9]) / 30.0)
    torch.testing.assert_close(regions.boxes[1], torch.tensor([15, 10, 27, 18]) / 30.0)
    assert regions.masks.shape == (4, 30, 30)
    assert torch.equal(regions.masks[2, :20, :30], torch.from_numpy(segment_ids == 300).float())
    assert regions.masks[:, 20:].sum() == 0  # the padding holds no region
    with pytest.raises(ValueError, match="category id 5"):
        panoptic_regions(panoptic, segments, {1: 0, 90: 2, 91: 3}, Counter())


def test_region_classification_end_to_end(tmp_path, tiny_clip_dir):
    rng = np.random.default_rng(3)
    samples = [toy_panoptic_sample(rng), toy_panoptic_sample(rng, 24, 16)]
    segment_feature = {"id": Value("int64"), "category_id": Value("int64"), "iscrowd": Value("int64")}
    features = Features({"image": ImageFeature(), "label": ImageFeature(), "segments_info": List(segment_feature)})
    data = {"image": [sample[0] for sample in samples], "label": [sample[1] for sample in samples],
            "segments_info": [sample[2] for sample in samples]}
    data_file = tmp_path / "panoptic.parquet"
    Dataset.from_dict(data, features=features).to_parquet(data_file)
    spec_path = tmp_path / "regions.yaml"
    spec = {"name": "toy_regions", "path": "parquet", "data_files": {"validation": str(data_file)},
            "categories": REGION_CATEGORIES, "image_size": 32, "protocol": "area_weighted"}
    spec_path.write_text(yaml.safe_dump(spec))
    output = tmp_path / "results.json"
    main(["--model", str(tiny_clip_dir), "--benchmarks", "", "--region-benchmark", str(spec_path),
          "--output", str(output)])
    regions = json.loads(output.read_text())["region_classification"]["toy_regions"]
    assert regions["num_regions"] == 8 and regions["skipped"] == {"crowd_regions": 2}

    # Independent computation through the vision model's own region APIs, classes by max over names.
    from collections import Counter

    from declip_hf.segmentation.evaluate import padded_square_view

    segmenter = DeCLIPSegmenter.from_pretrained(tiny_clip_dir)
    classes = segmenter.encode_classes([category["name"] for category in REGION_CATEGORIES])
    assert classes.name_to_class.tolist() == [0, 1, 1, 2, 3]
    hits = {"box": Counter(), "mask": Counter()}
    for image, panoptic, segments, _ in samples:
        found = panoptic_regions(panoptic, segments, {1: 0, 5: 1, 90: 2, 91: 3}, Counter())
        pixels = padded_square_view(image, 32, segmenter)
        with torch.no_grad():
            embeds = {"box": segmenter.vision_model.get_region_features(pixels, [found.boxes])[0],
                      "mask": segmenter.vision_model.get_mask_features(pixels, [found.masks])[0]}
        for kind, kind_embeds in embeds.items():
            scores = kind_embeds @ classes.name_embeds.T  # (K, names): cat, dog, puppy, sky, grass
            names_of = {0: [0], 1: [1, 2], 2: [3], 3: [4]}
            for region, true_class in enumerate(found.class_indices.tolist()):
                best = {c: max(scores[region, n].item() for n in names) for c, names in names_of.items()}
                hits[kind][true_class] += int(max(best, key=best.get) == true_class)
    for kind in ("box", "mask"):
        # every class has exactly 2 regions (one per image)
        thing = (hits[kind][0] / 2 + hits[kind][1] / 2) / 2 * 100
        stuff = (hits[kind][2] / 2 + hits[kind][3] / 2) / 2 * 100
        assert math.isclose(regions[kind]["thing_mAcc"], thing, abs_tol=1e-3)
        assert math.isclose(regions[kind]["stuff_mAcc"], stuff, abs_tol=1e-3)


@pytest.mark.parametrize("width, height", [(64, 25), (200, 1), (1, 90), (33, 33)])
def test_region_view_is_the_training_letterbox(width, height):
    from training.views import letterbox, normalise

    from declip_hf.segmentation.evaluate import padded_square_view

    segmenter = DeCLIPSegmenter(None, None, None, image_mean=(0.4, 0.5, 0.6), image_std=(0.2, 0.25, 0.3))
    image = Image.fromarray(np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8))
    view = padded_square_view(image, 32, segmenter)
    expected = normalise([letterbox(image, 32, centred=False)], (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    torch.testing.assert_close(view, expected)
    # Independently: Python's round of the resized sides, at least 1 px (64x25 -> 32x12.5 rounds to 12, to even).
    scale = 32 / max(width, height)
    new_width, new_height = max(1, round(width * scale)), max(1, round(height * scale))
    padding = torch.tensor([0.4, 0.5, 0.6]).view(3, 1, 1).neg() / torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1)
    torch.testing.assert_close(view[0, :, new_height:, :], padding.expand(3, 32 - new_height, 32))
    torch.testing.assert_close(view[0, :, :, new_width:], padding.expand(3, 32, 32 - new_width))


def test_nothing_to_evaluate_and_unknown_attention_mode_are_refused(tmp_path, tiny_clip_dir, capsys):
    output = tmp_path / "r.json"
    argv = ["--model", str(tiny_clip_dir), "--benchmarks", "", "--output", str(output)]
    assert "Nothing to evaluate" in expect_cli_error(main, argv, capsys)  # exit status 2 now, 1 before issue 8
    assert not output.exists()
    with pytest.raises(SystemExit):  # argparse: not one of DECOUPLED_ATTENTION_MODES
        main(["--model", str(tiny_clip_dir), "--decoupled-attention", "qk", "--output", str(output)])


def test_example_yaml_spec_loads():
    from tests.conftest import REPO_ROOT

    spec = get_segmentation_benchmark(str(REPO_ROOT / "configs" / "benchmarks" / "example.yaml"))
    assert spec.name == "my_parquet_benchmark" and spec.num_classes == 3 and spec.has_background
    assert split_class_names(spec.class_names)[1] == ("cat", "kitty")


# --------------------------------------------------------------------------------------------------------------------
# Never a number from a bad spec or a broken model; one error line (issue 8, §2.3, §2.5, §2.7, §5)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        ({"window": 16, "stride": 32}, r"spec 'toy': stride \(32\) is larger than window \(16\)"),
        ({"logit_scale": math.nan}, "spec 'toy': logit_scale must be a finite positive number"),
        ({"logit_scale": math.inf}, "spec 'toy': logit_scale must be a finite positive number"),
        ({"class_names": ["background", "cat", "cat"]}, r"spec 'toy': .*'cat' in classes \[1, 2\]"),
        ({"class_names": "cat"}, "spec 'toy': .*got the string 'cat'"),
    ],
)
def test_bad_spec_is_refused_before_the_model_loads(tmp_path, change, message, capsys, monkeypatch):
    spec = {"name": "toy", "path": "parquet", "data_files": "unused.parquet", "class_names": TOY_CLASSES,
            **TOY_SETTINGS, **change}
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setattr("declip_hf.segmentation.evaluate.load_segmenter", lambda args: pytest.fail("the model was loaded"))
    line = expect_cli_error(
        main, ["--model", "m", "--benchmarks", str(tmp_path / "toy.yaml"), "--output", str(tmp_path / "r.json")],
        capsys,
    )
    assert re.search(message, line), line


def test_nan_weights_end_in_an_error_not_an_miou(tmp_path, tiny_clip_dir, capsys):
    from transformers import CLIPModel, CLIPTokenizer

    broken = tmp_path / "nan_clip"
    model = CLIPModel.from_pretrained(tiny_clip_dir)
    with torch.no_grad():
        model.visual_projection.weight.fill_(math.nan)  # as a diverged run would save
    model.save_pretrained(broken)
    CLIPTokenizer.from_pretrained(tiny_clip_dir).save_pretrained(broken)
    rng = np.random.default_rng(4)
    spec_path = write_spec(tmp_path, write_segmentation_dataset(tmp_path, [random_sample(rng, 20, 28)]))
    output = tmp_path / "r.json"
    line = expect_cli_error(main, ["--model", str(broken), "--benchmarks", spec_path, "--output", str(output)], capsys)
    assert "NaN or inf" in line and "checkpoint's weights" in line
    assert not output.exists()  # no mIoU was written


def test_dinov2_model_is_one_error_line(tmp_path, tiny_dinov2_dir, capsys):
    rng = np.random.default_rng(5)
    spec_path = write_spec(tmp_path, write_segmentation_dataset(tmp_path, [random_sample(rng, 20, 28)]))
    argv = ["--model", str(tiny_dinov2_dir), "--benchmarks", spec_path, "--output", str(tmp_path / "r.json")]
    line = expect_cli_error(main, argv, capsys)
    assert line.startswith("error: ") and "dinov2" in line.lower(), line
    assert not (tmp_path / "r.json").exists()


def test_evaluate_cli_conventions(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines to the terminal width
    assert "(default: fp32)" in help_text and "(default: 16)" in help_text
    assert "declip-evaluate --model PATH_OR_ID" in help_text  # the docstring's layout is kept
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "m", "--output", "r.json", "--max-image", "3"])  # abbreviations are not guessed
    assert exit_info.value.code == 2 and "unrecognized arguments: --max-image" in capsys.readouterr().err

    monkeypatch.setattr("declip_hf.segmentation.evaluate.load_segmenter", lambda args: pytest.fail("the model was loaded"))
    refusals = [
        (["--max-images", "0", "--output", str(tmp_path / "r.json")], "--max-images must be a positive integer"),
        (["--output", str(tmp_path)], "is a folder; give the path of the results JSON file"),
        (["--benchmarks", "voc", "--output", str(tmp_path / "r.json")], "Unknown benchmark 'voc'"),
        (["--benchmarks", str(tmp_path / "none.yaml"), "--output", str(tmp_path / "r.json")], "No such file"),
        (["--dataset", "voc21", "--output", str(tmp_path / "r.json")], "--dataset expects NAME=VALUE"),
    ]
    for argv, message in refusals:
        assert message in expect_cli_error(main, ["--model", "m", *argv], capsys)
