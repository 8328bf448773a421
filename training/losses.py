"""DeCLIP's two distillation losses (CVPR 2025, arXiv 2505.04410; docs/method.md §4).

- Content (self-distillation): RoI features of the student's dense content map should match the frozen CLIP
  teacher's image embedding of the same crop.
- Context (VFM distillation): the patch-to-patch cosine correlation of the student's context features should match
  the one of a frozen DINOv2's patch tokens.
"""

import torch
import torch.nn.functional as F
from torch import nn

from declip_hf.modeling_declip import tokens_to_map
from declip_hf.region_pooling import pool_boxes


def valid_boxes(boxes: torch.Tensor, crop_valid: torch.Tensor) -> list[torch.Tensor]:
    """(B, max_crops, 4) boxes and (B, max_crops) mask -> one (K_i, 4) tensor of the valid boxes per image."""
    return [image_boxes[image_valid] for image_boxes, image_valid in zip(boxes, crop_valid)]


def content_loss(
    dense_embeds: torch.Tensor, boxes: torch.Tensor, crop_valid: torch.Tensor, teacher_embeds: torch.Tensor
) -> torch.Tensor:
    """`1 - mean_i <t_i, r_i>` over every valid crop of the batch.

    Args:
        dense_embeds: (B, D, h, w) student content map, L2-normalised over D.
        boxes: (B, max_crops, 4) crop boxes, xyxy normalised to the student view.
        crop_valid: (B, max_crops) bool, which crop slots hold a real crop.
        teacher_embeds: (K, D) L2-normalised teacher embeddings of the valid crops, in the row-major order of
            `crop_valid` (i.e. `crops[crop_valid]`).
    """
    region_embeds = pool_boxes(dense_embeds.float(), valid_boxes(boxes, crop_valid))  # (K, D), normalised
    if region_embeds.shape != teacher_embeds.shape:
        raise ValueError(f"{region_embeds.shape[0]} valid boxes but {teacher_embeds.shape[0]} teacher crop embeddings.")
    return 1.0 - (region_embeds * teacher_embeds.float()).sum(dim=-1).mean()


def cosine_correlation(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, N, N) with N = h*w: the Gram matrix of the L2-normalised patch rows."""
    rows = F.normalize(feature_map.float().flatten(2).transpose(1, 2), dim=-1)  # (B, N, C)
    return rows @ rows.transpose(1, 2)


def context_loss(
    context_features: tuple[torch.Tensor, ...], student_grid: tuple[int, int], vfm_map: torch.Tensor
) -> torch.Tensor:
    """Mean over images and rows i of `|| R_vfm[i, :] - R_clip[i, :] ||_2`.

    Args:
        context_features: the student's context features, each (B, N, C) on `student_grid`; with several (csa: q, k;
            all: q, k, v) R_clip is the mean of their correlations.
        student_grid: (h, w) of the student's patch grid.
        vfm_map: (B, C_vfm, g_h, g_w) VFM patch tokens.
    """
    vfm_grid = tuple(vfm_map.shape[-2:])
    target = cosine_correlation(vfm_map)
    correlations = []
    for feature in context_features:
        feature_map = tokens_to_map(feature.float(), *student_grid)
        if tuple(student_grid) != vfm_grid:
            feature_map = F.interpolate(feature_map, size=vfm_grid, mode="bilinear", align_corners=False)
        correlations.append(cosine_correlation(feature_map))
    student = torch.stack(correlations).mean(dim=0)
    return torch.linalg.vector_norm(target - student, dim=-1).mean()


class DeCLIPLoss(nn.Module):
    """`content_weight * L_content + context_weight * L_context`, returned with its terms by name.

    Args:
        content_weight (`float`, *optional*, defaults to 1.0): weight of the self-distillation (content) loss.
        context_weight (`float`, *optional*, defaults to 0.1): weight of the VFM (context) loss.
    """

    def __init__(self, content_weight: float = 1.0, context_weight: float = 0.1):
        super().__init__()
        self.content_weight = content_weight
        self.context_weight = context_weight

    def forward(
        self,
        dense_embeds: torch.Tensor,
        context_features: tuple[torch.Tensor, ...],
        boxes: torch.Tensor,
        crop_valid: torch.Tensor,
        teacher_embeds: torch.Tensor,
        vfm_map: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Returns `{"content", "context", "total"}`, scalars; see `content_loss` and `context_loss` for shapes."""
        content = content_loss(dense_embeds, boxes, crop_valid, teacher_embeds)
        context = context_loss(context_features, tuple(dense_embeds.shape[-2:]), vfm_map)
        total = self.content_weight * content + self.context_weight * context
        return {"content": content, "context": context, "total": total}
