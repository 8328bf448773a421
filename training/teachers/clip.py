"""The content teacher: the frozen starting CLIP (docs/method.md §4)."""

import torch
import torch.nn.functional as F
from torch import nn

from declip_hf import DeCLIPVisionModel

from .base import freeze


class FrozenCLIPTeacher(nn.Module):
    """The starting CLIP: normalised image embeddings (CLS path, plain CLIP forward) of the grid crops."""

    def __init__(self, model: DeCLIPVisionModel, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model = freeze(model, dtype)
        self.dtype = dtype

    @torch.no_grad()
    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """(K, 3, T, T) crops -> (K, D) float32, L2-normalised."""
        image_size = self.model.config.image_size
        interpolate = tuple(crops.shape[-2:]) != (image_size, image_size)
        embeds = self.model.get_image_features(
            crops.to(self.dtype), interpolate_pos_encoding=interpolate, return_dict=True
        ).pooler_output
        return F.normalize(embeds.float(), dim=-1)
