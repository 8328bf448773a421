"""The training views of one image for DeCLIP distillation (CVPR 2025, arXiv 2505.04410), §3 of the method.

From a decoded RGB image: the student view (letterboxed, CLIP-normalised), up to `max_crops` grid crops for the
frozen CLIP teacher together with their boxes in the student frame, and one view per context teacher (VFM) whose
patch grid equals the student's, at that teacher's patch size (none for the clipself ablation; docs/method.md §9).

Choices the paper leaves open (docs/method.md §3 and its section on where we differ), following the authors' recipe
(CLIPSelf / DeCLIP `GridDistillDataset` with open_clip's `ResizeLongest` / `ResizeMaxSize` transforms) unless said
otherwise:

- Resized sizes are `round(side * target / longest_side)` (Python's `round`, as open_clip does), at least 1 px.
- Grid cells have integer pixel edges: the j-th of N column edges is `floor(j * W0 / N + 1/2)` (rows alike), so
  the cells tile the image exactly. The authors crop at the float edges `j * W0 / N`, which PIL's `crop` rounds to
  the nearest pixel (the same pixels as ours except at exact .5 ties, which Python rounds to even), but keep the
  float edges as boxes; we use the integer edges for the box too, so a box describes exactly the pixels its crop
  shows (the boxes of the two recipes differ by under half an original pixel per edge).
- A box is mapped into the student frame with the exact scale `student_size / max(W0, H0)` (the authors'
  `get_scale`), then divided by `student_size`; that is, `box = edges / max(W0, H0)`.
- Alpha is dropped, not composited: the authors call `PIL.Image.convert("RGB")`, which keeps the stored colour of
  transparent pixels. 16-bit and 32-bit grey images are scaled to 8 bit by their bit depth instead of PIL's
  clipping (which turns most of a 16-bit image white). EXIF orientation is not applied (neither do the authors).
"""

import math
import random
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from declip_hf.models.preprocessing import letterbox
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

# §3: images smaller than this on a side are skipped.
MIN_IMAGE_SIDE = 10

# Every reason an image can be skipped for; the order is the layout of the per-batch "skipped" count tensor.
SKIP_REASONS = ("undecodable", "truncated", "too_large", "missing", "tiny", "mode")


