"""Region-classification protocols on COCO panoptic (DeCLIP, CVPR 2025, Tables 1 and 12; docs/method.md §6).

Every annotated segment of an image is classified from its box (RoIAlign) and from its mask (mask pooling) against
all category embeddings; top-1 accuracy is averaged over classes, for things and stuff separately. Two protocols:

- `"authors"` (the default): the DeCLIP authors' evaluation (their `src/training/zero_shot.py`, `data.py` and
  `tools/generate_text_embeddings.py`, themselves CLIPSelf's), reproduced step by step so that our thing / stuff
  mAcc can be set beside the paper's tables. Rewritten here, not copied; each step says which of their lines it
  follows.
- `"area_weighted"`: this project's earlier variant: the 80 OpenAI templates with cleaned names and synonyms, soft
  (area-weighted) masks, crowd segments dropped, every box one pixel past the segment's last row and column.

A protocol decides the text side (`class_embeddings`), which segments become regions and how (`regions`), and how a
per-class accuracy is rounded (`round_accuracy`); `declip_hf.segmentation.evaluate` runs the loop.
"""

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .segmenter import ClassEmbeddings, split_class_names

# The 63 prompt templates of ViLD (Gu et al. 2022) as the authors' `tools/generate_text_embeddings.py` lists them
# (`multiple_templates`), in their order. `{article}` is "a" or "an", chosen from the category name.
VILD_TEMPLATES = (
    "There is {article} {} in the scene.",
    "There is the {} in the scene.",
    "a photo of {article} {} in the scene.",
    "a photo of the {} in the scene.",
    "a photo of one {} in the scene.",
    "itap of {article} {}.",
    "itap of my {}.",
    "itap of the {}.",
    "a photo of {article} {}.",
    "a photo of my {}.",
    "a photo of the {}.",
    "a photo of one {}.",
    "a photo of many {}.",
    "a good photo of {article} {}.",
    "a good photo of the {}.",
    "a bad photo of {article} {}.",
    "a bad photo of the {}.",
    "a photo of a nice {}.",
    "a photo of the nice {}.",
    "a photo of a cool {}.",
    "a photo of the cool {}.",
    "a photo of a weird {}.",
    "a photo of the weird {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of a clean {}.",
    "a photo of the clean {}.",
    "a photo of a dirty {}.",
    "a photo of the dirty {}.",
    "a bright photo of {article} {}.",
    "a bright photo of the {}.",
    "a dark photo of {article} {}.",
    "a dark photo of the {}.",
    "a photo of a hard to see {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of {article} {}.",
    "a low resolution photo of the {}.",
    "a cropped photo of {article} {}.",
    "a cropped photo of the {}.",
    "a close-up photo of {article} {}.",
    "a close-up photo of the {}.",
    "a jpeg corrupted photo of {article} {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of {article} {}.",
    "a blurry photo of the {}.",
    "a pixelated photo of {article} {}.",
    "a pixelated photo of the {}.",
    "a black and white photo of the {}.",
    "a black and white photo of {article} {}.",
    "a plastic {}.",
    "the plastic {}.",
    "a toy {}.",
    "the toy {}.",
    "a plushie {}.",
    "the plushie {}.",
    "a cartoon {}.",
    "the cartoon {}.",
    "an embroidered {}.",
    "the embroidered {}.",
    "a painting of the {}.",
    "a painting of a {}.",
)

# The authors' data.py: boxes whose area (in original pixels) is under 8^2 or over 1024^2 are left out, and at most
# the first 100 segments of an image are read.
MIN_BOX_SIDE, MAX_BOX_SIDE, MAX_SEGMENTS_PER_IMAGE = 8, 1024, 100


def vild_article(name: str) -> str:
    """ "an" when the raw name starts with a vowel letter, else "a" (the authors look only at the first letter)."""
    return "an" if name[0] in "aeiou" else "a"


def vild_name(name: str) -> str:
    """The authors' `processed_name(name, rm_dot=True)`: `_` -> space, `/` -> " or ", lower case, trailing dots
    dropped. Dashes stay: "wall-other-merged" is embedded as written."""
    return name.replace("_", " ").replace("/", " or ").lower().rstrip(".")


