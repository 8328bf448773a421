"""SAM's image encoder as context teacher, through transformers' `SamModel` / `SamVisionModel` (e.g.
facebook/sam-vit-base, facebook/sam-vit-large; docs/method.md §9), at any input size that is a multiple of its patch.

transformers' `SamVisionEncoder` only accepts its pretraining size (1024 px): `SamPatchEmbeddings` refuses any
other, and the absolute position embedding is a fixed (1, 64, 64, C) grid added as is. This adapter runs the
encoder's own modules in the encoder's order, with those two steps done for the view's grid: the patch projection
without the size check, and the position embedding resized bicubically (align_corners=False, as the authors' SAM
fork does). The relative-position tables of the global-attention blocks need nothing here: transformers'
`SamVisionAttention.get_rel_pos` already resizes them linearly to `2 * grid - 1` entries on every call, as SAM's
own code does for other sizes (windowed blocks keep their 14 x 14 windows and pad).
"""

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from .base import VFMAdapter


def resized_position_embedding(position_embedding: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, H, W, C) absolute position embedding -> (1, h, w, C) for a grid of h x w patches, bicubic."""
    if tuple(position_embedding.shape[1:3]) == tuple(grid):
        return position_embedding
    channels_first = position_embedding.permute(0, 3, 1, 2).float()  # (1, C, H, W); bicubic wants float32 on CPU
    resized = F.interpolate(channels_first, size=grid, mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).to(position_embedding.dtype)


class SamAdapter(VFMAdapter):
    """The whole image encoder including its neck: (B, output_channels, g, g), 256 channels for the Hub SAMs.
    Only the vision encoder is kept (the prompt encoder and mask decoder are dropped)."""

    model_types = ("sam", "sam_vision_model")

    @staticmethod
    def patch_size(config: PretrainedConfig) -> int:
        vision_config = getattr(config, "vision_config", config)  # SamConfig nests it; SamVisionConfig is it
        return vision_config.patch_size

    def __init__(self, model):
        super().__init__(model.vision_encoder)  # SamModel and SamVisionModel both hold it under this name

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        encoder = self.model
        # `patch_embed.projection` is SamPatchEmbeddings' convolution; (B, 3, V, V) -> (B, g, g, C)
        hidden_states = encoder.patch_embed.projection(pixel_values).permute(0, 2, 3, 1)
        if encoder.pos_embed is not None:
            hidden_states = hidden_states + resized_position_embedding(encoder.pos_embed, hidden_states.shape[1:3])
        for layer in encoder.layers:
            hidden_states = layer(hidden_states)
        return encoder.neck(hidden_states)  # (B, g, g, C) -> (B, output_channels, g, g)