class UnusableImage(ValueError):
    """An image that cannot be turned into training views; `reason` is one of `SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in SKIP_REASONS:
            raise ValueError(f"Unknown skip reason {reason!r}; valid reasons: {', '.join(SKIP_REASONS)}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class ViewConfig:
    """Sizes and normalisation of the views.

    Args:
        student_size (`int`, *optional*, defaults to 560): side of the square student input.
        student_patch (`int`, *optional*, defaults to 16): the student's patch size; `student_size` must be a multiple.
        teacher_size (`int`, *optional*, defaults to 224): side of the square teacher crops.
        vfm_patch (`int` or `None`, *optional*, defaults to 14): the (first) VFM's patch size; its view, key
            "vfm", is `vfm_size` square. `None`: no VFM view (the clipself ablation, docs/method.md §10).
        max_split (`int`, *optional*, defaults to 6): the largest number of grid rows or columns.
        max_crops (`int`, *optional*, defaults to 20): crops kept per image (tensors are padded to this many).
        clip_mean, clip_std (`tuple[float]`, *optional*, default to OpenAI CLIP's): student and teacher normalisation.
        vfm_mean, vfm_std (`tuple[float]`, *optional*, default to ImageNet's): VFM normalisation.
        extra_vfm_views (`tuple[VFMView]`, *optional*, defaults to none): the views of further context teachers
            with another patch size or normalisation (an ensemble, docs/method.md §9), keys "vfm_1", "vfm_2", ...
    """

    student_size: int = 560
    student_patch: int = 16
    teacher_size: int = 224
    vfm_patch: int | None = 14
    max_split: int = 6
    max_crops: int = 20
    clip_mean: tuple[float, float, float] = tuple(OPENAI_CLIP_MEAN)
    clip_std: tuple[float, float, float] = tuple(OPENAI_CLIP_STD)
    vfm_mean: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)
    vfm_std: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)
    extra_vfm_views: tuple["VFMView", ...] = ()

    def __post_init__(self):
        if self.vfm_patch is None and self.extra_vfm_views:
            raise ValueError("extra_vfm_views need a first VFM view (vfm_patch).")
        for name in ("student_size", "student_patch", "teacher_size", "vfm_patch", "max_split", "max_crops"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.student_size % self.student_patch != 0:
            lower = self.student_size - self.student_size % self.student_patch
            raise ValueError(
                f"student_size={self.student_size} is not a multiple of the student's patch size "
                f"{self.student_patch}; use e.g. {lower} or {lower + self.student_patch}"
            )
        for name in ("clip_mean", "clip_std", "vfm_mean", "vfm_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} needs one value per RGB channel, got {getattr(self, name)}")

    @property
    def grid_size(self) -> int:
        """Patches per side of the student view (35 at 560 / 16)."""
        return self.student_size // self.student_patch

    @property
    def vfm_size(self) -> int:
        """Side of the VFM view, chosen so the VFM patch grid equals the student's (490 at 560 / 16 with /14)."""
        return self.grid_size * self.vfm_patch

    @property
    def vfm_views(self) -> dict[str, "VFMView"]:
        """Every VFM view by its batch key: "vfm" (the first), then "vfm_1", "vfm_2", ... (`extra_vfm_views`)."""
        if self.vfm_patch is None:
            return {}
        first = VFMView(self.vfm_patch, self.vfm_mean, self.vfm_std)
        return {"vfm": first, **{f"vfm_{index}": view for index, view in enumerate(self.extra_vfm_views, start=1)}}

    @property
    def source_side(self) -> int:
        """The longest image side the views can use (1344 by default): the student and VFM views need their own
        side, and a grid cell, whose long side is at least 1 / `max_split` of the image's, needs `teacher_size` there.
        Larger images lose nothing by being decoded smaller (training/data.py `decode_image`)."""
        vfm_sizes = [self.grid_size * view.patch for view in self.vfm_views.values()]
        return max(self.student_size, *vfm_sizes, self.teacher_size * self.max_split)


@dataclass(frozen=True)
class VFMView:
    """One context teacher's view: the student view's grid at this teacher's patch size, letterboxed the same way.

    Args:
        patch (`int`): the teacher's patch size; the view is (student grid x patch) px square.
        mean, std (`tuple[float]`, *optional*, default to ImageNet's): its normalisation.
    """

    patch: int
    mean: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)
    std: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)

    def __post_init__(self):
        if self.patch < 1:
            raise ValueError(f"A VFM view's patch size must be a positive integer, got {self.patch}")


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Return `image` as 8-bit RGB, or raise `UnusableImage` ("tiny" under 10 px a side, "mode" if not convertible)."""
    width, height = image.size
    if min(width, height) < MIN_IMAGE_SIDE:
        raise UnusableImage("tiny", f"{width}x{height} px, the minimum is {MIN_IMAGE_SIDE} px a side")
    converter = _RGB_CONVERTERS.get(image.mode, _convert_with_pil)
    try:
        return converter(image)
    except (ValueError, OSError) as error:
        raise UnusableImage("mode", f"cannot convert mode {image.mode!r} to RGB ({error})") from error


def _convert_with_pil(image: PIL.Image.Image) -> PIL.Image.Image:
    # CMYK, YCbCr, L, LA, 1, RGBA, ...: PIL's own conversion, as the authors do (alpha is dropped).
    return image.convert("RGB")


def _palette_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    # Same pixels as convert("RGB"), minus PIL's warning about palette transparency given in bytes.
    return image.convert("RGBA").convert("RGB")


def _wide_grey_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """16-bit ("I;16*") or 32-bit ("I", "F") grey: scale by the bit depth instead of PIL's clipping to 255."""
    values = np.asarray(image).astype(np.float64)
    # "I" and "F" carry no bit depth; the usual source of wide grey values is 16-bit PNG/TIFF, so values above the
    # 8-bit range are read as 16-bit and values within it as 8-bit.
    is_sixteen_bit = image.mode.startswith("I;16") or values.max(initial=0.0) > 255
    if is_sixteen_bit:
        values = values / 257.0  # 65535 -> 255 exactly
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(grey, mode="L").convert("RGB")


