"""Measure what DeCLIP (CVPR 2025, arXiv 2505.04410) changes: per-layer attention, proxy-token scores and context
correlations of a `DeCLIPVisionModel` or of any CLIP checkpoint loaded as one (docs/method.md §1.5).

The paper's diagnosis: in CLIP's deeper layers the CLS token and every image token attend to the same few
background "proxy" tokens whatever their own position, which destroys spatial correlation; the decoupled final
layer and the context distillation restore VFM-like correlations. This module gives that diagnosis as maps and
numbers.

**Attention.** `analyse_attention` runs the encoder once and returns, for every layer, the ordinary attention
`softmax(s · q kᵀ)` per head (computed from the layer's own `layer_norm1`, `q_proj` and `k_proj`, so it works with
any `attn_implementation` and at any input size that is a multiple of the patch size), plus the final layer's
*decoupled* attention for the model's `decoupled_attention` mode (docs/method.md §1.2: `softmax(s · q qᵀ)` for
`qq`, the sum of two softmaxes for `csa`, ...; `vanilla` is the ordinary attention, `maskclip` the identity).
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
same row of a VFM's patch features (`VFMPatchFeatures`, a DINOv2): the two maps the context loss aligns.

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
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .models.loading_utils import image_normalisation, quiet_transformers
from .models.modeling_declip import DECOUPLED_PATHS, DeCLIPVisionModel, SelfSimilarityAttention, _split_heads

DEFAULT_TOP_K = 5

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


def _head_projections(layer: nn.Module, hidden_states: torch.Tensor, names) -> dict[str, torch.Tensor]:
    """The layer's q/k/v projections of `layer_norm1(hidden_states)`, split into heads (B, H, T, d)."""
    attention = layer.self_attn
    normed = layer.layer_norm1(hidden_states)
    return {name: _split_heads(getattr(attention, f"{name}_proj")(normed), attention.num_heads) for name in names}


