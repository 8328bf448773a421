"""declip_hf.analysis on EVA02 students (docs/method.md §1.5, §8): each layer's attention against a written-out
rotary q-k softmax and against the block's own output, the decoupled weights against what the last block's dense
path computes in every mode, and the analyze / demo commands on a tiny EVA02 DeCLIP."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from declip_hf.analysis import (
    CLS_QUERY,
    ENCODER_READERS,
    analyse_attention,
    attention_map,
    context_correlation,
    encoder_reader,
    final_layer_attention,
    layer_attention_maps,
    model_proxy_scores,
)
from declip_hf.analyze import main as analyze_main
from declip_hf.models.configuration_declip import DECOUPLED_ATTENTION_MODES
from declip_hf.models.preprocessing import prepare_dense_inputs
from declip_hf.segmentation import DeCLIPSegmenter
from declip_hf.segmentation.demo import DemoSettings, point_maps
from tests.test_modeling_eva import heads, layer_norm, merge, pixels, qkv, rope_reference, tiny_eva_model

GRID = (4, 6)  # tests.test_modeling_eva's 32 x 48 input on 8-px patches: not square


@pytest.fixture(scope="module")
def eva_model():
    return tiny_eva_model()  # q/v biases and norms perturbed, so a dropped bias or sub-LN shows


def block_inputs(model, pixel_values):
    with torch.no_grad():
        return model(pixel_values, output_hidden_states=True).hidden_states


def written_out_attention(block, x, grid, config):
    """softmax(rot(q) rot(k)ᵀ / sqrt(d)) with q = norm1(x) Wq + q_bias, k = norm1(x) Wk, rotary on patch rows only."""
    q, k, _ = (heads(t, config.num_attention_heads) for t in qkv(block, layer_norm(x, block.norm1)))
    rotate = dict(reference=config.rope_reference_grid, theta=config.rope_theta)
    q, k = rope_reference(q, *grid, **rotate), rope_reference(k, *grid, **rotate)
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)


def block_from_weights(block, x, weights, num_heads, residual_and_mlp=True):
    """The block's output when its attention uses `weights`: A v through the sub-LN and proj, then (for the
    ordinary block and MaskCLIP) the residual and the MLP."""
    values = heads(qkv(block, layer_norm(x, block.norm1))[2], num_heads)
    attended = block.attn.proj(layer_norm(merge(weights.to(values.dtype) @ values), block.attn.inner_attn_ln))
    if not residual_and_mlp:
        return attended
    x = x + attended
    mlp, y = block.mlp, layer_norm(x, block.norm2)
    return x + mlp.w3(layer_norm(F.silu(mlp.w1(y)) * mlp.w2(y), mlp.ffn_ln))


def test_both_families_have_a_reader_and_others_are_named(eva_model, tiny_clip_dir):
    assert set(ENCODER_READERS) == {"declip_vision_model", "declip_eva_vision_model"}
    other = torch.nn.Linear(2, 2)
    other.config = type("Config", (), {"model_type": "vit"})()
    with pytest.raises(ValueError, match="declip_vision_model, declip_eva_vision_model, not 'vit'"):
        encoder_reader(other)


def test_every_layers_attention_is_the_written_out_rotary_softmax(eva_model):
    pixel_values = pixels()
    analysis = analyse_attention(eva_model, pixel_values)
    inputs = block_inputs(eva_model, pixel_values)
    assert analysis.grid_size == GRID and len(analysis.layer_attentions) == 2
    with torch.no_grad():
        for block, x, weights in zip(eva_model.blocks, inputs, analysis.layer_attentions):
            assert weights.shape == (2, 2, 1 + 24, 1 + 24)
            expected = written_out_attention(block, x, GRID, eva_model.config)
            torch.testing.assert_close(weights, expected, atol=1e-6, rtol=1e-5)


def test_every_layers_attention_reproduces_the_blocks_output(eva_model):
    """The weights shown are the ones each block attends with: its output follows from them and its values."""
    pixel_values = pixels()
    analysis = analyse_attention(eva_model, pixel_values)
    inputs = block_inputs(eva_model, pixel_values)
    with torch.no_grad():
        for index, (block, weights) in enumerate(zip(eva_model.blocks, analysis.layer_attentions)):
            rebuilt = block_from_weights(block, inputs[index], weights, eva_model.config.num_attention_heads)
            torch.testing.assert_close(rebuilt, inputs[index + 1], atol=1e-5, rtol=1e-4)


def test_rotary_matters_for_the_analysis(eva_model):
    """Without the rotary embedding the weights differ: the check above would see a reader that skipped it."""
    pixel_values = pixels()
    block, x = eva_model.blocks[0], block_inputs(eva_model, pixel_values)[0]
    with torch.no_grad():
        q, k, _ = (heads(t, 2) for t in qkv(block, layer_norm(x, block.norm1)))
        unrotated = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    assert (analyse_attention(eva_model, pixel_values).layer_attentions[0] - unrotated).abs().max() > 1e-3


@pytest.mark.parametrize("mode", DECOUPLED_ATTENTION_MODES)
def test_decoupled_weights_are_what_the_last_blocks_dense_path_uses(eva_model, mode):
    """A v through the mode's path gives the model's own dense features: the weights are those it computes with."""
    eva_model.config.decoupled_attention = mode
    try:
        pixel_values = pixels()
        analysis = analyse_attention(eva_model, pixel_values)
        dense = eva_model.get_dense_features(pixel_values).dense_embeds
        last, x = eva_model.blocks[-1], block_inputs(eva_model, pixel_values)[-2]
        with torch.no_grad():
            tokens = block_from_weights(last, x, analysis.decoupled_attention, eva_model.config.num_attention_heads,
                                        residual_and_mlp=mode in ("vanilla", "maskclip"))
            content = layer_norm(tokens[:, 1:], eva_model.norm) @ eva_model.head.weight.T + eva_model.head.bias
        expected = F.normalize(content, dim=-1).transpose(1, 2).unflatten(-1, GRID)
        assert analysis.mode == mode
        torch.testing.assert_close(dense, expected, atol=1e-5, rtol=1e-4)
        query = 9
        averaged = attention_map(analysis.decoupled_attention[0], query, GRID).mean(0)
        torch.testing.assert_close(final_layer_attention(eva_model, pixel_values, query), averaged)
    finally:
        eva_model.config.decoupled_attention = "csa"


def test_self_similarity_weights_are_unscaled_and_unrotated(eva_model):
    """§8's `ss_attn` for csa, written out: softmax(q qᵀ) + softmax(k kᵀ), no 1/sqrt(d), no rotary."""
    eva_model.config.decoupled_attention = "csa"
    pixel_values = pixels()
    last, x = eva_model.blocks[-1], block_inputs(eva_model, pixel_values)[-2]
    with torch.no_grad():
        q, k, _ = (heads(t, 2) for t in qkv(last, layer_norm(x, last.norm1)))
        expected = torch.softmax(q @ q.transpose(-1, -2), -1) + torch.softmax(k @ k.transpose(-1, -2), -1)
    layers, decoupled = layer_attention_maps(eva_model, pixel_values, CLS_QUERY)
    assert layers.shape == (2, 2, *GRID) and decoupled.shape == (2, *GRID)
    torch.testing.assert_close(analyse_attention(eva_model, pixel_values).decoupled_attention, expected,
                               atol=1e-6, rtol=1e-5)