_RGB_CONVERTERS = {
    "RGB": lambda image: image,
    "P": _palette_to_rgb,
    "PA": _palette_to_rgb,
    "I": _wide_grey_to_rgb,
    "F": _wide_grey_to_rgb,
    "I;16": _wide_grey_to_rgb,
    "I;16L": _wide_grey_to_rgb,
    "I;16B": _wide_grey_to_rgb,
    "I;16N": _wide_grey_to_rgb,
}


def grid_choices(max_split: int) -> list[tuple[int, int]]:
    """All (rows M, columns N) with 1 <= M <= max_split and ceil(M/2) <= N <= min(2M, max_split), M-major order."""
    return [
        (rows, columns)
        for rows in range(1, max_split + 1)
        for columns in range(math.ceil(rows / 2), min(2 * rows, max_split) + 1)
    ]


def grid_edges(length: int, parts: int) -> list[int]:
    """`parts + 1` integer edges splitting `length` pixels: edge j is floor(j * length / parts + 1/2)."""
    return [(2 * j * length + parts) // (2 * parts) for j in range(parts + 1)]


def grid_cells(width: int, height: int, rows: int, columns: int) -> list[tuple[int, int, int, int]]:
    """The non-empty cells (x0, y0, x1, y1) of a rows x columns grid over a width x height image, row-major."""
    x_edges, y_edges = grid_edges(width, columns), grid_edges(height, rows)
    cells = [
        (x_edges[j], y_edges[i], x_edges[j + 1], y_edges[i + 1]) for i in range(rows) for j in range(columns)
    ]
    # Cells are only empty when an image has fewer pixels than grid lines (max_split > 10 on a tiny image).
    return [cell for cell in cells if cell[2] > cell[0] and cell[3] > cell[1]]


def normalise(images: list[PIL.Image.Image], mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Same-sized RGB images -> (len, 3, H, W) float32, `(pixel / 255 - mean) / std`, in one tensor operation."""
    pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images]))  # (K, H, W, 3) uint8
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels.permute(0, 3, 1, 2).float() / 255.0 - mean_t) / std_t


def make_grid_crops(
    image: PIL.Image.Image, config: ViewConfig, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grid crops for the teacher, their student-frame boxes and validity, each padded to `max_crops` rows.

    Returns `crops` (max_crops, 3, T, T), `boxes` (max_crops, 4) xyxy in [0, 1] of the student frame and
    `crop_valid` (max_crops,) bool; valid crops come first, the rest are zeros.
    """
    width, height = image.size
    rows, columns = rng.choice(grid_choices(config.max_split))
    cells = grid_cells(width, height, rows, columns)
    rng.shuffle(cells)
    cells = cells[: config.max_crops]

    crops = torch.zeros(config.max_crops, 3, config.teacher_size, config.teacher_size)
    padded = [letterbox(image.crop(cell), config.teacher_size, centred=True) for cell in cells]
    crops[: len(cells)] = normalise(padded, config.clip_mean, config.clip_std)
    boxes = torch.zeros(config.max_crops, 4)
    # Original pixels -> student frame (scale S / max(W0, H0)) -> divided by S.
    boxes[: len(cells)] = torch.tensor(cells, dtype=torch.float64).div(max(width, height)).float()
    crop_valid = torch.arange(config.max_crops) < len(cells)
    return crops, boxes, crop_valid


def make_views(image: PIL.Image.Image, config: ViewConfig, rng: random.Random) -> dict[str, torch.Tensor]:
    """The views of §3 for one RGB image (see `to_rgb`): keys student, crops, boxes, crop_valid and one per VFM view
    (`ViewConfig.vfm_views`: "vfm", then "vfm_1", ... for an ensemble's teachers at other patch sizes)."""
    crops, boxes, crop_valid = make_grid_crops(image, config, rng)
    student = letterbox(image, config.student_size, centred=False)
    vfm_views = {
        key: normalise([letterbox(image, config.grid_size * view.patch, centred=False)], view.mean, view.std)[0]
        for key, view in config.vfm_views.items()
    }  # each (3, V_i, V_i)
    return {
        "student": normalise([student], config.clip_mean, config.clip_std)[0],  # (3, S, S)
        "crops": crops,
        "boxes": boxes,
        "crop_valid": crop_valid,
        **vfm_views,
    }
