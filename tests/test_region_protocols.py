"""The DeCLIP authors' region-classification protocol (issue 11): prompts, box filters, mask binarisation, and the
evaluation command under it; COCO-Object labels as the reference converter makes them."""

import json
import math
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from datasets import Dataset, Features, Image as ImageFeature, List, Value
from PIL import Image

from declip_hf.segmentation.benchmarks import (
    COCO_OBJECT_LABEL_MAPS,
    COCO_PANOPTIC_CATEGORIES,
    REGION_BENCHMARKS,
    SegmentationBenchmark,
    get_segmentation_benchmark,
)
from declip_hf.segmentation.evaluate import main, padded_square_view, prepare_label
from declip_hf.segmentation.region_protocols import AuthorsRegionProtocol, resize_longest_mask, vild_prompts
from declip_hf.segmentation.segmenter import DeCLIPSegmenter

# --------------------------------------------------------------------------------------------------------------------
# Text side
# --------------------------------------------------------------------------------------------------------------------


def test_vild_prompts_against_hand_written_lists():
    # Positions 0, 1, 2, 5, 8, 13, 59 and 62 of the 63 templates, written out by hand.
    positions = (0, 1, 2, 5, 8, 13, 59, 62)
    expected = {
        "person": [
            "There is a person in the scene.", "There is the person in the scene.",
            "This is a photo of a person in the scene.", "itap of a person.", "This is a photo of a person.",
            "This is a good photo of a person.", "This is an embroidered person.", "This is a painting of a person.",
        ],
        "wall-other-merged": [
            "There is a wall-other-merged in the scene.", "There is the wall-other-merged in the scene.",
            "This is a photo of a wall-other-merged in the scene.", "itap of a wall-other-merged.",
            "This is a photo of a wall-other-merged.", "This is a good photo of a wall-other-merged.",
            "This is an embroidered wall-other-merged.", "This is a painting of a wall-other-merged.",
        ],
        "apple": [
            "There is an apple in the scene.", "There is the apple in the scene.",
            "This is a photo of an apple in the scene.", "itap of an apple.", "This is a photo of an apple.",
            "This is a good photo of an apple.", "This is an embroidered apple.", "This is a painting of a apple.",
        ],
        # `/` reads " or ", `_` a space, lower case; the article comes from the raw name ("Oven" -> "a").
        "Oven/Stove_top": [
            "There is a oven or stove top in the scene.", "There is the oven or stove top in the scene.",
            "This is a photo of a oven or stove top in the scene.", "itap of a oven or stove top.",
            "This is a photo of a oven or stove top.", "This is a good photo of a oven or stove top.",
            "This is an embroidered oven or stove top.", "This is a painting of a oven or stove top.",
        ],
    }
    for name, prompts in expected.items():
        generated = vild_prompts(name)
        assert len(generated) == 63, name
        assert [generated[position] for position in positions] == prompts, name
        # "This is " before exactly the prompts starting with "a"/"the": all but the 2 "There is" and 3 "itap" ones.
        assert sum(prompt.startswith("This is ") for prompt in generated) == 58
    assert vild_prompts("person")[6:8] == ["itap of my person.", "itap of the person."]


def test_builtin_region_spec_uses_raw_panoptic_names_and_the_authors_protocol():
    spec = REGION_BENCHMARKS["coco_panoptic"]
    assert spec.protocol == "authors" and spec.image_size == 560 and len(spec.categories) == 133
    names = AuthorsRegionProtocol().class_names(spec.categories)
    assert names[0] == "person" and "wall-other-merged" in names and "door-stuff" in names
    synonyms = [category["synonyms"] for category in COCO_PANOPTIC_CATEGORIES]
    assert sum(raw != clean for raw, clean in zip(names, synonyms)) == 28  # as the issue counted


# --------------------------------------------------------------------------------------------------------------------
# Regions
# --------------------------------------------------------------------------------------------------------------------


