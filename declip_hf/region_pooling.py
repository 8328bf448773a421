"""Region and mask pooling over DeCLIP's dense feature maps (DeCLIP, CVPR 2025, docs/method.md §2)."""

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align


def pool_boxes(dense_embeds: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
    """RoIAlign one vector per box from a normalised dense map.

    Args:
        dense_embeds: (B, D, h, w), L2-normalised over D.
        boxes: one (K_i, 4) tensor per image, xyxy normalised to [0, 1] in the (padded) input frame.

    Returns:
        (sum K_i, D) L2-normalised region embeddings, in the order of `boxes`.
    """
    if len(boxes) != dense_embeds.shape[0]:
        raise ValueError(f"Got {len(boxes)} box lists for a batch of {dense_embeds.shape[0]} images.")
    _, _, grid_height, grid_width = dense_embeds.shape
    to_grid = torch.tensor(
        [grid_width, grid_height, grid_width, grid_height], dtype=torch.float32, device=dense_embeds.device
    )
    # Boxes stay float32 even under bf16 autocast: bf16 would move a corner by up to a quarter of a patch.
    rois = [image_boxes.to(dense_embeds.device, torch.float32) * to_grid for image_boxes in boxes]
    # aligned=True: box corners are continuous coordinates, pixel centres sit at +0.5 (the detectron2 convention).
    pooled = roi_align(dense_embeds.float(), rois, output_size=1, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return F.normalize(pooled.flatten(1), dim=-1)


def pool_masks(dense_embeds: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """Mask-weighted mean of a normalised dense map, one vector per mask.

    Args:
        dense_embeds: (B, D, h, w), L2-normalised over D.
        masks: one (K_i, H, W) tensor per image (binary or soft, any resolution).

    Returns:
        (sum K_i, D) L2-normalised mask embeddings, in the order of `masks`.
    """
    if len(masks) != dense_embeds.shape[0]:
        raise ValueError(f"Got {len(masks)} mask lists for a batch of {dense_embeds.shape[0]} images.")
    _, _, grid_height, grid_width = dense_embeds.shape
    pooled = []
    for image_features, image_masks in zip(dense_embeds.float(), masks):
        # docs/method.md only says "resized". Area resizing weighs each patch by the share of it the mask covers,
        # so a mask smaller than a patch still counts; bilinear sampling reads about one pixel in sixteen per patch
        # and can miss it entirely (its feature would be zero).
        weights = F.interpolate(
            image_masks[:, None].to(image_features.device, torch.float32), size=(grid_height, grid_width), mode="area"
        ).flatten(1)  # (K, h*w)
        features = image_features.flatten(1)  # (D, h*w)
        pooled.append((weights @ features.T) / (weights.sum(dim=1, keepdim=True) + 1e-12))
    return F.normalize(torch.cat(pooled), dim=-1)
