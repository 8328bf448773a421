"""Measure what DeCLIP (CVPR 2025, arXiv 2505.04410) changes: per-layer attention, proxy-token scores and context
correlations of a `DeCLIPVisionModel` (or any CLIP checkpoint loaded as one) or a `DeCLIPEvaVisionModel` (the EVA02
students of the authors' released checkpoints; docs/method.md §1.5, §8).

The paper's diagnosis: in CLIP's deeper layers the CLS token and every image token attend to the same few
background "proxy" tokens whatever their own position, which destroys spatial correlation; the decoupled final
layer and the context distillation restore VFM-like correlations. This module gives that diagnosis as maps and
numbers.

**Attention.** `analyse_attention` runs the encoder once and returns, for every layer, the ordinary attention
`softmax(s · q kᵀ)` per head (computed from the layer's own norm and q/k projections, so it works with any
`attn_implementation` and at any input size that is a multiple of the patch size; for EVA02 with the q bias and the
rotary embedding of the patch rows, as its attention applies them), plus the final layer's *decoupled* attention
for the model's `decoupled_attention` mode (docs/method.md §1.2: `softmax(s · q qᵀ)` for `qq`, the sum of two
softmaxes for `csa`, ...; `vanilla` is the ordinary attention, `maskclip` the identity; EVA02's `ss_attn` has
`s = 1` and no rotary, §8). Each family is read by its `EncoderReader` (`ENCODER_READERS`, keyed on the config's
`model_type`).
Token order is CLS first, then the `h × w` patches in row-major order.

**Proxy-token score.** For one attention matrix `A` of shape `(1+N, 1+N)` (one head, one image), take its `N`
image-token (patch) query rows `P = A[1:, :]`, each divided by its sum (rows of `csa` sum to 2), over all `T = 1+N`
keys, CLS included:

- received mass `r_j = (1/N) Σ_i P[i, j]` (sums to 1 over `j`); `top_k_mass = Σ` of the `k` largest `r_j`, in
  `[k/T, 1]`;
- **`proxy_score = (top_k_mass − k/T) / (1 − k/T)`**, in `[0, 1]`: 1 when every image token puts all its
  attention on the same (at most `k`) tokens, 0 when attention is spread uniformly; an attention that stays local
  (each token on itself: the identity) scores `(k/N − k/T) / (1 − k/T)`, close to 0, because its mass is spread
  over all positions;
- **`row_similarity`**: the mean cosine similarity of the rows of `P` over all pairs of distinct image tokens, in
  `[0, 1]`: how position-independent the image tokens' attention is. 1 when all rows are equal (one shared proxy
  token, or uniform attention), 0 when no two tokens attend to the same key (the identity).

Proxy tokens show as a high `proxy_score` with a high `row_similarity`. Scores are computed per head and image
and then averaged (heads can pick different proxies; averaging the heads first would hide that). `k` defaults to
`DEFAULT_TOP_K`.

**Context correlation.** For a query patch, its cosine similarity with every patch of the student's context
features (docs/method.md §4.2: rows L2-normalised over channels, averaged over the mode's projections), and the
same row of a VFM's patch features (`VFMPatchFeatures`: a DINOv2, DINO or SAM read by `declip_hf.vfm`'s adapters, as
the context teacher is in training): the two maps the context loss aligns.

Example (one image, one query patch):

```python
>>> grid = grid_size(model, pixel_values)
>>> query = point_to_patch_index(0.5, 0.5, grid)  # the patch under the image centre
>>> final_layer_attention(model, pixel_values, query)  # (h, w), heads averaged
>>> context_correlation(model, pixel_values, query)  # (h, w) cosines
>>> model_proxy_scores(model, pixel_values).proxy_score  # (num_layers + 1,): each layer, then the decoupled one
```
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel

from .models.configuration_declip import DeCLIPVisionConfig
from .models.configuration_declip_eva import DeCLIPEvaVisionConfig
from .models.loading_utils import quiet_transformers
from .models.modeling_declip import DECOUPLED_PATHS, DeCLIPVisionModel, SelfSimilarityAttention, _split_heads
from .models.modeling_declip_eva import EVA_DECOUPLED_PATHS, DeCLIPEvaVisionModel, apply_rotary
from .vfm import vfm_adapter_class, vfm_normalisation

DEFAULT_TOP_K = 5

# The student families the analysis reads (each through its `EncoderReader`, chosen by the config's model_type).
DeCLIPModel = DeCLIPVisionModel | DeCLIPEvaVisionModel

# The attention map of CLS is asked for with this query index; patch queries are 0 ... N-1 (row-major).
CLS_QUERY = None


@dataclass
class DeCLIPAttentionOutput:
    """Attention weights of every layer of one forward pass.

    layer_attentions (`tuple(torch.FloatTensor)`, one per encoder layer, each `(B, num_heads, 1+N, 1+N)`):
        the ordinary attention `softmax(s · q kᵀ)` of each layer; rows sum to 1.
    decoupled_attention (`torch.FloatTensor` of shape `(B, num_heads, 1+N, 1+N)`):
        the final layer's weights in the model's `decoupled_attention` mode (docs/method.md §1.2); rows sum to the
        mode's number of softmaxes (2 for `csa`, 1 otherwise).
    grid_size (`tuple[int, int]`): the patch grid `(h, w)`.
    mode (`str`): the decoupled mode the last entry was computed in.
    """

    layer_attentions: tuple[torch.Tensor, ...]
    decoupled_attention: torch.Tensor
    grid_size: tuple[int, int]
    mode: str


@dataclass
class ProxyTokenScores:
    """Proxy-token scores (module docstring) of attention matrices, one value per matrix, or per layer once averaged.

    proxy_score: `(top_k_mass − k/T) / (1 − k/T)`, 0 for uniform attention, 1 when all image tokens attend to the
        same `k` tokens. top_k_mass: share of the image tokens' attention received by the `k` most-attended tokens.
    row_similarity: mean cosine similarity of distinct image tokens' attention rows (1: position-independent).
    """

    proxy_score: torch.Tensor
    top_k_mass: torch.Tensor
    row_similarity: torch.Tensor
    top_k: int


# --------------------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------------------


def _softmax_similarity(left: torch.Tensor, right: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale · left rightᵀ) in float32: (B, H, T, d) x (B, H, T, d) -> (B, H, T, T)."""
    return torch.softmax(left.float() @ right.float().transpose(-1, -2) * scale, dim=-1)


