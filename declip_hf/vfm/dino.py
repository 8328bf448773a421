"""DINO (v1) as context teacher, through transformers' `ViTModel` (e.g. facebook/dino-vitb16, facebook/dino-vitb8;
docs/method.md §9)."""

import torch

from ..models.modeling_declip import tokens_to_map

from .base import VFMAdapter


class DinoAdapter(VFMAdapter):
    """The last block after the final layer norm, CLS dropped: what DINO's `get_intermediate_layers(x)[0]` gives
    (the authors' choice). Any `ViTModel` checkpoint is read this way.

    The position embedding is resized by transformers' `interpolate_pos_encoding` (bicubic to the exact grid);
    DINO's own code resizes by a scale factor with a 0.1 offset, which can differ by a fraction of a cell.
    """

    model_types = ("vit",)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        patch = self.model.config.patch_size
        tokens = self.model(pixel_values=pixel_values, interpolate_pos_encoding=True).last_hidden_state
        return tokens_to_map(tokens[:, 1:], height // patch, width // patch)  # (B, N, C) -> (B, C, h, w)
