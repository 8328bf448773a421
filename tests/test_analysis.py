"""declip_hf.analysis: attention against a plain softmax(s q kᵀ), decoupled weights against each mode's formula,
the proxy-token score on matrices with a known answer, correlation maps against a written-out cosine."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from declip_hf import DeCLIPVisionModel
from declip_hf.analysis import (
    CLS_QUERY,
    DECOUPLED_ATTENTION_WEIGHTS,
    VFMPatchFeatures,
    analyse_attention,
    attention_map,
    context_correlation,
    correlation_map,
    final_layer_attention,
    layer_attention_maps,
    model_proxy_scores,
    point_to_patch_index,
    proxy_token_scores,
    vfm_correlation,
)
from declip_hf.models.configuration_declip import DECOUPLED_ATTENTION_MODES

HEIGHT, WIDTH = 32, 40  # non-square: an 8 x 10 grid on the tiny CLIP (patch 4)
GRID = (8, 10)


@pytest.fixture(scope="module")
def model(tiny_clip_dir) -> DeCLIPVisionModel:
    return DeCLIPVisionModel.from_pretrained(tiny_clip_dir).eval()


@pytest.fixture(scope="module")
def pixel_values() -> torch.Tensor:
    return torch.randn(2, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0))


def plain_projection(linear, inputs):
    return inputs @ linear.weight.T + linear.bias


def plain_heads(layer, hidden_states, name):
    """The layer's projection `name` of layer_norm1(hidden_states), written out: (B, T, C) -> (B, H, T, d)."""
    norm = layer.layer_norm1
    normed = F.layer_norm(hidden_states, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    projected = plain_projection(getattr(layer.self_attn, f"{name}_proj"), normed)
    num_heads = layer.self_attn.num_heads
    batch_size, num_tokens, hidden_size = projected.shape
    return projected.view(batch_size, num_tokens, num_heads, hidden_size // num_heads).permute(0, 2, 1, 3)


def plain_softmax(left, right, scale):
    return torch.softmax(torch.einsum("bhid,bhjd->bhij", left, right) * scale, dim=-1)


def layer_inputs(model, pixel_values):
    """Each encoder layer's input, from the ordinary forward's hidden states."""
    with torch.no_grad():
        outputs = model(pixel_values, output_hidden_states=True, interpolate_pos_encoding=True)
    return outputs.hidden_states[:-1]


def test_every_layer_attention_is_softmax_of_scaled_q_k(model, pixel_values):
    analysis = analyse_attention(model, pixel_values)
    assert analysis.grid_size == GRID and len(analysis.layer_attentions) == model.config.num_hidden_layers
    scale = (model.config.hidden_size // model.config.num_attention_heads) ** -0.5
    for layer, inputs, weights in zip(model.encoder.layers, layer_inputs(model, pixel_values),
                                      analysis.layer_attentions):
        with torch.no_grad():
            expected = plain_softmax(plain_heads(layer, inputs, "q"), plain_heads(layer, inputs, "k"), scale)
        assert weights.shape == (2, model.config.num_attention_heads, 81, 81)
        # CLS query and every patch query, each head.
        torch.testing.assert_close(weights[:, :, 0], expected[:, :, 0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(weights[:, :, 1:], expected[:, :, 1:], atol=1e-6, rtol=1e-5)


def test_layer_attention_matches_transformers_eager_output_attentions(tiny_clip_dir, pixel_values):
    eager = DeCLIPVisionModel.from_pretrained(tiny_clip_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        reference = eager(pixel_values, output_attentions=True, interpolate_pos_encoding=True).attentions
    for ours, theirs in zip(analyse_attention(eager, pixel_values).layer_attentions, reference, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def mode_formula(mode, layer, inputs):
    """docs/method.md §1.2's table, written out."""
    scale = layer.self_attn.scale
    q, k, v = (plain_heads(layer, inputs, name) for name in "qkv")
    formulas = {
        "qq": lambda: plain_softmax(q, q, scale),
        "kk": lambda: plain_softmax(k, k, scale),
        "vv": lambda: plain_softmax(v, v, scale),
        "csa": lambda: plain_softmax(q, q, scale) + plain_softmax(k, k, scale),
        "all": lambda: torch.softmax(
            (torch.einsum("bhid,bhjd->bhij", q, q) + torch.einsum("bhid,bhjd->bhij", k, k)
             + torch.einsum("bhid,bhjd->bhij", v, v)) * scale / 3, dim=-1),
        "vanilla": lambda: plain_softmax(q, k, scale),
        "maskclip": lambda: torch.eye(q.shape[2]).expand(q.shape[0], q.shape[1], -1, -1),
    }
    return formulas[mode]()


@pytest.mark.parametrize("mode", DECOUPLED_ATTENTION_MODES)
def test_decoupled_attention_is_the_modes_formula(tiny_clip_dir, pixel_values, mode):
    model = DeCLIPVisionModel.from_pretrained(tiny_clip_dir, decoupled_attention=mode).eval()
    analysis = analyse_attention(model, pixel_values)
    last = model.encoder.layers[-1]
    with torch.no_grad():
        expected = mode_formula(mode, last, layer_inputs(model, pixel_values)[-1])
    assert analysis.mode == mode
    torch.testing.assert_close(analysis.decoupled_attention, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["qq", "csa", "all"])
def test_decoupled_weights_reproduce_the_models_dense_features(tiny_clip_dir, pixel_values, mode):
    """The weights shown are the ones the content path uses: A @ v through out_proj gives dense_embeds."""
    model = DeCLIPVisionModel.from_pretrained(tiny_clip_dir, decoupled_attention=mode).eval()
    weights = analyse_attention(model, pixel_values).decoupled_attention
    last = model.encoder.layers[-1]
    with torch.no_grad():
        values = plain_heads(last, layer_inputs(model, pixel_values)[-1], "v")
        attended = (weights @ values).permute(0, 2, 1, 3).flatten(2)  # (B, T, C)
        content = model.visual_projection(model.post_layernorm(last.self_attn.out_proj(attended)[:, 1:]))
        dense = model.get_dense_features(pixel_values).dense_embeds
    expected = F.normalize(content, dim=-1).transpose(1, 2).unflatten(-1, GRID)
    torch.testing.assert_close(dense, expected, atol=1e-5, rtol=1e-4)


def test_every_mode_has_attention_weights():
    assert set(DECOUPLED_ATTENTION_WEIGHTS) == set(DECOUPLED_ATTENTION_MODES)


def test_attention_maps_pick_the_query_row(model, pixel_values):
    analysis = analyse_attention(model, pixel_values)
    weights = analysis.layer_attentions[0]
    query = point_to_patch_index(0.35, 0.8, GRID)  # row 6, column 3
    assert query == 6 * 10 + 3
    torch.testing.assert_close(attention_map(weights, query, GRID), weights[:, :, 1 + query, 1:].unflatten(-1, GRID))
    torch.testing.assert_close(attention_map(weights, CLS_QUERY, GRID), weights[:, :, 0, 1:].unflatten(-1, GRID))
    layers, final = layer_attention_maps(model, pixel_values, query)
    assert layers.shape == (2, 4, *GRID) and final.shape == (4, *GRID)
    expected_final = analysis.decoupled_attention[0, :, 1 + query, 1:].mean(0).unflatten(-1, GRID)
    torch.testing.assert_close(final_layer_attention(model, pixel_values, query), expected_final)
    with pytest.raises(ValueError, match="point_to_patch_index"):
        attention_map(weights, 80, GRID)
    with pytest.raises(ValueError, match="normalised"):
        point_to_patch_index(1.2, 0.5, GRID)


def test_csa_attention_maps_are_normalised_rows(tiny_clip_dir, pixel_values):
    model = DeCLIPVisionModel.from_pretrained(tiny_clip_dir, decoupled_attention="csa").eval()
    weights = analyse_attention(model, pixel_values).decoupled_attention
    torch.testing.assert_close(attention_map(weights, 5, GRID), weights[:, :, 6, 1:].unflatten(-1, GRID) / 2)


# ---------------------------------------------------------------------------------------------------------------------
# Proxy-token score on constructed matrices: the definition, pinned
# ---------------------------------------------------------------------------------------------------------------------

NUM_PATCHES = 12
TOKENS = 1 + NUM_PATCHES


def test_all_rows_on_one_token_is_maximal():
    attention = torch.zeros(TOKENS, TOKENS)
    attention[:, 7] = 1.0
    scores = proxy_token_scores(attention, top_k=3)
    assert scores.proxy_score.item() == pytest.approx(1.0)
    assert scores.top_k_mass.item() == pytest.approx(1.0)
    assert scores.row_similarity.item() == pytest.approx(1.0)


def test_uniform_rows_are_minimal():
    scores = proxy_token_scores(torch.full((TOKENS, TOKENS), 1 / TOKENS), top_k=3)
    assert scores.proxy_score.item() == pytest.approx(0.0, abs=1e-6)
    assert scores.top_k_mass.item() == pytest.approx(3 / TOKENS)
    assert scores.row_similarity.item() == pytest.approx(1.0)  # uniform rows are position-independent, not proxies


def test_identity_is_position_dependent():
    scores = proxy_token_scores(torch.eye(TOKENS), top_k=3)
    assert scores.row_similarity.item() == pytest.approx(0.0, abs=1e-6)
    # Each image token attends only to itself: the received mass is spread over all N patches.
    expected = (3 / NUM_PATCHES - 3 / TOKENS) / (1 - 3 / TOKENS)
    assert scores.proxy_score.item() == pytest.approx(expected)


def test_scores_order_and_batch_shape():
    """A few shared proxies score between the extremes, above local attention; one value per leading index."""
    two_proxies = torch.zeros(TOKENS, TOKENS)
    two_proxies[:, 2], two_proxies[:, 9] = 0.6, 0.4
    local = torch.eye(TOKENS) * 0.5 + torch.roll(torch.eye(TOKENS), 1, dims=1) * 0.5
    stacked = torch.stack([two_proxies, local, torch.full((TOKENS, TOKENS), 1 / TOKENS)])[None]  # (1, 3, T, T)
    scores = proxy_token_scores(stacked, top_k=1)
    assert scores.proxy_score.shape == (1, 3)
    assert scores.proxy_score[0, 0] == pytest.approx((0.6 - 1 / TOKENS) / (1 - 1 / TOKENS))
    assert scores.proxy_score[0, 0] > scores.proxy_score[0, 1] > scores.proxy_score[0, 2]
    assert scores.row_similarity[0, 0] == pytest.approx(1.0) and scores.row_similarity[0, 1] < 0.6
    # csa rows sum to 2: the score reads them as distributions.
    torch.testing.assert_close(proxy_token_scores(2 * stacked, top_k=1).proxy_score, scores.proxy_score)


def test_proxy_score_refuses_bad_shapes_and_k():
    with pytest.raises(ValueError, match="top_k"):
        proxy_token_scores(torch.eye(TOKENS), top_k=TOKENS)
    with pytest.raises(ValueError, match="1\\+N"):
        proxy_token_scores(torch.ones(TOKENS, TOKENS - 1))


def test_model_proxy_scores_average_heads_and_images(model, pixel_values):
    analysis = analyse_attention(model, pixel_values)
    scores = model_proxy_scores(model, pixel_values, top_k=4)
    assert scores.layers == ["1", "2", "2 (qq)"]
    expected_first = proxy_token_scores(analysis.layer_attentions[0], top_k=4).proxy_score.mean()
    assert scores.proxy_score[0].item() == pytest.approx(expected_first.item())
    expected_last = proxy_token_scores(analysis.decoupled_attention, top_k=4).row_similarity.mean()
    assert scores.row_similarity[-1].item() == pytest.approx(expected_last.item())


# ---------------------------------------------------------------------------------------------------------------------
# Correlation maps
# ---------------------------------------------------------------------------------------------------------------------


def written_out_cosine_map(tokens, query_index, grid):
    """(N, C) patch rows -> (h, w): cos(tokens[query], tokens[n]) for each n, one dot product at a time."""
    query = tokens[query_index]
    values = [
        float(query @ tokens[n]) / (math.sqrt(float(query @ query)) * math.sqrt(float(tokens[n] @ tokens[n])))
        for n in range(tokens.shape[0])
    ]
    return torch.tensor(values).view(grid)


def test_correlation_map_is_the_cosine_with_the_query_patch():
    features = torch.randn(2, 6, 3, 5)
    maps = correlation_map(features, 7)
    for image in range(2):
        tokens = features[image].flatten(1).T  # (N, C)
        torch.testing.assert_close(maps[image], written_out_cosine_map(tokens, 7, (3, 5)), atol=1e-6, rtol=1e-5)
    assert maps[0, 1, 2].item() == pytest.approx(1.0)  # the query itself
    with pytest.raises(ValueError, match="not one of the 15 patches"):
        correlation_map(features, CLS_QUERY)  # CLS has no place in a patch map


@pytest.mark.parametrize("mode", ["qq", "csa"])
def test_context_correlation_averages_the_modes_projections(tiny_clip_dir, pixel_values, mode):
    model = DeCLIPVisionModel.from_pretrained(tiny_clip_dir, decoupled_attention=mode).eval()
    last = model.encoder.layers[-1]
    names = {"qq": ["q"], "csa": ["q", "k"]}[mode]
    query = 23
    with torch.no_grad():
        inputs = layer_inputs(model, pixel_values)[-1]
        norm = last.layer_norm1
        normed = F.layer_norm(inputs, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        projections = [plain_projection(getattr(last.self_attn, f"{name}_proj"), normed) for name in names]
    for image in range(2):
        maps = [written_out_cosine_map(projection[image, 1:], query, GRID) for projection in projections]
        expected = sum(maps) / len(maps)
        torch.testing.assert_close(context_correlation(model, pixel_values, query)[image], expected,
                                   atol=1e-5, rtol=1e-4)


def test_context_correlation_needs_a_trainable_mode(tiny_clip_dir, pixel_values):
    model = DeCLIPVisionModel.from_pretrained(tiny_clip_dir, decoupled_attention="vanilla").eval()
    with pytest.raises(ValueError, match="decoupled_attention='qq'"):
        context_correlation(model, pixel_values, 0)


def test_vfm_correlation_reads_patch_tokens_after_registers(tiny_dinov2_registers_dir):
    vfm = VFMPatchFeatures.from_pretrained(tiny_dinov2_registers_dir)
    assert vfm.adapter.num_prefix_tokens == 5 and vfm.patch_size == 2
    pixel_values = torch.randn(1, 3, 16, 20)
    reference = AutoModel.from_pretrained(tiny_dinov2_registers_dir).eval()
    with torch.no_grad():
        patches = reference(pixel_values=pixel_values).last_hidden_state[0, 5:]  # (80, C)
    torch.testing.assert_close(
        vfm_correlation(vfm, pixel_values, 31)[0], written_out_cosine_map(patches, 31, (8, 10)), atol=1e-5, rtol=1e-4
    )


def test_vfm_must_be_a_supported_family(tiny_clip_dir):
    # DINO and SAM are read too since the analysis shares declip_hf.vfm's adapters (tests/test_vfm.py).
    with pytest.raises(ValueError, match="dinov2, dinov2_with_registers, vit, sam"):
        VFMPatchFeatures.from_pretrained(tiny_clip_dir)