def test_context_correlation_of_an_eva_student_is_its_projections_cosines(eva_model):
    eva_model.config.decoupled_attention = "qq"
    try:
        pixel_values = pixels()
        last, x = eva_model.blocks[-1], block_inputs(eva_model, pixel_values)[-2]
        with torch.no_grad():
            q = qkv(last, layer_norm(x, last.norm1))[0][:, 1:]  # (B, N, C), CLS dropped
        unit = F.normalize(q, dim=-1)
        expected = (unit @ unit[:, 7:8].transpose(1, 2))[..., 0].unflatten(-1, GRID)
        torch.testing.assert_close(context_correlation(eva_model, pixel_values, 7), expected, atol=1e-5, rtol=1e-4)
    finally:
        eva_model.config.decoupled_attention = "csa"


def test_analyze_command_reads_an_eva_checkpoint(tiny_eva_dir, tiny_clip_dir, tmp_path):
    Image.new("RGB", (40, 32), (120, 80, 200)).save(tmp_path / "scene.png")
    out = tmp_path / "out"
    report = analyze_main([str(tmp_path / "scene.png"), "--model", str(tiny_eva_dir), "--compare", str(tiny_clip_dir),
                           "--out", str(out), "--figure-images", "1", "--top-k", "3"])
    entry = report["models"][f"{tiny_eva_dir.name} (csa)"]
    assert entry["layers"] == ["1", "2", "2 (csa)"] and entry["decoupled_attention"] == "csa"
    assert f"attention_{tiny_eva_dir.name}_csa_scene.png" in report["figures"]
    assert json.loads((out / "scores.json").read_text())["models"].keys() == report["models"].keys()
    segmenter = DeCLIPSegmenter.from_pretrained(tiny_eva_dir)  # the same letterboxed, normalised input
    pixel_values = prepare_dense_inputs(Image.open(tmp_path / "scene.png"), 32,
                                        segmenter.image_mean.flatten().tolist(), segmenter.image_std.flatten().tolist())
    scores = model_proxy_scores(segmenter.vision_model, pixel_values, top_k=3)
    assert entry["proxy_score"]["per_image"][0] == pytest.approx(scores.proxy_score.tolist(), abs=1e-6)


def test_demo_point_maps_of_an_eva_checkpoint(tiny_eva_dir):
    segmenter = DeCLIPSegmenter.from_pretrained(tiny_eva_dir)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    settings = DemoSettings(shorter_side=32, window=32, stride=16, logit_scale=40.0, map_size=32)
    maps = point_maps(segmenter, image, 45, 12, settings)
    assert maps.correlation.size == maps.attention.size == image.size
    assert "'csa'" in maps.caption and "8x8 grid" in maps.caption