def vild_prompts(name: str) -> list[str]:
    """The 63 prompts of one category: each template filled with the processed name and the raw name's article,
    then "This is " put before every prompt that starts with "a" or "the" (so also before "an embroidered ...")."""
    filled = [template.format(vild_name(name), article=vild_article(name)) for template in VILD_TEMPLATES]
    return ["This is " + prompt if prompt.startswith(("a", "the")) else prompt for prompt in filled]


@dataclass
class ImageRegions:
    boxes: torch.Tensor  # (K, 4) xyxy normalised in the padded square frame
    masks: torch.Tensor  # (K, h, w) weights in the padded square frame (protocol-dependent resolution)
    class_indices: torch.Tensor  # (K,)


def segments_as_list(segments) -> list[dict]:
    """`datasets` may hand a list of dicts or, for a `Sequence` of structs, a dict of lists."""
    if isinstance(segments, dict):
        keys = list(segments)
        return [dict(zip(keys, values)) for values in zip(*(segments[key] for key in keys))]
    return list(segments)


def panoptic_segment_ids(panoptic) -> torch.Tensor:
    """(H, W) segment ids of a COCO panoptic PNG: id = R + 256 G + 256^2 B (panopticapi's `rgb2id`)."""
    rgb = np.array(panoptic.convert("RGB")).astype(np.int64)
    return torch.from_numpy(rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2])


def _class_of(segment: dict, category_to_class: dict) -> int:
    if segment["category_id"] not in category_to_class:
        raise ValueError(f"Segment category id {segment['category_id']} is not among the spec's categories.")
    return category_to_class[segment["category_id"]]


def _empty_regions(mask_size: tuple[int, int]) -> ImageRegions:
    return ImageRegions(torch.zeros(0, 4), torch.zeros(0, *mask_size), torch.zeros(0, dtype=torch.long))


def resize_longest_mask(masks: torch.Tensor, size: int) -> torch.Tensor:
    """(K, H, W) 0/1 masks -> (K, size, size) booleans, as the authors' `ResizeLongest(size, fill=0)` then `> 0`:
    longest side to `size` (sides by Python's round), bicubic on the tensor without antialiasing (torchvision 0.15,
    which the authors pin, does not antialias tensors), zero padding right and bottom, then every positive value
    kept. Bicubic overshoot can reach a cell the segment barely touches; a small segment can also vanish."""
    _, height, width = masks.shape
    scale = size / max(height, width)
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    resized = F.interpolate(masks[:, None].float(), size=(new_height, new_width), mode="bicubic", align_corners=False)
    padded = F.pad(resized[:, 0], (0, size - new_width, 0, size - new_height))
    return padded > 0


class AuthorsRegionProtocol:
    """The DeCLIP authors' region classification (see the module docstring)."""

    name = "authors"

    def class_names(self, categories: list[dict]) -> list[str]:
        # One raw panoptic name per class ("wall-other-merged", "person"): no synonyms, no cleaning.
        return [category["name"] for category in categories]

    def class_embeddings(self, segmenter, categories: list[dict]) -> ClassEmbeddings:
        """normalise(mean of the 63 normalised ViLD prompt embeddings), one per class (generate_text_embeddings.py)."""
        embeds = segmenter.embed_prompt_ensembles([vild_prompts(name) for name in self.class_names(categories)])
        return ClassEmbeddings(name_embeds=embeds, name_to_class=torch.arange(len(categories)))

    def regions(self, panoptic, segments, category_to_class: dict, is_thing: torch.Tensor, grid_size: int,
                skipped: Counter) -> ImageRegions:
        """Boxes in the padded frame and binary masks on the (grid_size, grid_size) feature grid (data.py's
        COCOPanopticDataset): things take the annotation's `bbox` (x, y, w, h; panopticapi's box, one pixel past
        the last column and row) or, without one, that same box from the mask; stuff boxes are the mask's first
        and last pixel (no + 1). Crowd segments are kept. The box area decides the size filter."""
        segment_ids = panoptic_segment_ids(panoptic)
        height, width = segment_ids.shape
        boxes, masks, class_indices = [], [], []
        for segment in segments_as_list(segments)[:MAX_SEGMENTS_PER_IMAGE]:
            class_index = _class_of(segment, category_to_class)
            mask = segment_ids == segment["id"]
            if not mask.any():
                skipped["empty_regions"] += 1
                continue
            x, y, box_width, box_height = self._box(segment, mask, bool(is_thing[class_index]))
            if not MIN_BOX_SIDE**2 <= box_width * box_height <= MAX_BOX_SIDE**2:
                skipped["box_area_out_of_range"] += 1
                continue
            boxes.append(torch.tensor([x, y, x + box_width, y + box_height], dtype=torch.float32))
            masks.append(mask)
            class_indices.append(class_index)
        if not boxes:
            return _empty_regions((grid_size, grid_size))
        # Normalised by the padded square: the authors scale by 560 / longest side, then divide by 560.
        return ImageRegions(torch.stack(boxes) / max(height, width),
                            resize_longest_mask(torch.stack(masks), grid_size).float(), torch.tensor(class_indices))

    @staticmethod
    def _box(segment: dict, mask: torch.Tensor, is_thing: bool) -> tuple[float, float, float, float]:
        rows, cols = torch.nonzero(mask, as_tuple=True)
        x0, y0, x1, y1 = (int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max()))
        if not is_thing:
            return x0, y0, x1 - x0, y1 - y0  # their `mask2box`: last pixel, not one past it
        if segment.get("bbox") is not None:
            return tuple(float(value) for value in segment["bbox"])
        return x0, y0, x1 - x0 + 1, y1 - y0 + 1

    @staticmethod
    def round_accuracy(per_class: torch.Tensor) -> torch.Tensor:
        # zero_shot.py's `_macc` takes each class's accuracy through half precision before averaging.
        return per_class.half().float()


