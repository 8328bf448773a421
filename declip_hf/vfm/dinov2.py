"""DINOv2 (with or without registers) as context teacher (docs/method.md §9)."""

import torch

from ..models.modeling_declip import tokens_to_map

from .base import VFMAdapter


class Dinov2Adapter(VFMAdapter):
    """The last block's tokens after the final layer norm (`last_hidden_state`), CLS and registers dropped."""

    model_types = ("dinov2", "dinov2_with_registers")

    def __init__(self, model):
        super().__init__(model)
        # Tokens before the patch tokens in `last_hidden_state`: CLS, then any registers.
        self.num_prefix_tokens = 1 + getattr(model.config, "num_register_tokens", 0)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        patch = self.model.config.patch_size
        tokens = self.model(pixel_values=pixel_values).last_hidden_state  # position embedding resized inside
        return tokens_to_map(tokens[:, self.num_prefix_tokens :], height // patch, width // patch)
