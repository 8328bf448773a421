"""DeCLIP's two distillation losses (CVPR 2025, arXiv 2505.04410; docs/method.md §4).

- Content (self-distillation): RoI features of the student's dense content map should match the frozen CLIP
  teacher's image embedding of the same crop.
- Context (VFM distillation): the patch-to-patch cosine correlation of the student's context features should match
  the one of a frozen VFM's patch features (DINOv2, DINO or SAM; with several, a weighted sum, docs/method.md §9).

Also the training schemes of `--ablation` (docs/method.md §10): which student features each loss reads.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from declip_hf.models.modeling_declip import tokens_to_map
from declip_hf.models.region_pooling import pool_boxes


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


def decoupled_context(dense) -> tuple[torch.Tensor, ...]:
    """DeCLIP: the context loss reads the decoupled layer's q/k/v projections (docs/method.md §4)."""
    return dense.context_features


def coupled_context(dense) -> tuple[torch.Tensor, ...]:
    """The authors' "sanity_check" (docs/method.md §10): the context loss reads the same projected dense tokens as
    the content loss. Their unnormalised tokens and our L2-normalised `dense_embeds` give the same cosine
    correlation."""
    return (dense.dense_embeds.flatten(2).transpose(1, 2),)  # (B, D, h, w) -> (B, N, D)


def no_context(dense) -> tuple[torch.Tensor, ...]:
    return ()


@dataclass(frozen=True)
class TrainingScheme:
    """How the student is distilled: which dense path of its last layer trains, whether context teachers are used,
    and which student features the context loss compares with theirs.

    Args:
        dense_path (`str` or `None`): the student's `decoupled_attention`; `None` keeps `--decoupled_attention`.
        uses_vfm (`bool`): whether context teachers are loaded and the context loss is computed.
        context_of (`Callable`): the student's `DeCLIPDenseOutput` -> the context features of `context_loss`.
    """

    dense_path: str | None
    uses_vfm: bool
    context_of: Callable


# --ablation: DeCLIP itself and the two baselines of the paper's Table 1 (docs/method.md §10).
TRAINING_SCHEMES = {
    "none": TrainingScheme(dense_path=None, uses_vfm=True, context_of=decoupled_context),
    # CLIPSelf: self-distillation only, on the maskclip path (value path, residuals and MLP; no attention).
    "clipself": TrainingScheme(dense_path="maskclip", uses_vfm=False, context_of=no_context),
    # Self + VFM distillation without decoupling: both losses on CLIP's ordinary last layer read densely.
    "coupled": TrainingScheme(dense_path="vanilla", uses_vfm=True, context_of=coupled_context),
}


class DeCLIPLoss(nn.Module):
    """`content_weight * L_content + context_weight * sum_i w_i L_context,i`, returned with its terms by name.

    Args:
        content_weight (`float`, *optional*, defaults to 1.0): weight of the self-distillation (content) loss.
        context_weight (`float`, *optional*, defaults to 0.1): weight of the VFM (context) loss.
        teacher_weights (`tuple[float]`, *optional*, defaults to `(1.0,)`): one weight per context teacher (an
            ensemble, `--vfm_weights`); empty for no context loss at all (the clipself ablation).
        teacher_names (`tuple[str]`, *optional*): names of the teachers' terms `context/<name>`, logged with two or
            more teachers (defaults to their indices).
    """

    def __init__(self, content_weight: float = 1.0, context_weight: float = 0.1,
                 teacher_weights: tuple[float, ...] = (1.0,), teacher_names: tuple[str, ...] | None = None):
        super().__init__()
        self.content_weight = content_weight
        self.context_weight = context_weight
        self.teacher_weights = tuple(teacher_weights)
        names = tuple(teacher_names) if teacher_names is not None else tuple(map(str, range(len(teacher_weights))))
        if len(names) != len(self.teacher_weights) or len(set(names)) != len(names):
            raise ValueError(f"teacher_names {names} must be unique, one per teacher weight {self.teacher_weights}.")
        self.teacher_terms = tuple(f"context/{name}" for name in names) if len(names) > 1 else ()

    @property
    def term_names(self) -> tuple[str, ...]:
        """The keys `forward` returns, in a fixed order (what the run logs)."""
        context = ("context", *self.teacher_terms) if self.teacher_weights else ()
        return ("content", *context, "total")

    def forward(
        self,
        dense_embeds: torch.Tensor,
        context_features: tuple[torch.Tensor, ...],
        boxes: torch.Tensor,
        crop_valid: torch.Tensor,
        teacher_embeds: torch.Tensor,
        vfm_maps: torch.Tensor | tuple[torch.Tensor, ...],
    ) -> dict[str, torch.Tensor]:
        """`term_names` -> scalars; `vfm_maps` holds one (B, C_i, g_i, g_i) map per teacher (or is the one map).
        See `content_loss` and `context_loss` for the other shapes."""
        vfm_maps = (vfm_maps,) if isinstance(vfm_maps, torch.Tensor) else tuple(vfm_maps)
        if len(vfm_maps) != len(self.teacher_weights):
            raise ValueError(f"{len(vfm_maps)} VFM feature maps for {len(self.teacher_weights)} context teachers.")
        content = content_loss(dense_embeds, boxes, crop_valid, teacher_embeds)
        terms = {"content": content}
        total = self.content_weight * content
        if vfm_maps:
            grid = tuple(dense_embeds.shape[-2:])
            per_teacher = [context_loss(context_features, grid, vfm_map) for vfm_map in vfm_maps]
            terms["context"] = sum(weight * loss for weight, loss in zip(self.teacher_weights, per_teacher))
            terms.update(zip(self.teacher_terms, per_teacher))
            total = total + self.context_weight * terms["context"]
        terms["total"] = total
        return terms