class AreaWeightedRegionProtocol:
    """This project's earlier region classification (see the module docstring)."""

    name = "area_weighted"

    def class_names(self, categories: list[dict]) -> list[str]:
        # Cleaned names with synonyms ("person; person in shirt; ..."), where the spec gives them.
        return [category.get("synonyms") or category["name"] for category in categories]

    def class_embeddings(self, segmenter, categories: list[dict]) -> ClassEmbeddings:
        return segmenter.encode_classes(self.class_names(categories))

    def regions(self, panoptic, segments, category_to_class: dict, is_thing: torch.Tensor, grid_size: int,
                skipped: Counter) -> ImageRegions:
        """Every non-crowd segment: its box one pixel past its last row and column, its full-resolution mask
        padded to the square frame (mask pooling then weighs each patch by the share the mask covers)."""
        segment_ids = panoptic_segment_ids(panoptic)
        height, width = segment_ids.shape
        side = max(height, width)
        boxes, masks, class_indices = [], [], []
        for segment in segments_as_list(segments):
            if segment.get("iscrowd", 0):
                skipped["crowd_regions"] += 1
                continue
            class_index = _class_of(segment, category_to_class)
            mask = segment_ids == segment["id"]
            rows, cols = torch.nonzero(mask, as_tuple=True)
            if len(rows) == 0:
                skipped["empty_regions"] += 1
                continue
            boxes.append(torch.stack([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]).float() / side)
            masks.append(F.pad(mask.float(), (0, side - width, 0, side - height)))
            class_indices.append(class_index)
        if not boxes:
            return _empty_regions((side, side))
        return ImageRegions(torch.stack(boxes), torch.stack(masks), torch.tensor(class_indices))

    @staticmethod
    def round_accuracy(per_class: torch.Tensor) -> torch.Tensor:
        return per_class


REGION_PROTOCOLS = {protocol.name: protocol for protocol in (AuthorsRegionProtocol(), AreaWeightedRegionProtocol())}
DEFAULT_REGION_PROTOCOL = "authors"


def get_region_protocol(name: str):
    if name not in REGION_PROTOCOLS:
        raise ValueError(f"Unknown region protocol {name!r}; choose one of {', '.join(REGION_PROTOCOLS)}.")
    return REGION_PROTOCOLS[name]


def check_region_categories(categories: list[dict], protocol_name: str) -> None:
    """Raise a ValueError unless every category has an id, a name and `isthing`, and the protocol's class names
    are unique."""
    protocol = get_region_protocol(protocol_name)
    for category in categories:
        missing = [key for key in ("id", "name", "isthing") if key not in category]
        if missing:
            raise ValueError(f"Category {category!r} lacks {missing}; each needs id, name and isthing.")
    split_class_names(protocol.class_names(categories))