def query_key_attention(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """A CLIP encoder layer's own attention weights `softmax(s · q kᵀ)` for its input `hidden_states` (B, T, C)."""
    heads = _head_projections(layer, hidden_states, ("q", "k"))
    return _softmax_similarity(heads["q"], heads["k"], layer.self_attn.scale)


def _self_similarity_attention(path: SelfSimilarityAttention):
    """The weights of a trainable mode: one softmax per group of projections, summed (docs/method.md §1.2)."""

    def weights(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        heads = _head_projections(layer, hidden_states, path.context_names)
        scale = layer.self_attn.scale
        total = 0
        for group in path.similarity_groups:
            similarity = torch.cat([heads[name] for name in group], dim=-1)  # (B, H, T, d * len(group))
            total = total + _softmax_similarity(similarity, similarity, scale / len(group))
        return total

    return weights


def _identity_attention(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """MaskCLIP replaces attention by the value path: every token keeps only itself."""
    batch_size, num_tokens, _ = hidden_states.shape
    eye = torch.eye(num_tokens, device=hidden_states.device)
    return eye.expand(batch_size, layer.self_attn.num_heads, num_tokens, num_tokens)


# The final layer's attention weights for each `decoupled_attention` mode (the same keys as DECOUPLED_PATHS).
DECOUPLED_ATTENTION_WEIGHTS = {
    **{
        mode: _self_similarity_attention(path)
        for mode, path in DECOUPLED_PATHS.items()
        if isinstance(path, SelfSimilarityAttention)
    },
    "vanilla": query_key_attention,
    "maskclip": _identity_attention,
}


def grid_size(model: DeCLIPVisionModel, pixel_values: torch.Tensor) -> tuple[int, int]:
    """The patch grid `(h, w)` of `pixel_values` (B, C, H, W); a size that is not a multiple of the patch size
    raises the model's `ValueError`."""
    return model._grid_size(model._check_pixel_values(pixel_values))


@torch.no_grad()
def analyse_attention(model: DeCLIPVisionModel, pixel_values: torch.Tensor) -> DeCLIPAttentionOutput:
    """Every layer's attention weights and the final layer's decoupled ones, in one pass over the encoder."""
    grid = grid_size(model, pixel_values)
    mode = model.config.decoupled_attention
    hidden_states = model.pre_layrnorm(model.embeddings(pixel_values, interpolate_pos_encoding=True))
    layer_attentions = []
    for layer in model.encoder.layers:
        layer_attentions.append(query_key_attention(layer, hidden_states))
        last_input, hidden_states = hidden_states, layer(hidden_states, None)
    decoupled = DECOUPLED_ATTENTION_WEIGHTS[mode](model.encoder.layers[-1], last_input)
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
    model: DeCLIPVisionModel, pixel_values: torch.Tensor, query_index: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's attention maps of `query_index` per head: every layer's (L, num_heads, h, w) and the final
    layer's decoupled one (num_heads, h, w). `.mean(-3)` averages the heads."""
    analysis = analyse_attention(model, pixel_values[:1])
    grid = analysis.grid_size
    layers = torch.stack([attention_map(weights[0], query_index, grid) for weights in analysis.layer_attentions])
    return layers, attention_map(analysis.decoupled_attention[0], query_index, grid)


def final_layer_attention(model: DeCLIPVisionModel, pixel_values: torch.Tensor, query_index: int | None):
    """The final layer's decoupled attention of one image's `query_index` (patch index, or None for CLS), heads
    averaged: an (h, w) map."""
    return layer_attention_maps(model, pixel_values, query_index)[1].mean(0)


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
    model: DeCLIPVisionModel, pixel_values: torch.Tensor, top_k: int = DEFAULT_TOP_K
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
def context_correlation(model: DeCLIPVisionModel, pixel_values: torch.Tensor, query_index: int) -> torch.Tensor:
    """Row `query_index` of the student's context correlation, `(1/m) Σᵢ corr(Pᵢ)` over the mode's context
    features (docs/method.md §4.2), as (h, w) maps for each image: (B, h, w)."""
    grid = grid_size(model, pixel_values)
    features = model.get_dense_features(pixel_values).context_features
    if not features:
        raise ValueError(
            f"decoupled_attention={model.config.decoupled_attention!r} has no context features; load the model with "
            "a trainable mode (e.g. from_pretrained(..., decoupled_attention='qq')) to see its context correlation."
        )
    maps = [correlation_map(feature.transpose(1, 2).unflatten(-1, grid), query_index) for feature in features]
    return torch.stack(maps).mean(0)


class VFMPatchFeatures:
    """A DINOv2 (with or without registers) read as DeCLIP's context teacher reads it (docs/method.md §4.2): its
    final-layer-normed patch tokens, CLS and registers dropped, as a (B, C, h, w) float32 map."""

    PREFIX_TOKENS = {
        "dinov2": lambda config: 1,
        "dinov2_with_registers": lambda config: 1 + config.num_register_tokens,
    }

    def __init__(self, model: nn.Module):
        model_type = model.config.model_type
        if model_type not in self.PREFIX_TOKENS:
            raise ValueError(
                f"the VFM is a {model_type!r} model; pass one of {', '.join(self.PREFIX_TOKENS)} "
                "(e.g. facebook/dinov2-base)."
            )
        self.model = model.eval()
        self.num_prefix_tokens = self.PREFIX_TOKENS[model_type](model.config)
        self.patch_size = model.config.patch_size
        self.name = model.config.name_or_path

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> "VFMPatchFeatures":
        with quiet_transformers():
            return cls(AutoModel.from_pretrained(name_or_path, **kwargs))

    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The VFM's image mean/std (its image-processor config; ImageNet's when it has none)."""
        return image_normalisation(self.name, default_mean=IMAGENET_DEFAULT_MEAN, default_std=IMAGENET_DEFAULT_STD)

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"VFM input {height}x{width} is not a multiple of its patch size {self.patch_size}.")
        tokens = self.model(pixel_values=pixel_values.to(self.model.dtype)).last_hidden_state
        patches = tokens[:, self.num_prefix_tokens :].float()  # (B, N, C)
        # (B, N, C) -> (B, C, h, w)
        return patches.transpose(1, 2).unflatten(-1, (height // self.patch_size, width // self.patch_size))


def vfm_correlation(vfm: VFMPatchFeatures, pixel_values: torch.Tensor, query_index: int) -> torch.Tensor:
    """Row `query_index` of the VFM's patch correlation `corr(Z)` (docs/method.md §4.2): (B, h, w) on its grid."""
    return correlation_map(vfm(pixel_values), query_index)