def panoptic_png(segment_ids: np.ndarray) -> Image.Image:
    rgb = np.stack([segment_ids % 256, segment_ids // 256 % 256, segment_ids // 256**2], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


CATEGORIES = {1: 0, 2: 1, 90: 2}  # two things, one stuff class
IS_THING = torch.tensor([True, True, False])


def constructed_sample():
    """70 x 70 px: a crowd thing, a thing without bbox (7 x 9 px, under 8^2: dropped), one with a bbox, a stuff
    region whose pixel extent is 9 x 8 (box 8 x 7 = 56 < 64 without the +1: dropped) and one of 10 x 30."""
    ids = np.zeros((70, 70), dtype=np.int64)
    ids[0:8, 0:8] = 1  # crowd thing, kept
    ids[20:27, 20:29] = 2  # thing without bbox: 9 wide, 7 tall -> 63 px^2, dropped
    ids[40:50, 40:52] = 3  # thing with an annotated bbox
    ids[60:68, 0:9] = 4  # stuff, 9 x 8 pixels: box 8 x 7 -> dropped
    ids[10:40, 55:65] = 5  # stuff, 10 x 30 pixels: box (55, 10, 64, 39)
    segments = [
        {"id": 1, "category_id": 1, "iscrowd": 1},
        {"id": 2, "category_id": 2, "iscrowd": 0},
        {"id": 3, "category_id": 2, "iscrowd": 0, "bbox": [40, 40, 12, 10]},
        {"id": 4, "category_id": 90, "iscrowd": 0},
        {"id": 5, "category_id": 90, "iscrowd": 0},
    ]
    return ids, segments


def test_authors_regions_filters_and_boxes():
    ids, segments = constructed_sample()
    skipped = Counter()
    regions = AuthorsRegionProtocol().regions(panoptic_png(ids), segments, CATEGORIES, IS_THING, 7, skipped)
    assert skipped == {"box_area_out_of_range": 2}
    assert regions.class_indices.tolist() == [0, 1, 2]  # the crowd thing is kept
    expected_boxes = torch.tensor([[0, 0, 8, 8], [40, 40, 52, 50], [55, 10, 64, 39]], dtype=torch.float32) / 70
    torch.testing.assert_close(regions.boxes, expected_boxes)
    assert regions.masks.shape == (3, 7, 7)

    # A thing of exactly 8 x 8 px (from the mask, +1) passes; the authors' bound is inclusive.
    ids = np.zeros((70, 70), dtype=np.int64)
    ids[20:28, 20:28] = 2
    kept = AuthorsRegionProtocol().regions(panoptic_png(ids), [{"id": 2, "category_id": 2}], CATEGORIES, IS_THING, 7,
                                           Counter())
    torch.testing.assert_close(kept.boxes, torch.tensor([[20, 20, 28, 28]], dtype=torch.float32) / 70)


def cubic_weight(distance: float, a: float = -0.75) -> float:
    """Keys' cubic convolution kernel, as torch's bicubic uses it."""
    distance = abs(distance)
    if distance <= 1:
        return (a + 2) * distance**3 - (a + 3) * distance**2 + 1
    if distance < 2:
        return a * distance**3 - 5 * a * distance**2 + 8 * a * distance - 4 * a
    return 0.0


def plain_bicubic_downscale(mask: np.ndarray, out_height: int, out_width: int) -> np.ndarray:
    """Bicubic resampling without antialiasing, written out: each output cell samples the source at its centre
    (align_corners=False) with the 4 x 4 nearest source pixels, edges replicated."""
    height, width = mask.shape
    result = np.zeros((out_height, out_width))
    for row in range(out_height):
        source_y = (row + 0.5) * height / out_height - 0.5
        for col in range(out_width):
            source_x = (col + 0.5) * width / out_width - 0.5
            total = 0.0
            for y in range(math.floor(source_y) - 1, math.floor(source_y) + 3):
                for x in range(math.floor(source_x) - 1, math.floor(source_x) + 3):
                    weight = cubic_weight(source_y - y) * cubic_weight(source_x - x)
                    total += weight * mask[min(max(y, 0), height - 1), min(max(x, 0), width - 1)]
            result[row, col] = total
    return result


def test_mask_binarisation_known_cells_and_plain_computation():
    # 70 px -> 7 cells: cell i samples source pixel 10 i + 4.5, taps 10 i + 3 .. 10 i + 6 with weights
    # -0.09375, 0.59375, 0.59375, -0.09375.
    mask = torch.zeros(1, 70, 70)
    mask[0, 0:8, 0:8] = 1  # covers every tap of cell (0, 0), none of any other
    mask[0, 16:20, 36:40] = 1  # touches only the last tap of cell (1, 3) in both axes: (-0.094)^2 > 0 -> kept
    mask[0, 56:60, 40:50] = 1  # last tap in y (negative) times full taps in x (sum 1) -> negative -> dropped
    binary = resize_longest_mask(mask, 7)[0]
    assert binary.nonzero().tolist() == [[0, 0], [1, 3]]

    # Non-square: 70 wide, 35 tall -> 7 x round(3.5) = 4 rows (Python rounds half to even), rows 4-6 padding.
    rng = np.random.default_rng(0)
    random_mask = (rng.random((2, 35, 70)) > 0.7).astype(np.float64)
    binary = resize_longest_mask(torch.from_numpy(random_mask), 7)
    assert binary.shape == (2, 7, 7) and not binary[:, 4:].any()
    for index in range(2):
        plain = plain_bicubic_downscale(random_mask[index], 4, 7) > 1e-9
        assert np.array_equal(binary[index, :4].numpy(), plain)


# --------------------------------------------------------------------------------------------------------------------
# The evaluation command under the authors' protocol
# --------------------------------------------------------------------------------------------------------------------

TOY_CATEGORIES = [{"id": 1, "name": "cat", "isthing": True}, {"id": 2, "name": "dog-merged", "isthing": True},
                  {"id": 90, "name": "sky", "isthing": False}]


def test_authors_region_classification_end_to_end(tmp_path, tiny_clip_dir):
    ids, segments = constructed_sample()
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (70, 70, 3), dtype=np.uint8))
    segment_feature = {"id": Value("int64"), "category_id": Value("int64"), "iscrowd": Value("int64"),
                       "bbox": List(Value("float64"))}
    features = Features({"image": ImageFeature(), "label": ImageFeature(), "segments_info": List(segment_feature)})
    rows = [{**segment, "bbox": segment.get("bbox")} for segment in segments]
    data = {"image": [image], "label": [panoptic_png(ids)], "segments_info": [rows]}
    Dataset.from_dict(data, features=features).to_parquet(tmp_path / "panoptic.parquet")
    spec = {"name": "toy", "path": "parquet", "data_files": {"validation": str(tmp_path / "panoptic.parquet")},
            "categories": TOY_CATEGORIES, "image_size": 28}
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(spec))
    output = tmp_path / "results.json"
    main(["--model", str(tiny_clip_dir), "--benchmarks", "", "--region-benchmark", str(tmp_path / "toy.yaml"),
          "--output", str(output)])
    result = json.loads(output.read_text())["region_classification"]["toy"]
    assert result["settings"]["protocol"] == "authors"
    assert result["num_regions"] == 3 and result["skipped"] == {"box_area_out_of_range": 2}

    # Independently: ViLD embeddings through the text tower, the regions by hand, the model's own region APIs.
    segmenter = DeCLIPSegmenter.from_pretrained(tiny_clip_dir)
    text_embeds = []
    for category in TOY_CATEGORIES:
        tokens = segmenter.tokenizer(vild_prompts(category["name"]), padding=True, return_tensors="pt")
        with torch.no_grad():
            prompts = F.normalize(segmenter.text_model(**tokens).text_embeds, dim=-1)
        text_embeds.append(F.normalize(prompts.mean(dim=0), dim=-1))
    text_embeds = torch.stack(text_embeds)
    boxes = torch.tensor([[0, 0, 8, 8], [40, 40, 52, 50], [55, 10, 64, 39]], dtype=torch.float32) / 70
    masks = resize_longest_mask(torch.from_numpy(np.stack([ids == 1, ids == 3, ids == 5])), 7).float()
    pixels = padded_square_view(image, 28, segmenter)
    with torch.no_grad():
        box_embeds = segmenter.vision_model.get_region_features(pixels, [boxes])[0]
        mask_embeds = segmenter.vision_model.get_mask_features(pixels, [masks])[0]
    targets = [0, 1, 2]
    for kind, embeds in (("box", box_embeds), ("mask", mask_embeds)):
        hits = [int((embeds[index] @ text_embeds.T).argmax() == target) for index, target in enumerate(targets)]
        assert math.isclose(result[kind]["thing_mAcc"], (hits[0] + hits[1]) / 2 * 100, abs_tol=1e-3)
        assert math.isclose(result[kind]["stuff_mAcc"], hits[2] * 100, abs_tol=1e-3)


