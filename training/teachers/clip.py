"""The content teacher: the frozen starting CLIP (docs/method.md §4).

The teacher embeds every crop through the CLS path, and in the last layer the patch tokens' own outputs never reach
the CLS token: only their keys and values do. So the last layer runs for the CLS query alone (keys and values of
every token, then the CLS row's attention, residual and MLP), which gives the same embedding as the model's
`get_image_features` (tested to float rounding) for about 7% less work per ViT-B/16 crop at 224 px (the last layer's
queries, attention output and MLP of 196 patch tokens). One function per student family, chosen by the config's
`model_type` once, in `__init__`.
"""

import torch
import torch.nn.functional as F
from torch import nn

from declip_hf import DeCLIPEvaVisionConfig, DeCLIPEvaVisionModel, DeCLIPVisionConfig, DeCLIPVisionModel
from declip_hf.models.modeling_declip import _merge_heads, _split_heads
from declip_hf.models.modeling_declip_eva import apply_rotary

from .base import freeze


def clip_cls_embeddings(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP: (K, 3, T, T) -> (K, projection_dim) unnormalised, as `get_image_features(...).pooler_output`."""
    hidden_states = model._encode_before_last_layer(pixel_values)  # 11 full layers, (K, 1+N, C)
    last = model.encoder.layers[-1]
    attention, normed = last.self_attn, last.layer_norm1(hidden_states)
    query, key, value = (_split_heads(projection, attention.num_heads) for projection in (
        attention.q_proj(normed[:, :1]), attention.k_proj(normed), attention.v_proj(normed)))
    attended = F.scaled_dot_product_attention(query, key, value, scale=attention.scale)  # (K, H, 1, d)
    cls_token = hidden_states[:, :1] + attention.out_proj(_merge_heads(attended))  # (K, 1, C)
    cls_token = cls_token + last.mlp(last.layer_norm2(cls_token))
    return model.visual_projection(model.post_layernorm(cls_token[:, 0]))


def eva_cls_embeddings(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """EVA02-CLIP: the same for its last block (q and v biases, rotary keys with the CLS row unrotated, sub-LN)."""
    grid = model._grid_size(model._check_pixel_values(pixel_values))
    hidden_states, rope = model._embed(pixel_values, grid)
    for block in model.blocks[:-1]:
        hidden_states = block(hidden_states, rope)
    last = model.blocks[-1]
    attention, normed = last.attn, last.norm1(hidden_states)
    heads = attention.num_heads
    query = _split_heads(F.linear(normed[:, :1], attention.q_proj.weight, attention.q_bias), heads)  # never rotated
    key = apply_rotary(_split_heads(attention.k_proj(normed), heads), rope)
    value = _split_heads(F.linear(normed, attention.v_proj.weight, attention.v_bias), heads)
    attended = F.scaled_dot_product_attention(query, key, value)  # (K, H, 1, d), scale 1/sqrt(d) as in EvaAttention
    cls_token = hidden_states[:, :1] + attention.output(attended)
    cls_token = cls_token + last.mlp(last.norm2(cls_token))
    return model.head(model.norm(cls_token[:, 0]))


# The student family's config model_type -> its teacher's CLS embedding.
CLS_EMBEDDINGS = {
    DeCLIPVisionConfig.model_type: clip_cls_embeddings,
    DeCLIPEvaVisionConfig.model_type: eva_cls_embeddings,
}


class FrozenCLIPTeacher(nn.Module):
    """The starting CLIP: normalised image embeddings (CLS path, plain CLIP forward) of the grid crops."""

    def __init__(self, model: DeCLIPVisionModel | DeCLIPEvaVisionModel, dtype: torch.dtype = torch.float32):
        super().__init__()
        model_type = model.config.model_type
        if model_type not in CLS_EMBEDDINGS:
            raise ValueError(f"No content teacher for a {model_type!r} model; expected one of {sorted(CLS_EMBEDDINGS)}.")
        self.model = freeze(model, dtype)
        self.dtype = dtype
        self.cls_embeddings = CLS_EMBEDDINGS[model_type]

    @torch.no_grad()
    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """(K, 3, T, T) crops -> (K, D) float32, L2-normalised."""
        return F.normalize(self.cls_embeddings(self.model, crops.to(self.dtype)).float(), dim=-1)
