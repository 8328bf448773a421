"""Configuration of the DeCLIP EVA02-CLIP vision model (the authors' student, docs/method.md §8)."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .configuration_declip import check_decoupled_attention


@strict
class DeCLIPEvaVisionConfig(PreTrainedConfig):
    r"""
    Configuration of a [`DeCLIPEvaVisionModel`]: EVA02-CLIP's vision tower (docs/method.md §8) whose final block can be
    read in DeCLIP's decoupled way. The defaults are EVA02-CLIP-B/16 at 224 px.

    Args:
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: the transformer's width, depth, heads
            and SwiGLU hidden size (`int(width * 2.6667)` in EVA02).
        image_size, patch_size, num_channels: the input the absolute position embedding was trained for (it is
            resized bicubically for other sizes) and the patch size.
        projection_dim: size of the joint image-text space (the `head` output).
        rope_reference_grid: the grid the 2-D rotary embedding was trained at (`pt_hw_seq_len`, 16): a grid of n
            patches along an axis uses positions `arange(n) / n * rope_reference_grid`.
        rope_theta: the rotary embedding's base.
        layer_norm_eps: every layer norm's epsilon (1e-6 in EVA02).
        decoupled_attention: as in [`DeCLIPVisionConfig`].
    """

    model_type = "declip_eva_vision_model"

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 2048
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    projection_dim: int = 512
    rope_reference_grid: int = 16
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    decoupled_attention: str = "csa"

    def __setattr__(self, name, value):
        # As DeCLIPVisionConfig: checked on every assignment, so `from_pretrained(..., decoupled_attention=x)` is too.
        if name == "decoupled_attention":
            check_decoupled_attention(value)
        super().__setattr__(name, value)

    def validate_architecture(self):
        """Part of `@strict` validation: heads must split the width, and the rotary embedding needs a head size
        divisible by 4 (half of it per axis, rotated in pairs)."""
        if self.hidden_size % self.num_attention_heads or (self.hidden_size // self.num_attention_heads) % 4:
            raise ValueError(
                f"hidden_size {self.hidden_size} must split into {self.num_attention_heads} heads whose size is a "
                "multiple of 4 (EVA02's 2-D rotary embedding rotates pairs along each axis)."
            )
