"""Region and mask pooling over DeCLIP's dense feature maps (DeCLIP, CVPR 2025, docs/method.md §2).

Both poolings run in float32 whatever the map's dtype (and with autocast off), then return the map's dtype, so a
bf16 model gives bf16 region features as it gives bf16 dense features. Inputs that would pool nothing (an empty or
reversed box, an all-zero mask) or read outside the map raise a `ValueError` naming the offending box or mask:
their feature would otherwise be a zero vector, NaN, or (for a huge box) a crash inside RoIAlign.
"""

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

# Normalised coordinates this far outside [0, 1] are float rounding of an edge (pixel edges / image size) and are
# clamped; anything further out is a caller's mistake (pixel coordinates, a wrong frame) and is refused.
BOX_EDGE_TOLERANCE = 1e-4


def _check_per_image_list(items, name: str, batch_size: int):
    if isinstance(items, torch.Tensor) or not isinstance(items, (list, tuple)):
        raise TypeError(
            f"`{name}` must be a list with one tensor per image (e.g. `[{name}]` for a single image), "
            f"got {type(items).__name__}."
        )
    if len(items) != batch_size:
        raise ValueError(f"Got {len(items)} {name} lists for a batch of {batch_size} images; pass one per image.")


def _check_boxes(image_boxes: torch.Tensor, image_index: int) -> torch.Tensor:
    """(K, 4) normalised xyxy -> the same as float32, clamped to [0, 1] within `BOX_EDGE_TOLERANCE`."""
    if not isinstance(image_boxes, torch.Tensor) or image_boxes.ndim != 2 or image_boxes.shape[-1] != 4:
        shape = tuple(image_boxes.shape) if isinstance(image_boxes, torch.Tensor) else type(image_boxes).__name__
        raise ValueError(f"boxes[{image_index}] must be a (K, 4) tensor of xyxy boxes, got {shape}.")
    boxes = image_boxes.to(torch.float32)
    problems = {
        "has a NaN or infinite coordinate": ~torch.isfinite(boxes).all(dim=1),
        "lies outside [0, 1] (boxes are normalised by the image's width and height, not in pixels)": (
            (boxes < -BOX_EDGE_TOLERANCE) | (boxes > 1 + BOX_EDGE_TOLERANCE)
        ).any(dim=1),
        "is empty or reversed (needs x1 < x2 and y1 < y2)": (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]),
    }
    for problem, is_bad in problems.items():
        if is_bad.any():
            box_index = int(is_bad.nonzero()[0])
            raise ValueError(f"boxes[{image_index}][{box_index}] = {image_boxes[box_index].tolist()} {problem}.")
    return boxes.clamp(0.0, 1.0)


def _check_masks(image_masks: torch.Tensor, image_index: int) -> torch.Tensor:
    """(K, H, W) non-negative weights -> the same as float32; refuses masks that select nothing."""
    if not isinstance(image_masks, torch.Tensor) or image_masks.ndim != 3:
        shape = tuple(image_masks.shape) if isinstance(image_masks, torch.Tensor) else type(image_masks).__name__
        raise ValueError(f"masks[{image_index}] must be a (K, H, W) tensor, one mask per row, got {shape}.")
    if 0 in image_masks.shape[1:]:
        raise ValueError(f"masks[{image_index}] has shape {tuple(image_masks.shape)}: a mask needs pixels.")
    weights = image_masks.to(torch.float32)
    problems = {
        "has NaN or infinite values": ~torch.isfinite(weights).flatten(1).all(dim=1),
        "has negative values (masks are weights: bool, 0/1 or soft in [0, 1])": (weights < 0).flatten(1).any(dim=1),
        "is empty (all False / zero), so it selects no feature": weights.flatten(1).sum(dim=1) <= 0,
    }
    for problem, is_bad in problems.items():
        if is_bad.any():
            raise ValueError(f"masks[{image_index}][{int(is_bad.nonzero()[0])}] {problem}.")
    return weights