# --------------------------------------------------------------------------------------------------------------------
# COCO-Object labels
# --------------------------------------------------------------------------------------------------------------------


def test_coco_object_labels_follow_the_reference_converter():
    spec = get_segmentation_benchmark("coco_object")
    converted = [[0, 1, 80], [255, 17, 255]]  # the converter's output; 255 is unlabelled
    label = prepare_label(Image.fromarray(np.array(converted, dtype=np.uint8)), spec, 0)
    assert label.tolist() == [[0, 1, 80], [0, 17, 0]]  # no ignored pixel: unlabelled is background

    # From mmseg's COCO-Stuff train ids: things 0-79 -> 1-80, stuff 80-170 and unlabelled 255 -> background 0.
    stuff_spec = SegmentationBenchmark("coco_object_from_stuff", "x", spec.class_names, allow_shared_names=True,
                                       background_threshold=0.2, label_map=COCO_OBJECT_LABEL_MAPS["stuff_train_ids"])
    stuff_labels = [[0, 79, 80], [170, 255, 56]]  # person, toothbrush, banner / wood, unlabelled, chair
    label = prepare_label(Image.fromarray(np.array(stuff_labels, dtype=np.uint8)), stuff_spec, 0)
    assert label.tolist() == [[1, 80, 0], [0, 0, 57]]
    assert (label != 255).all()