class EncoderReader:
    """How the analysis reads one student family's encoder layer by layer: each layer's input, its q/k/v, and the
    scales its attention and its decoupled path use. One subclass per family, chosen by `encoder_reader` from the
    config's `model_type`; `state` is whatever the family's layers take besides the tokens (EVA02: rotary tables)."""

    decoupled_paths: dict

    def embed(self, model: nn.Module, pixel_values: torch.Tensor, grid: tuple[int, int]):
        """(the first layer's input (B, 1+N, C), state)."""
        raise NotImplementedError

    def layers(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def run_layer(self, layer: nn.Module, hidden_states: torch.Tensor, state) -> torch.Tensor:
        raise NotImplementedError

    def projection_heads(self, layer: nn.Module, hidden_states: torch.Tensor, names) -> dict[str, torch.Tensor]:
        """The layer's q/k/v projections of its normed input, biases included, as (B, H, T, d) heads."""
        raise NotImplementedError

    def query_key(self, layer: nn.Module, hidden_states: torch.Tensor, state):
        """(q, k, scale) exactly as the layer's own attention uses them: `softmax(scale · q kᵀ)`."""
        raise NotImplementedError

    def self_similarity_scale(self, layer: nn.Module) -> float:
        """The scale `s` of the decoupled path's `softmax(s / len(group) · p pᵀ)` (docs/method.md §1.2, §8)."""
        raise NotImplementedError

    def num_heads(self, layer: nn.Module) -> int:
        raise NotImplementedError


class ClipEncoderReader(EncoderReader):
    """OpenAI-CLIP layout ([`DeCLIPVisionModel`]): `pre_layrnorm`, then CLIP encoder layers."""

    decoupled_paths = DECOUPLED_PATHS

    def embed(self, model, pixel_values, grid):
        return model.pre_layrnorm(model.embeddings(pixel_values, interpolate_pos_encoding=True)), None

    def layers(self, model):
        return model.encoder.layers

    def run_layer(self, layer, hidden_states, state):
        return layer(hidden_states, None)

    def projection_heads(self, layer, hidden_states, names):
        attention = layer.self_attn
        normed = layer.layer_norm1(hidden_states)
        return {name: _split_heads(getattr(attention, f"{name}_proj")(normed), attention.num_heads) for name in names}

    def query_key(self, layer, hidden_states, state):
        heads = self.projection_heads(layer, hidden_states, ("q", "k"))
        return heads["q"], heads["k"], layer.self_attn.scale

    def self_similarity_scale(self, layer):
        return layer.self_attn.scale

    def num_heads(self, layer):
        return layer.self_attn.num_heads


class EvaEncoderReader(EncoderReader):
    """EVA02 layout ([`DeCLIPEvaVisionModel`], docs/method.md §8): q bias, rotary q and k on the patch rows (CLS
    untouched), sub-LN after attention; the decoupled `ss_attn` uses unrotated projections and no 1/sqrt(d) scale."""

    decoupled_paths = EVA_DECOUPLED_PATHS

    def embed(self, model, pixel_values, grid):
        return model._embed(pixel_values, grid)  # (tokens with CLS and positions, rotary tables)

    def layers(self, model):
        return model.blocks

    def run_layer(self, layer, hidden_states, state):
        return layer(hidden_states, state)

    def projection_heads(self, layer, hidden_states, names):
        projections = layer.attn.projections(layer.norm1(hidden_states), names)
        return {name: _split_heads(tensor, layer.attn.num_heads) for name, tensor in projections.items()}

    def query_key(self, layer, hidden_states, state):
        heads = self.projection_heads(layer, hidden_states, ("q", "k"))
        query, key = apply_rotary(heads["q"], state), apply_rotary(heads["k"], state)
        return query, key, query.shape[-1] ** -0.5  # scaled_dot_product_attention's default scale

    def self_similarity_scale(self, layer):
        return 1.0  # EvaSelfSimilarityAttention: scale 1 per docs/method.md §8

    def num_heads(self, layer):
        return layer.attn.num_heads


# The reader of each student family, by its config's model_type.
ENCODER_READERS = {
    DeCLIPVisionConfig.model_type: ClipEncoderReader(),
    DeCLIPEvaVisionConfig.model_type: EvaEncoderReader(),
}


def encoder_reader(model: nn.Module) -> EncoderReader:
    """The reader for `model`'s family; a ValueError naming the supported model types for any other model."""
    model_type = model.config.model_type
    if model_type not in ENCODER_READERS:
        raise ValueError(
            f"the analysis reads DeCLIP students of model_type {', '.join(ENCODER_READERS)}, not {model_type!r}; "
            "load the checkpoint with DeCLIPVisionModel or DeCLIPEvaVisionModel."
        )
    return ENCODER_READERS[model_type]


def query_key_attention(reader: EncoderReader, layer: nn.Module, hidden_states: torch.Tensor, state) -> torch.Tensor:
    """A layer's own attention weights `softmax(s · q kᵀ)` for its input `hidden_states` (B, T, C)."""
    query, key, scale = reader.query_key(layer, hidden_states, state)
    return _softmax_similarity(query, key, scale)


def _self_similarity_attention(mode: str):
    """The weights of a trainable mode: one softmax per group of projections, summed (docs/method.md §1.2, §8)."""

    def weights(reader: EncoderReader, layer: nn.Module, hidden_states: torch.Tensor, state) -> torch.Tensor:
        path = reader.decoupled_paths[mode]
        heads = reader.projection_heads(layer, hidden_states, path.context_names)
        scale = reader.self_similarity_scale(layer)
        total = 0
        for group in path.similarity_groups:
            similarity = torch.cat([heads[name] for name in group], dim=-1)  # (B, H, T, d * len(group))
            total = total + _softmax_similarity(similarity, similarity, scale / len(group))
        return total

    return weights


def _identity_attention(reader: EncoderReader, layer: nn.Module, hidden_states: torch.Tensor, state) -> torch.Tensor:
    """MaskCLIP replaces attention by the value path: every token keeps only itself."""
    batch_size, num_tokens, _ = hidden_states.shape
    eye = torch.eye(num_tokens, device=hidden_states.device)
    return eye.expand(batch_size, reader.num_heads(layer), num_tokens, num_tokens)


# The final layer's attention weights for each `decoupled_attention` mode (the same keys as DECOUPLED_PATHS and
# EVA_DECOUPLED_PATHS), each called as (reader, last layer, its input, state).
DECOUPLED_ATTENTION_WEIGHTS = {
    **{
        mode: _self_similarity_attention(mode)
        for mode, path in DECOUPLED_PATHS.items()
        if isinstance(path, SelfSimilarityAttention)
    },
    "vanilla": query_key_attention,
    "maskclip": _identity_attention,
}


def grid_size(model: DeCLIPModel, pixel_values: torch.Tensor) -> tuple[int, int]:
    """The patch grid `(h, w)` of `pixel_values` (B, C, H, W); a size that is not a multiple of the patch size
    raises the model's `ValueError`."""
    return model._grid_size(model._check_pixel_values(pixel_values))


def _last_layer_input(model: DeCLIPModel, pixel_values: torch.Tensor):
    """The encoder run up to its last layer, building no attention weights: (reader, last layer, that layer's input,
    the reader's state, grid)."""
    reader = encoder_reader(model)
    grid = grid_size(model, pixel_values)
    hidden_states, state = reader.embed(model, pixel_values, grid)
    layers = reader.layers(model)
    for layer in layers[:-1]:
        hidden_states = reader.run_layer(layer, hidden_states, state)
    return reader, layers[-1], hidden_states, state, grid


@torch.no_grad()
def analyse_attention(model: DeCLIPModel, pixel_values: torch.Tensor) -> DeCLIPAttentionOutput:
    """Every layer's attention weights and the final layer's decoupled ones, in one pass over the encoder."""
    reader = encoder_reader(model)
    grid = grid_size(model, pixel_values)
    mode = model.config.decoupled_attention
    hidden_states, state = reader.embed(model, pixel_values, grid)
    layers = reader.layers(model)
    layer_attentions = []
    for layer in layers:
        layer_attentions.append(query_key_attention(reader, layer, hidden_states, state))
        last_input, hidden_states = hidden_states, reader.run_layer(layer, hidden_states, state)
    decoupled = DECOUPLED_ATTENTION_WEIGHTS[mode](reader, layers[-1], last_input, state)
    return DeCLIPAttentionOutput(tuple(layer_attentions), decoupled, grid, mode)


def _check_patch_index(query_index: int, num_patches: int) -> int:
    if isinstance(query_index, bool) or not isinstance(query_index, int) or not 0 <= query_index < num_patches:
        raise ValueError(
            f"query_index {query_index!r} is not one of the {num_patches} patches; pass a row-major patch index "
            "0 ... N-1 (point_to_patch_index converts a point)."
        )
    return query_index


def _query_row(query_index: int | None, num_patches: int) -> int:
    """The attention row of a query: 0 for CLS (`CLS_QUERY`), 1 + i for patch i."""
    return 0 if query_index is CLS_QUERY else 1 + _check_patch_index(query_index, num_patches)


def attention_map(attention: torch.Tensor, query_index: int | None, grid: tuple[int, int]) -> torch.Tensor:
    """One query's attention over the patches: (..., 1+N, 1+N) -> (..., h, w).

    The row is divided by its sum (the `csa` weights sum to 2), and the CLS key is left out, so a map sums to 1
    minus the share the query gives to CLS."""
    grid_height, grid_width = grid
    row = attention[..., _query_row(query_index, grid_height * grid_width), :]
    row = row / row.sum(dim=-1, keepdim=True)
    return row[..., 1:].unflatten(-1, (grid_height, grid_width))


def layer_attention_maps(
    model: DeCLIPModel, pixel_values: torch.Tensor, query_index: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's attention maps of `query_index` per head: every layer's (L, num_heads, h, w) and the final
    layer's decoupled one (num_heads, h, w). `.mean(-3)` averages the heads."""
    analysis = analyse_attention(model, pixel_values[:1])
    grid = analysis.grid_size
    layers = torch.stack([attention_map(weights[0], query_index, grid) for weights in analysis.layer_attentions])
    return layers, attention_map(analysis.decoupled_attention[0], query_index, grid)


@torch.no_grad()
def final_layer_attention(model: DeCLIPModel, pixel_values: torch.Tensor, query_index: int | None):
    """The final layer's decoupled attention of one image's `query_index` (patch index, or None for CLS), heads
    averaged: an (h, w) map. Only the last layer's weights are built (what a click in the demo asks for)."""
    reader, last, hidden_states, state, grid = _last_layer_input(model, pixel_values[:1])
    weights = DECOUPLED_ATTENTION_WEIGHTS[model.config.decoupled_attention](reader, last, hidden_states, state)
    return attention_map(weights[0], query_index, grid).mean(0)


def point_to_patch_index(x: float, y: float, grid: tuple[int, int]) -> int:
    """The row-major index of the patch under the point `(x, y)`, both normalised to [0, 1] in the input frame
    (x to the right, y down), on a grid of `(h, w)` patches."""
    if not (0 <= x <= 1 and 0 <= y <= 1):
        raise ValueError(f"point ({x}, {y}) is outside the image; pass coordinates normalised to [0, 1].")
    grid_height, grid_width = grid
    row, column = min(int(y * grid_height), grid_height - 1), min(int(x * grid_width), grid_width - 1)
    return row * grid_width + column


# --------------------------------------------------------------------------------------------------------------------
# Proxy-token scores
# --------------------------------------------------------------------------------------------------------------------


def proxy_token_scores(attention: torch.Tensor, top_k: int = DEFAULT_TOP_K) -> ProxyTokenScores:
    """Scores of attention matrices (..., 1+N, 1+N), CLS first, one value per matrix (module docstring)."""
    num_tokens = attention.shape[-1]
    num_patches = num_tokens - 1
    if attention.shape[-2] != num_tokens or num_patches < 2:
        raise ValueError(f"attention must be (..., 1+N, 1+N) with N >= 2 patches, got {tuple(attention.shape)}.")
    if not 1 <= top_k < num_tokens:
        raise ValueError(f"top_k must be between 1 and {num_tokens - 1} (the tokens minus one), got {top_k}.")
    rows = attention[..., 1:, :].float()
    rows = rows / rows.sum(dim=-1, keepdim=True)  # (..., N, T), each row a distribution
    received = rows.mean(dim=-2)  # (..., T), sums to 1
    top_k_mass = received.topk(top_k, dim=-1).values.sum(dim=-1)
    uniform_mass = top_k / num_tokens
    proxy_score = (top_k_mass - uniform_mass) / (1 - uniform_mass)
    unit_rows = F.normalize(rows, dim=-1)
    cosines = unit_rows @ unit_rows.transpose(-1, -2)  # (..., N, N)
    off_diagonal = cosines.sum(dim=(-1, -2)) - cosines.diagonal(dim1=-2, dim2=-1).sum(dim=-1)
    row_similarity = off_diagonal / (num_patches * (num_patches - 1))
    return ProxyTokenScores(proxy_score, top_k_mass, row_similarity, top_k)


@dataclass
class LayerProxyScores:
    """Proxy-token scores per layer of one model, averaged over heads and images.

    layers (`list[str]`): "1" ... "L" for the ordinary attention of each layer, then "L (qq)" (the mode) for the
        final layer's decoupled attention. proxy_score, top_k_mass, row_similarity: `(len(layers),)` tensors.
    """

    layers: list[str]
    proxy_score: torch.Tensor
    top_k_mass: torch.Tensor
    row_similarity: torch.Tensor
    top_k: int


def attention_proxy_scores(analysis: DeCLIPAttentionOutput, top_k: int = DEFAULT_TOP_K) -> LayerProxyScores:
    """Per-layer scores of an `analyse_attention` output, averaged over heads and images."""
    num_layers = len(analysis.layer_attentions)
    all_weights = (*analysis.layer_attentions, analysis.decoupled_attention)
    scores = [proxy_token_scores(weights, top_k) for weights in all_weights]
    return LayerProxyScores(
        layers=[str(number) for number in range(1, num_layers + 1)] + [f"{num_layers} ({analysis.mode})"],
        proxy_score=torch.stack([score.proxy_score.mean() for score in scores]),
        top_k_mass=torch.stack([score.top_k_mass.mean() for score in scores]),
        row_similarity=torch.stack([score.row_similarity.mean() for score in scores]),
        top_k=top_k,
    )


def model_proxy_scores(
    model: DeCLIPModel, pixel_values: torch.Tensor, top_k: int = DEFAULT_TOP_K
) -> LayerProxyScores:
    """Proxy-token scores of every layer and of the decoupled final layer, averaged over heads and the batch."""
    return attention_proxy_scores(analyse_attention(model, pixel_values), top_k)


# --------------------------------------------------------------------------------------------------------------------
# Correlations
# --------------------------------------------------------------------------------------------------------------------


def correlation_map(features: torch.Tensor, query_index: int) -> torch.Tensor:
    """Cosine similarity of one patch with every patch: (B, C, h, w) -> (B, h, w), channels L2-normalised."""
    batch_size, _, grid_height, grid_width = features.shape
    _check_patch_index(query_index, grid_height * grid_width)
    unit = F.normalize(features.float().flatten(2), dim=1)  # (B, C, n)
    query = unit[:, :, query_index]  # (B, C)
    return torch.einsum("bc,bcn->bn", query, unit).view(batch_size, grid_height, grid_width)


@torch.no_grad()
def context_feature_maps(model: DeCLIPModel, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """The mode's context features as (B, C, h, w) maps, one per projection (q, k, v order)."""
    grid = grid_size(model, pixel_values)
    features = model.get_dense_features(pixel_values).context_features
    if not features:
        raise ValueError(
            f"decoupled_attention={model.config.decoupled_attention!r} has no context features; load the model with "
            "a trainable mode (e.g. from_pretrained(..., decoupled_attention='qq')) to see its context correlation."
        )
    return [feature.transpose(1, 2).unflatten(-1, grid) for feature in features]  # (B, N, C) -> (B, C, h, w)


def mean_correlation(feature_maps: list[torch.Tensor], query_index: int) -> torch.Tensor:
    """`(1/m) Σᵢ corr(Pᵢ)` row `query_index` over m feature maps: (B, h, w)."""
    return torch.stack([correlation_map(features, query_index) for features in feature_maps]).mean(0)


def context_correlation(model: DeCLIPModel, pixel_values: torch.Tensor, query_index: int) -> torch.Tensor:
    """Row `query_index` of the student's context correlation, `(1/m) Σᵢ corr(Pᵢ)` over the mode's context
    features (docs/method.md §4.2), as (h, w) maps for each image: (B, h, w)."""
    return mean_correlation(context_feature_maps(model, pixel_values), query_index)


class VFMPatchFeatures:
    """A VFM (DINOv2 with or without registers, DINO, SAM: any family of `declip_hf.vfm.VFM_ADAPTERS`) read as
    DeCLIP's context teacher reads it (docs/method.md §4.2, §9), by the same adapter the distillation uses: a
    (B, C, h, w) float32 map of its patch features."""

    def __init__(self, model: nn.Module):
        self.name = model.config.name_or_path
        adapter_class = vfm_adapter_class(model.config, self.name)
        self.model = model.eval()
        self.adapter = adapter_class(self.model)
        self.patch_size = adapter_class.patch_size(model.config)

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> "VFMPatchFeatures":
        with quiet_transformers():
            return cls(AutoModel.from_pretrained(name_or_path, **kwargs))

    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The VFM's image mean/std (its image-processor config; ImageNet's when it has none)."""
        return vfm_normalisation(self.name)

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"VFM input {height}x{width} is not a multiple of its patch size {self.patch_size}.")
        return self.adapter(pixel_values.to(self.model.dtype)).float()


def vfm_correlation(vfm: VFMPatchFeatures, pixel_values: torch.Tensor, query_index: int) -> torch.Tensor:
    """Row `query_index` of the VFM's patch correlation `corr(Z)` (docs/method.md §4.2): (B, h, w) on its grid."""
    return correlation_map(vfm(pixel_values), query_index)
