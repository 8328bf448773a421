"""The frozen teachers of DeCLIP's distillation (docs/method.md §4): the starting CLIP, which embeds the grid
crops for the content loss, and a DINOv2 vision foundation model (VFM), whose patch tokens give the context loss.

Both run in eval mode without gradients, optionally in half precision, and are never wrapped by Accelerate: they
have nothing to synchronise, and DDP would refuse modules without trainable parameters.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from declip_hf import DeCLIPVisionModel
from declip_hf.modeling_declip import tokens_to_map

# VFM model types -> number of tokens before the patch tokens in `last_hidden_state` (CLS, then any registers).
VFM_PREFIX_TOKENS = {
    "dinov2": lambda config: 1,
    "dinov2_with_registers": lambda config: 1 + config.num_register_tokens,
}


def check_vfm_config(config: PretrainedConfig, name: str) -> None:
    """Fail with a message that says what to pass when `name` is not a DINOv2 checkpoint."""
    if config.model_type not in VFM_PREFIX_TOKENS:
        raise ValueError(
            f"--vfm {name!r} is a {config.model_type!r} model; the context teacher must be one of "
            f"{', '.join(VFM_PREFIX_TOKENS)} (e.g. facebook/dinov2-base or facebook/dinov2-with-registers-base)."
        )


def freeze(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    return model.to(dtype=dtype).eval().requires_grad_(False)


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


class FrozenVFM(nn.Module):
    """A DINOv2 (with or without registers): its final-layer-normed patch tokens laid out as a grid."""

    def __init__(self, model: PreTrainedModel, dtype: torch.dtype = torch.float32):
        super().__init__()
        check_vfm_config(model.config, model.config.name_or_path)
        self.model = freeze(model, dtype)
        self.dtype = dtype
        self.num_prefix_tokens = VFM_PREFIX_TOKENS[model.config.model_type](model.config)

    @property
    def patch_size(self) -> int:
        return self.model.config.patch_size

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, V, V) -> (B, C, V / patch, V / patch) float32 patch features (CLS and registers dropped)."""
        height, width = pixel_values.shape[-2:]
        tokens = self.model(pixel_values=pixel_values.to(self.dtype)).last_hidden_state  # after the final layernorm
        patches = tokens[:, self.num_prefix_tokens :].float()  # (B, N, C)
        return tokens_to_map(patches, height // self.patch_size, width // self.patch_size)