def test_empty_grid_mask_pools_to_zero_and_accuracy_is_half_rounded(tiny_clip_dir):
    from declip_hf.segmentation.evaluate import _region_accuracies, classify_regions
    from declip_hf.segmentation.region_protocols import AreaWeightedRegionProtocol, ImageRegions

    segmenter = DeCLIPSegmenter.from_pretrained(tiny_clip_dir)
    classes = segmenter.encode_classes(["cat", "dog", "sky"])
    masks = torch.zeros(2, 7, 7)
    masks[1, 2:4, 2:4] = 1  # the first mask vanished on the grid
    regions = ImageRegions(torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.6, 0.6]]), masks, torch.tensor([2, 1]))
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (28, 28, 3), dtype=np.uint8))
    from declip_hf.segmentation.evaluate import _pool_masks_allowing_empty, padded_square_view
    from declip_hf.models.region_pooling import pool_masks

    with torch.no_grad():
        dense = segmenter.vision_model.get_dense_features(padded_square_view(image, 28, segmenter)).dense_embeds
    pooled = _pool_masks_allowing_empty(dense, masks)
    assert torch.equal(pooled[0], torch.zeros_like(pooled[0]))  # sum(m f) / (sum(m) + 1e-12) of an empty mask
    torch.testing.assert_close(pooled[1:], pool_masks(dense, [masks[1:]]))
    # All its scores tie at 0, so the first class is predicted whatever the embeddings.
    classes.name_embeds[0] = -classes.name_embeds[0]
    assert classify_regions(segmenter, image, regions, classes, 28)["mask"][0] == 0

    # Per-class accuracy 1/3 goes through float16 under the authors' protocol (their `_macc`), not otherwise.
    correct, total = {"box": torch.tensor([1.0, 0.0])}, torch.tensor([3.0, 0.0])
    is_thing = torch.tensor([True, False])
    authors = _region_accuracies(correct, total, is_thing, AuthorsRegionProtocol())["box"]
    exact = _region_accuracies(correct, total, is_thing, AreaWeightedRegionProtocol())["box"]
    assert authors["thing_mAcc"] == round(float(torch.tensor(1 / 3).half()) * 100, 4) != exact["thing_mAcc"]
    assert exact["thing_mAcc"] == round(100 / 3, 4) and authors["stuff_mAcc"] is None
