"""DeCLIP with an EVA02-CLIP student: the architecture of every checkpoint the DeCLIP authors published
(docs/method.md §8).

The layers are written here rather than wrapped from timm's `Eva` (which is the same architecture, and which the tests
compare against) because three of its behaviours differ from what §8 and this package need:
- timm resizes the absolute position embedding with antialiased bicubic interpolation (a different cubic kernel,
  a = -0.5) where the authors and the CLIP path use plain bicubic, align_corners=False;
- its rotary tables and its zero k bias are non-persistent buffers, which transformers' meta-device loading leaves
  uninitialised, so a `from_pretrained` model would not match a freshly built one;
- timm is not a dependency of the package, and a `trust_remote_code` folder should load with transformers alone.
Parameter names follow the authors' EVA-CLIP checkpoints (`q_proj` + `q_bias`, `inner_attn_ln`, `w1/w2/ffn_ln/w3`), so
converting one of their files only strips the `visual.` prefix.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import can_return_tuple

from .configuration_declip_eva import DeCLIPEvaVisionConfig
from .modeling_declip import (
    DeCLIPDenseOutput,
    DeCLIPVisionModel,
    DenseFeaturesMixin,
    SelfSimilarityAttention,
    _eager_self_similarity,
    _fused_self_similarity,
    _merge_heads,
    _split_heads,
    tokens_to_map,
)


def rotary_tables(grid_height: int, grid_width: int, head_dim: int, reference_grid: int, theta: float):
    """EVA02's 2-D rotary embedding for an h x w grid: (cos, sin), each (h*w, head_dim), rows in row-major order.

    Half of each head rotates with the row position, half with the column position; positions along an axis of n
    patches are `arange(n) / n * reference_grid` (docs/method.md §8). Built per axis, so non-square grids work (the
    authors' code assumes a square one); frequencies repeat in adjacent pairs, matching the pairwise rotation.
    """
    axis_dim = head_dim // 2
    frequencies = 1.0 / theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float32) / axis_dim)

    def axis_angles(length: int) -> torch.Tensor:
        positions = torch.arange(length, dtype=torch.float32) / length * reference_grid
        return (positions[:, None] * frequencies).repeat_interleave(2, dim=-1)  # (length, axis_dim)

    rows = axis_angles(grid_height)[:, None].expand(grid_height, grid_width, axis_dim)
    columns = axis_angles(grid_width)[None].expand(grid_height, grid_width, axis_dim)
    angles = torch.cat([rows, columns], dim=-1).reshape(grid_height * grid_width, head_dim)
    return angles.cos(), angles.sin()


def apply_rotary(tensor: torch.Tensor, tables) -> torch.Tensor:
    """Rotate adjacent channel pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin) of the patch rows (CLS untouched)."""
    cos, sin = tables
    cls_row, patches = tensor[..., :1, :], tensor[..., 1:, :]
    pairs = patches.unflatten(-1, (-1, 2))
    rotated_half = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    rotated = patches.float() * cos + rotated_half.float() * sin
    return torch.cat([cls_row, rotated.to(tensor.dtype)], dim=-2)


class EvaAttention(nn.Module):
    """Pre-norm EVA02 attention: q and v carry biases, k does not; a sub-LN on the attended values before `proj`."""

    def __init__(self, config: DeCLIPEvaVisionConfig):
        super().__init__()
        width = config.hidden_size
        self.config = config  # read for `_attn_implementation` (eager: the decoupled path's formula written out)
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.inner_attn_ln = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.proj = nn.Linear(width, width)

    def projections(self, normed: torch.Tensor, names: tuple[str, ...] = ("q", "k", "v")) -> dict[str, torch.Tensor]:
        """The projections `names` of the normed tokens, each (B, T, C), biases included (only those asked for are
        computed)."""
        project = {
            "q": lambda: F.linear(normed, self.q_proj.weight, self.q_bias),
            "k": lambda: self.k_proj(normed),
            "v": lambda: F.linear(normed, self.v_proj.weight, self.v_bias),
        }
        return {name: project[name]() for name in names}

    def output(self, attended_heads: torch.Tensor) -> torch.Tensor:
        """(B, H, T, d) attended values -> (B, T, C): merge heads, sub-LN, `proj`."""
        return self.proj(self.inner_attn_ln(_merge_heads(attended_heads)))

    def forward(self, normed: torch.Tensor, rope) -> torch.Tensor:
        heads = {name: _split_heads(tensor, self.num_heads) for name, tensor in self.projections(normed).items()}
        query, key = apply_rotary(heads["q"], rope), apply_rotary(heads["k"], rope)
        return self.output(F.scaled_dot_product_attention(query, key, heads["v"]))


class EvaSwiGLU(nn.Module):
    """SiLU(w1 x) * w2 x, sub-LN `ffn_ln`, then `w3`."""

    def __init__(self, config: DeCLIPEvaVisionConfig):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.w2 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_ln = nn.LayerNorm(config.intermediate_size, eps=config.layer_norm_eps)
        self.w3 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(hidden_states)) * self.w2(hidden_states)))


class EvaBlock(GradientCheckpointingLayer):
    """Pre-norm block without layer scale (checkpointed in training after `activation_checkpointing_enable()`)."""

    def __init__(self, config: DeCLIPEvaVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = EvaAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = EvaSwiGLU(config)

    def forward(self, hidden_states: torch.Tensor, rope) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states), rope)
        return hidden_states + self.mlp(self.norm2(hidden_states))


class EvaPatchEmbedding(nn.Module):
    def __init__(self, config: DeCLIPEvaVisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values).flatten(2).transpose(1, 2)  # (B, N, C), row-major


# --------------------------------------------------------------------------------------------------------------------
# The last block's dense paths (docs/method.md §8), keyed like modeling_declip.DECOUPLED_PATHS. Each maps (last block,
# its input (B, 1+N, C), rotary tables) to (content tokens (B, 1+N, C), context features: a tuple of (B, 1+N, C)).
# --------------------------------------------------------------------------------------------------------------------


class EvaSelfSimilarityAttention(SelfSimilarityAttention):
    """The authors' `ss_attn`: like the CLIP path's self-similarity attention (same groups: one softmax per group,
    summed), but with no 1/sqrt(d) scale, no rotary embedding, and the attended values through the sub-LN and `proj`.
    No residual, no MLP."""

    def __call__(self, block: EvaBlock, hidden_states: torch.Tensor, rope):
        attention = block.attn
        eager = attention.config._attn_implementation == "eager"
        attend = _eager_self_similarity if eager else _fused_self_similarity
        projections = attention.projections(block.norm1(hidden_states), self.projection_names)
        heads = {name: _split_heads(tensor, attention.num_heads) for name, tensor in projections.items()}
        attended = 0
        for group in self.similarity_groups:
            similarity = torch.cat([heads[name] for name in group], dim=-1)
            # Scale 1 per §8; a group of several projections averages their logits (mode `all`: (qq+kk+vv)/3).
            attended = attended + attend(similarity, heads["v"], 1.0 / len(group))
        return attention.output(attended), tuple(projections[name] for name in self.context_names)


def eva_vanilla_path(block: EvaBlock, hidden_states: torch.Tensor, rope):
    """Baseline: the ordinary last block (rotary q-k attention, residuals, MLP)."""
    return block(hidden_states, rope), ()


def eva_maskclip_path(block: EvaBlock, hidden_states: torch.Tensor, rope):
    """Baseline (MaskCLIP): attention replaced by the value path (through the block's sub-LN and `proj`, the rest of
    its attention output), residuals and MLP kept."""
    attention = block.attn
    values = attention.projections(block.norm1(hidden_states), ("v",))["v"]
    hidden_states = hidden_states + attention.proj(attention.inner_attn_ln(values))
    return hidden_states + block.mlp(block.norm2(hidden_states)), ()


EVA_DECOUPLED_PATHS = {
    "qq": EvaSelfSimilarityAttention(("q",)),
    "kk": EvaSelfSimilarityAttention(("k",)),
    "vv": EvaSelfSimilarityAttention(("v",)),
    "csa": EvaSelfSimilarityAttention(("q",), ("k",)),
    "all": EvaSelfSimilarityAttention(("q", "k", "v")),
    "vanilla": eva_vanilla_path,
    "maskclip": eva_maskclip_path,
}


class DeCLIPEvaVisionModel(DenseFeaturesMixin, PreTrainedModel):
    r"""
    EVA02-CLIP's vision tower and `head`, with DeCLIP's decoupled final block for dense features (docs/method.md §8).

    Same API as [`DeCLIPVisionModel`]: `forward` is the ordinary EVA02 forward (`pooler_output` is the final-normed
    CLS token), `get_image_features` projects it with `head`, and `get_dense_features`, `get_region_features` and
    `get_mask_features` read the last block in the mode of `config.decoupled_attention`. Unlike the OpenAI-CLIP path,
    regions and masks are pooled from the raw dense map and normalised afterwards, as the authors' EVA code does.
    Converted from the authors' checkpoints with `declip-convert CKPT --arch
    EVA02-CLIP-B-16 --out DIR`.
    """

    config: DeCLIPEvaVisionConfig
    config_class = DeCLIPEvaVisionConfig
    main_input_name = "pixel_values"
    base_model_prefix = "declip_eva"
    input_modalities = ("image",)
    _no_split_modules = ["EvaBlock"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True

    def __init__(self, config: DeCLIPEvaVisionConfig):
        super().__init__(config)
        grid = config.image_size // config.patch_size
        self.patch_embed = EvaPatchEmbedding(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, config.hidden_size))
        self.blocks = nn.ModuleList([EvaBlock(config) for _ in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.projection_dim)
        self.post_init()

    def _init_weights(self, module):
        # transformers' `init` functions skip weights a checkpoint loaded; these only shape freshly built models.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, EvaAttention):
            init.zeros_(module.q_bias)
            init.zeros_(module.v_bias)
        elif isinstance(module, DeCLIPEvaVisionModel):
            init.normal_(module.cls_token, std=std)
            init.normal_(module.pos_embed, std=std)

    @property
    def decoupled_path(self):
        """The last block's dense path for `config.decoupled_attention` (read each time, like the CLIP model's)."""
        return EVA_DECOUPLED_PATHS[self.config.decoupled_attention]

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None, return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """The ordinary EVA02 forward for any input whose sides are multiples of the patch size."""
        grid = self._grid_size(self._check_pixel_values(pixel_values))
        hidden_states, rope = self._embed(pixel_values, grid)
        all_hidden_states = [hidden_states]
        for block in self.blocks:
            hidden_states = block(hidden_states, rope)
            all_hidden_states.append(hidden_states)
        return BaseModelOutputWithPooling(
            last_hidden_state=hidden_states,
            pooler_output=self.norm(hidden_states[:, 0]),
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
        )

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """The ordinary forward's output whose `pooler_output` is the (B, projection_dim) image embedding (`head` of the
        normed CLS token), unnormalised, as [`DeCLIPVisionModel.get_image_features`] returns it."""
        outputs = self(pixel_values=pixel_values, return_dict=True, **kwargs)
        outputs.pooler_output = self.head(outputs.pooler_output)
        return outputs

    def get_dense_features(self, pixel_values: torch.Tensor) -> DeCLIPDenseOutput:
        """Dense content features (B, D, h, w), L2-normalised over D, and context features (B, N, C), for any input
        whose sides are multiples of the patch size (square or not)."""
        dense_map, context = self._dense_map_and_context(pixel_values)
        return DeCLIPDenseOutput(dense_embeds=F.normalize(dense_map, dim=1), context_features=context)

    def _map_to_pool(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # docs/method.md §8: the authors' EVA path pools the raw map; the pooled vectors are normalised afterwards.
        return self._dense_map_and_context(pixel_values)[0]

    def _dense_map_and_context(self, pixel_values: torch.Tensor):
        grid_height, grid_width = self._grid_size(self._check_pixel_values(pixel_values))
        hidden_states, rope = self._embed(pixel_values, (grid_height, grid_width))
        for block in self.blocks[:-1]:
            hidden_states = block(hidden_states, rope)
        content_tokens, context = self.decoupled_path(self.blocks[-1], hidden_states, rope)
        content = self.head(self.norm(content_tokens[:, 1:]))  # per token, so CLS is dropped first
        context = tuple(feature[:, 1:].contiguous() for feature in context)
        return tokens_to_map(content, grid_height, grid_width), context

    def _embed(self, pixel_values: torch.Tensor, grid: tuple[int, int]):
        """Patch tokens with CLS and the resized position embedding, and the rotary tables for the grid."""
        patches = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.dtype))
        cls_token = self.cls_token.expand(patches.shape[0], -1, -1)
        hidden_states = torch.cat([cls_token, patches], dim=1) + self._position_embedding(*grid)
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        cos, sin = rotary_tables(*grid, head_dim, self.config.rope_reference_grid, self.config.rope_theta)
        return hidden_states, (cos.to(hidden_states.device), sin.to(hidden_states.device))

    def _position_embedding(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """The absolute position embedding resized to the grid: bicubic, align_corners=False, CLS kept (§8, §1)."""
        cls_position, patch_positions = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        trained = int(math.sqrt(patch_positions.shape[1]))
        if (grid_height, grid_width) == (trained, trained):
            return self.pos_embed
        square = patch_positions.reshape(1, trained, trained, -1).permute(0, 3, 1, 2).float()
        resized = F.interpolate(square, size=(grid_height, grid_width), mode="bicubic", align_corners=False)
        resized = resized.permute(0, 2, 3, 1).reshape(1, grid_height * grid_width, -1).to(self.pos_embed.dtype)
        return torch.cat([cls_position, resized], dim=1)

    @staticmethod
    def _missing_weights_message(source, loading_info: dict) -> str:
        missing = sorted(loading_info["missing_keys"])
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        return (
            f"{source} lacks {len(missing)} of the DeCLIP EVA02 vision model's weights ({shown}); they would be random. "
            "Convert the authors' EVA02-CLIP checkpoint with `declip-convert CKPT --arch "
            "EVA02-CLIP-B-16 --out DIR` and load DIR."
        )


# Which DeCLIP class reads a saved folder, by its config's model_type; anything else is tried as OpenAI CLIP, whose
# loader refuses non-CLIP configs with a message naming the fix.
_VISION_CLASSES_BY_MODEL_TYPE = {DeCLIPEvaVisionConfig.model_type: DeCLIPEvaVisionModel}
_HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "subfolder", "force_download")


def declip_vision_class(name_or_path, **kwargs) -> type:
    """[`DeCLIPEvaVisionModel`] for an EVA02 DeCLIP folder or Hub id, else [`DeCLIPVisionModel`] (so code that loads
    "a DeCLIP model" takes either without branching). `kwargs` may hold any `from_pretrained` arguments."""
    hub_kwargs = {key: value for key, value in kwargs.items() if key in _HUB_KWARGS}
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(str(name_or_path), **hub_kwargs)
    except (OSError, ValueError):
        return DeCLIPVisionModel  # its from_pretrained reports the unreadable source
    return _VISION_CLASSES_BY_MODEL_TYPE.get(config_dict.get("model_type"), DeCLIPVisionModel)
