"""The three training views of §3 (training/views.py), checked against plain PIL / numpy computations."""

import io
import random
from collections import Counter

import numpy as np
import PIL.Image
import pytest
import torch

from training.data import decode_image
from training.views import (
    UnusableImage,
    ViewConfig,
    grid_cells,
    grid_choices,
    make_grid_crops,
    make_views,
    to_rgb,
)

TINY = dict(student_size=64, student_patch=4, teacher_size=32, vfm_patch=2)
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def random_image(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def normalised(pixels: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float, written out plainly."""
    return ((pixels.astype(np.float64) / 255.0 - mean) / std).transpose(2, 0, 1)


def black(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return (0.0 - mean) / std


# ---------------------------------------------------------------------------------------------------------------
# Student and VFM views


def test_student_view_of_non_square_image_is_resized_and_padded_right_and_bottom():
    image = random_image(40, 25)
    views = make_views(image, ViewConfig(**TINY), random.Random(0))
    student = views["student"].numpy()
    assert student.shape == (3, 64, 64) and views["student"].dtype == torch.float32

    # 64 / 40 = 1.6: 40 x 25 -> 64 x 40, so rows 40.. are padding and there are no padded columns.
    expected = normalised(np.asarray(image.resize((64, 40), PIL.Image.BICUBIC)), CLIP_MEAN, CLIP_STD)
    np.testing.assert_allclose(student[:, :40, :], expected, atol=1e-5)
    pad = black(CLIP_MEAN, CLIP_STD)[:, None, None]
    np.testing.assert_allclose(student[:, 40:, :], np.broadcast_to(pad, (3, 24, 64)), atol=1e-6)


def test_tall_image_is_padded_on_the_right():
    image = random_image(13, 50, seed=1)
    student = make_views(image, ViewConfig(**TINY), random.Random(0))["student"].numpy()
    new_width = round(13 * 64 / 50)  # 16.64 -> 17
    expected = normalised(np.asarray(image.resize((new_width, 64), PIL.Image.BICUBIC)), CLIP_MEAN, CLIP_STD)
    np.testing.assert_allclose(student[:, :, :new_width], expected, atol=1e-5)
    pad = black(CLIP_MEAN, CLIP_STD)[:, None, None]
    np.testing.assert_allclose(student[:, :, new_width:], np.broadcast_to(pad, (3, 64, 64 - new_width)), atol=1e-6)


def test_vfm_view_grid_equals_student_grid():
    assert ViewConfig().vfm_size == 490  # 560 / 16 = 35 patches, 35 * 14
    assert ViewConfig(student_size=448, vfm_patch=16).vfm_size == 448
    config = ViewConfig(**TINY)
    assert config.vfm_size == 32  # 64 / 4 = 16 patches, 16 * 2

    image = random_image(40, 25)
    vfm = make_views(image, config, random.Random(0))["vfm"].numpy()
    assert vfm.shape == (3, 32, 32)
    # 32 / 40 = 0.8: 40 x 25 -> 32 x 20, ImageNet-normalised, padded at the bottom.
    expected = normalised(np.asarray(image.resize((32, 20), PIL.Image.BICUBIC)), IMAGENET_MEAN, IMAGENET_STD)
    np.testing.assert_allclose(vfm[:, :20, :], expected, atol=1e-5)
    pad = black(IMAGENET_MEAN, IMAGENET_STD)[:, None, None]
    np.testing.assert_allclose(vfm[:, 20:, :], np.broadcast_to(pad, (3, 12, 32)), atol=1e-6)


def test_view_config_rejects_a_student_size_that_is_not_a_multiple_of_the_patch():
    with pytest.raises(ValueError, match="not a multiple of the student's patch size 16; use e.g. 96 or 112"):
        ViewConfig(student_size=100)
    with pytest.raises(ValueError, match="max_crops must be a positive integer"):
        ViewConfig(max_crops=0)


# ---------------------------------------------------------------------------------------------------------------
# Grid crops


def test_grid_choices_are_exactly_the_allowed_pairs():
    expected = [
        (1, 1), (1, 2),
        (2, 1), (2, 2), (2, 3), (2, 4),
        (3, 2), (3, 3), (3, 4), (3, 5), (3, 6),
        (4, 2), (4, 3), (4, 4), (4, 5), (4, 6),
        (5, 3), (5, 4), (5, 5), (5, 6),
        (6, 3), (6, 4), (6, 5), (6, 6),
    ]  # fmt: skip
    assert grid_choices(6) == expected
    assert grid_choices(1) == [(1, 1)]


def test_grid_is_drawn_uniformly_over_the_allowed_pairs():
    # Read (rows, columns) back from the boxes: distinct top edges = rows, distinct left edges = columns.
    config = ViewConfig(student_size=64, student_patch=4, teacher_size=2, vfm_patch=2, max_crops=36)
    image = random_image(12, 12)
    rng = random.Random(1234)
    draws = Counter()
    for _ in range(2400):
        _, boxes, valid = make_grid_crops(image, config, rng)
        boxes = boxes[valid]
        draws[(len(set(boxes[:, 1].tolist())), len(set(boxes[:, 0].tolist())))] += 1
    assert set(draws) == set(grid_choices(6))
    expected = 2400 / 24  # 100 per pair, standard deviation about 10
    assert all(0.6 * expected < count < 1.4 * expected for count in draws.values()), draws


def test_grid_cells_have_integer_edges_that_tile_the_image():
    # 21 rows split in 2: edge floor(21 / 2 + 1/2) = 11. 30 columns split in 3: 10, 20.
    assert grid_cells(30, 21, rows=2, columns=3) == [
        (0, 0, 10, 11), (10, 0, 20, 11), (20, 0, 30, 11),
        (0, 11, 10, 21), (10, 11, 20, 21), (20, 11, 30, 21),
    ]  # fmt: skip
    cells = grid_cells(37, 23, rows=5, columns=6)
    area = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in cells)
    assert area == 37 * 23 and len(cells) == 30


def two_by_two_draw(image, config, max_tries=200):
    """The first seed whose grid draw is 2 x 2 (max_split=2 allows (1,1), (1,2), (2,1), (2,2))."""
    for seed in range(max_tries):
        crops, boxes, valid = make_grid_crops(image, config, random.Random(seed))
        if len(set(boxes[valid][:, 0].tolist())) == 2 and len(set(boxes[valid][:, 1].tolist())) == 2:
            return crops, boxes, valid
    raise AssertionError("no 2 x 2 grid drawn")


def test_crop_boxes_of_a_non_square_image_in_the_padded_student_frame():
    image = random_image(30, 21, seed=2)
    config = ViewConfig(**TINY, max_split=2, max_crops=6)
    crops, boxes, valid = two_by_two_draw(image, config)
    # x edges 0, 15, 30; y edges 0, floor(10.5 + 0.5) = 11, 21. Student scale 64 / 30, then / 64: divide by 30.
    # In the student frame the image occupies 64 x 44.8 of 64 x 64, so y never exceeds 0.7.
    hand_computed = {
        (0.0, 0.0, 0.5, 11 / 30),
        (0.5, 0.0, 1.0, 11 / 30),
        (0.0, 11 / 30, 0.5, 0.7),
        (0.5, 11 / 30, 1.0, 0.7),
    }
    assert valid.tolist() == [True] * 4 + [False] * 2
    got = {tuple(round(v, 6) for v in box) for box in boxes[:4].tolist()}
    assert got == {tuple(round(v, 6) for v in box) for box in hand_computed}
    assert torch.all(boxes[4:] == 0) and torch.all(crops[4:] == 0)


def test_crops_are_resized_and_padded_centred():
    image = random_image(30, 21, seed=3)
    pixels = np.asarray(image)
    config = ViewConfig(**TINY, max_split=2, max_crops=4)
    crops, boxes, valid = two_by_two_draw(image, config)
    pad = black(CLIP_MEAN, CLIP_STD)[:, None]
    for crop, box in zip(crops[valid].numpy(), boxes[valid].tolist()):
        x0, y0, x1, y1 = (round(v * 30) for v in box)
        cell = pixels[y0:y1, x0:x1]  # 15 wide, 11 or 10 high
        width, height = x1 - x0, y1 - y0
        new_height = round(height * 32 / width)  # 11 -> 23 (pad 9: 4 on top, 5 below), 10 -> 21 (pad 11: 5, 6)
        top = (32 - new_height) // 2
        resized = np.asarray(PIL.Image.fromarray(cell).resize((32, new_height), PIL.Image.BICUBIC))
        np.testing.assert_allclose(crop[:, top : top + new_height], normalised(resized, CLIP_MEAN, CLIP_STD), atol=1e-5)
        assert np.allclose(crop[:, :top], pad[:, :, None], atol=1e-6)
        assert np.allclose(crop[:, top + new_height :], pad[:, :, None], atol=1e-6)
        assert top == {23: 4, 21: 5}[new_height]


def test_max_crops_truncates_to_a_random_subset_of_the_cells():
    image = random_image(30, 21, seed=4)
    config = ViewConfig(**TINY, max_split=2, max_crops=3)  # grids 1x1, 1x2, 2x1 (1-2 cells) or 2x2 (4 cells)
    first_boxes, truncated = set(), 0
    for seed in range(40):
        crops, boxes, valid = make_grid_crops(image, config, random.Random(seed))
        count = int(valid.sum())
        assert valid.tolist() == [True] * count + [False] * (3 - count)
        assert len({tuple(box) for box in boxes[:count].tolist()}) == count
        assert torch.all(boxes[count:] == 0) and torch.all(crops[count:] == 0)
        cells_drawn = len(set(boxes[:count, 0].tolist())) * len(set(boxes[:count, 1].tolist()))
        truncated += count == 3 and cells_drawn == 4  # only 3 of the 2x2 cells kept
        first_boxes.add(tuple(boxes[0].tolist()))
    assert truncated > 0
    assert len(first_boxes) > 3  # cells are shuffled, not taken in row-major order


def test_views_are_reproducible_from_the_rng():
    image = random_image(40, 25)
    config = ViewConfig(**TINY)
    first = make_views(image, config, random.Random(7))
    again = make_views(image, config, random.Random(7))
    assert all(torch.equal(first[key], again[key]) for key in first)


# ---------------------------------------------------------------------------------------------------------------
# Conversion to RGB and skipping


def encoded(image: PIL.Image.Image, format: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **kwargs)
    return buffer.getvalue()


def rgb_pixel(image: PIL.Image.Image) -> tuple[int, int, int]:
    converted = to_rgb(image)
    assert converted.mode == "RGB" and converted.size == image.size
    return converted.getpixel((0, 0))


def test_to_rgb_converts_every_common_mode():
    assert rgb_pixel(PIL.Image.new("CMYK", (12, 12), (255 - 77, 0, 0, 0))) == (77, 255, 255)
    # Alpha is dropped as the authors' convert("RGB") does: a transparent pixel keeps its stored colour.
    assert rgb_pixel(PIL.Image.new("RGBA", (12, 12), (10, 20, 30, 0))) == (10, 20, 30)
    assert rgb_pixel(PIL.Image.new("L", (12, 12), 77)) == (77, 77, 77)
    assert rgb_pixel(PIL.Image.new("LA", (12, 12), (77, 0))) == (77, 77, 77)
    assert rgb_pixel(PIL.Image.new("1", (12, 12), 1)) == (255, 255, 255)

    palette = PIL.Image.new("P", (12, 12), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.info["transparency"] = bytes([255, 0] + [255] * 254)  # index 1 fully transparent
    reloaded = decode_image({"bytes": encoded(palette, "PNG"), "path": None})
    assert reloaded.mode == "P" and "transparency" in reloaded.info
    assert rgb_pixel(reloaded) == (200, 100, 50)


def test_sixteen_bit_gradient_keeps_its_range():
    gradient = np.tile(np.arange(0, 65536, 257, dtype=np.uint16), (12, 1))  # 0, 257, ..., 65535: 256 steps
    image = decode_image({"bytes": encoded(PIL.Image.fromarray(gradient), "PNG"), "path": None})
    assert image.mode == "I;16"
    red = np.asarray(to_rgb(image))[0, :, 0]
    np.testing.assert_array_equal(red, np.arange(256))  # PIL's own conversion would clip nearly all to 255

    wide = PIL.Image.fromarray(gradient.astype(np.int32))  # mode "I", 16-bit values
    assert wide.mode == "I"
    np.testing.assert_array_equal(np.asarray(to_rgb(wide))[0, :, 0], np.arange(256))
    eight_bit_values = PIL.Image.fromarray(np.full((12, 12), 200, dtype=np.int32))
    assert rgb_pixel(eight_bit_values) == (200, 200, 200)


def skip_reason(data: bytes) -> str:
    with pytest.raises(UnusableImage) as raised:
        to_rgb(decode_image({"bytes": data, "path": None}))
    return raised.value.reason


def progressive_jpeg() -> bytes:
    ys, xs = np.mgrid[0:120, 0:160]
    gradient = np.stack([xs * 255 // 160, ys * 255 // 120, (xs + ys) * 255 // 280], axis=-1).astype(np.uint8)
    return encoded(PIL.Image.fromarray(gradient), "JPEG", quality=75, progressive=True)


def test_a_corrupt_file_is_undecodable_and_only_a_file_cut_short_is_truncated():
    jpeg = progressive_jpeg()
    garbled = bytearray(jpeg)
    middle = len(jpeg) // 2
    garbled[middle : middle + 16] = np.random.default_rng(1).bytes(16)  # every byte still there, 16 of them wrong
    # The trap: PIL calls this "truncated" too, as its decoder asked for more data at the end.
    with pytest.raises(OSError, match="truncated"):
        PIL.Image.open(io.BytesIO(bytes(garbled))).load()
    assert skip_reason(bytes(garbled)) == "undecodable"
    assert skip_reason(jpeg[:middle]) == "truncated"
    assert skip_reason(jpeg[:-2]) == "truncated"  # all but the end marker
    assert skip_reason(jpeg[:40]) == "truncated"  # too short to read the header

    png = encoded(random_image(40, 40), "PNG")
    garbled_png = bytearray(png)
    garbled_png[len(png) // 2 : len(png) // 2 + 16] = bytes(16)
    assert skip_reason(bytes(garbled_png)) == "undecodable"
    assert skip_reason(png[: len(png) // 2]) == "truncated"
    assert skip_reason(png[:50]) == "truncated"
    gif = encoded(random_image(40, 40).convert("P"), "GIF")
    assert skip_reason(gif[: len(gif) // 2]) == "truncated"


def test_unusable_images_are_rejected_with_their_reason():
    jpeg = encoded(random_image(40, 40), "JPEG")
    assert skip_reason(jpeg[: len(jpeg) // 2]) == "truncated"
    assert skip_reason(np.random.default_rng(0).bytes(500)) == "undecodable"
    assert skip_reason(encoded(random_image(5, 50), "PNG")) == "tiny"
    assert skip_reason(encoded(random_image(50, 9), "PNG")) == "tiny"
    to_rgb(random_image(10, 10))  # 10 px a side is enough
    with pytest.raises(UnusableImage) as raised:
        to_rgb(PIL.Image.new("La", (12, 12)))  # PIL cannot convert premultiplied grey + alpha
    assert raised.value.reason == "mode"
    with pytest.raises(UnusableImage) as raised:
        decode_image(None)
    assert raised.value.reason == "missing"
    assert isinstance(raised.value, ValueError)


def exif_jpeg() -> bytes:
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees (not applied, as the authors do not)
    return encoded(random_image(30, 20), "JPEG", exif=exif.tobytes())


def bomb_header() -> bytes:
    """A GIF declaring 65535 x 65535 px in a few bytes."""
    return b"GIF89a" + (65535).to_bytes(2, "little") * 2 + b"\x00\x00\x00,\x00\x00\x00\x00\xff\xff\xff\xff\x00\x02\x00;"


def palette_with_alpha() -> bytes:
    image = random_image(16, 16).convert("P")
    image.info["transparency"] = 3
    return encoded(image, "PNG")


# Every per-image fault of the fault-injection pass (issue 8), through what the loader does to each image.
FAULTS = {
    "zero-byte": (lambda: b"", "undecodable"),
    "truncated": (lambda: encoded(random_image(40, 40), "JPEG")[:300], "truncated"),
    "text-as-jpg": (lambda: b"this is a text file, not a JPEG\n" * 20, "undecodable"),
    "1x5000": (lambda: encoded(random_image(1, 5000), "PNG"), "tiny"),
    "bomb header": (bomb_header, "too_large"),
    "None cell": (lambda: None, "missing"),
    "CMYK": (lambda: encoded(random_image(20, 20).convert("CMYK"), "JPEG"), "RGB"),
    "palette+alpha": (palette_with_alpha, "RGB"),
    "16-bit": (lambda: encoded(PIL.Image.fromarray(np.full((12, 12), 40000, dtype=np.uint16)), "PNG"), "RGB"),
    "EXIF": (exif_jpeg, "RGB"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_every_known_fault_is_skipped_with_its_reason_or_converted(fault):
    make, expected = FAULTS[fault]
    data = make()
    cell = None if data is None else {"bytes": data, "path": None}
    try:
        image = to_rgb(decode_image(cell, ViewConfig().source_side))
    except UnusableImage as unusable:
        assert unusable.reason == expected
    else:
        assert expected == "RGB" and image.mode == "RGB" and min(image.size) >= 10