def check_boxes(boxes: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Validate one (K_i, 4) box tensor per image (see `pool_boxes`); returns them as float32, clamped to [0, 1]."""
    _check_per_image_list(boxes, "boxes", batch_size)
    return [_check_boxes(image_boxes, index) for index, image_boxes in enumerate(boxes)]


def check_masks(masks: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Validate one (K_i, H, W) mask tensor per image (see `pool_masks`); returns them as float32 weights."""
    _check_per_image_list(masks, "masks", batch_size)
    return [_check_masks(image_masks, index) for index, image_masks in enumerate(masks)]


def pool_boxes(dense_embeds: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
    """RoIAlign one vector per box from a dense map (normalised or not: the pooled vectors are normalised after).

    Args:
        dense_embeds: (B, D, h, w); the OpenAI-CLIP path passes it L2-normalised over D (docs/method.md §2), the
            EVA02 path raw (§8).
        boxes: one (K_i, 4) tensor per image, xyxy normalised to [0, 1] in the (padded) input frame, with x1 < x2 and
            y1 < y2. Corners within `BOX_EDGE_TOLERANCE` outside [0, 1] are clamped; others raise a `ValueError`.

    Returns:
        (sum K_i, D) L2-normalised region embeddings in the order of `boxes`, pooled in float32 and returned in
        `dense_embeds.dtype`.
    """
    batch_size, _, grid_height, grid_width = dense_embeds.shape
    checked = check_boxes(boxes, batch_size)
    to_grid = torch.tensor(
        [grid_width, grid_height, grid_width, grid_height], dtype=torch.float32, device=dense_embeds.device
    )
    # Boxes stay float32 even under bf16 autocast: bf16 would move a corner by up to a quarter of a patch.
    rois = [image_boxes.to(dense_embeds.device) * to_grid for image_boxes in checked]
    with torch.autocast(dense_embeds.device.type, enabled=False):
        # aligned=True: box corners are continuous coordinates, pixel centres sit at +0.5 (the detectron2 convention).
        pooled = roi_align(
            dense_embeds.float(), rois, output_size=1, spatial_scale=1.0, sampling_ratio=-1, aligned=True
        )
        return F.normalize(pooled.flatten(1), dim=-1).to(dense_embeds.dtype)


def pool_masks(dense_embeds: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """Mask-weighted mean of a dense map (normalised or not: the means are normalised after), one vector per mask.

    Args:
        dense_embeds: (B, D, h, w); the OpenAI-CLIP path passes it L2-normalised over D (docs/method.md §2), the
            EVA02 path raw (§8).
        masks: one (K_i, H, W) tensor per image: bool, 0/1 or soft non-negative weights (any scale: the mean is
            normalised by the mask's total), each selecting at least one pixel. Any resolution: the mask is
            area-resized onto the h x w grid, i.e. assumed to cover the same frame as the map.

    Returns:
        (sum K_i, D) L2-normalised mask embeddings in the order of `masks`, pooled in float32 and returned in
        `dense_embeds.dtype`.
    """
    batch_size, _, grid_height, grid_width = dense_embeds.shape
    checked = check_masks(masks, batch_size)
    pooled = []
    with torch.autocast(dense_embeds.device.type, enabled=False):
        for image_features, image_masks in zip(dense_embeds.float(), checked):
            # The method only asks for masks resized to the grid (docs/method.md §2). Area resizing weighs each patch
            # by the share of it the mask covers, so a mask smaller than a patch still counts; bilinear sampling
            # reads about one pixel in sixteen per patch and can miss it entirely (its feature would be zero).
            weights = F.interpolate(
                image_masks[:, None].to(image_features.device), size=(grid_height, grid_width), mode="area"
            ).flatten(1)  # (K, h*w)
            features = image_features.flatten(1)  # (D, h*w)
            pooled.append((weights @ features.T) / weights.sum(dim=1, keepdim=True))
        return F.normalize(torch.cat(pooled), dim=-1).to(dense_embeds.dtype)
