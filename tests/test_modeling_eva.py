"""The EVA02-CLIP student (docs/method.md §8) against written-out computations and timm's Eva."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torchvision.ops import roi_align
from transformers import AutoConfig, AutoModel

from declip_hf import DeCLIPEvaVisionConfig, DeCLIPEvaVisionModel
from declip_hf.models.configuration_declip import DECOUPLED_ATTENTION_MODES


HEIGHT, WIDTH = 32, 48  # non-square on purpose: a 4 x 6 grid of 8-px patches


def tiny_eva_config(**overrides) -> DeCLIPEvaVisionConfig:
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=85, image_size=32,
                 patch_size=8, projection_dim=16)
    return DeCLIPEvaVisionConfig(**{**sizes, **overrides})


def tiny_eva_model(**overrides) -> DeCLIPEvaVisionModel:
    torch.manual_seed(0)
    model = DeCLIPEvaVisionModel(tiny_eva_config(**overrides)).eval()
    with torch.no_grad():  # non-trivial biases and norms, so a dropped bias or sub-LN shows
        for name, parameter in model.named_parameters():
            if "bias" in name or "ln" in name or "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return model


def pixels(height=HEIGHT, width=WIDTH, batch=2):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------ written-out EVA02 (§8) ----------------------------------------------


def layer_norm(x, module):
    return F.layer_norm(x, (x.shape[-1],), module.weight, module.bias, module.eps)


def heads(x, num_heads):
    batch, tokens, width = x.shape
    return x.reshape(batch, tokens, num_heads, width // num_heads).permute(0, 2, 1, 3)


def merge(x):
    batch, num_heads, tokens, head_dim = x.shape
    return x.permute(0, 2, 1, 3).reshape(batch, tokens, num_heads * head_dim)


def rope_reference(x, grid_height, grid_width, reference=16, theta=10000.0):
    """Rotary embedding as complex multiplication: channel pairs (2j, 2j+1) of the first half turn by
    row_position * theta^(-2j / (d/2)), those of the second half by column_position * the same."""
    head_dim = x.shape[-1]
    axis_pairs = head_dim // 4
    inverse = theta ** (-torch.arange(axis_pairs, dtype=torch.float64) * 2 / (head_dim // 2))
    angles = []
    for row in range(grid_height):
        for column in range(grid_width):
            row_position, column_position = row / grid_height * reference, column / grid_width * reference
            angles.append(torch.cat([row_position * inverse, column_position * inverse]))
    rotation = torch.polar(torch.ones(len(angles), 2 * axis_pairs, dtype=torch.float64), torch.stack(angles))
    patches = torch.view_as_complex(x[..., 1:, :].double().reshape(*x.shape[:-2], -1, head_dim // 2, 2).contiguous())
    rotated = torch.view_as_real(patches * rotation).reshape(*x.shape[:-2], -1, head_dim).to(x.dtype)
    return torch.cat([x[..., :1, :], rotated], dim=-2)


def qkv(block, y):
    attention = block.attn
    return (y @ attention.q_proj.weight.T + attention.q_bias, y @ attention.k_proj.weight.T,
            y @ attention.v_proj.weight.T + attention.v_bias)


def block_reference(block, x, grid, num_heads):
    q, k, v = (heads(t, num_heads) for t in qkv(block, layer_norm(x, block.norm1)))
    q, k = rope_reference(q, *grid), rope_reference(k, *grid)
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    attention = block.attn
    x = x + attention.proj(layer_norm(merge(weights @ v), attention.inner_attn_ln))
    mlp, y = block.mlp, layer_norm(x, block.norm2)
    return x + mlp.w3(layer_norm(F.silu(mlp.w1(y)) * mlp.w2(y), mlp.ffn_ln))


def embed_reference(model, pixel_values):
    grid = (pixel_values.shape[2] // 8, pixel_values.shape[3] // 8)
    patches = F.conv2d(pixel_values, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=8)
    tokens = torch.cat([model.cls_token.expand(len(pixel_values), -1, -1), patches.flatten(2).transpose(1, 2)], 1)
    square = model.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(square, size=grid, mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    return tokens + torch.cat([model.pos_embed[:, :1], resized], dim=1), grid


def decoupled_reference(model, pixel_values, mode):
    """§8's `ss_attn`: no scale, no rope, sub-LN then proj; content = head(norm(patch rows)), unnormalised."""
    x, grid = embed_reference(model, pixel_values)
    num_heads = model.config.num_attention_heads
    x = block_reference(model.blocks[0], x, grid, num_heads)
    block = model.blocks[1]
    q, k, v = qkv(block, layer_norm(x, block.norm1))
    hq, hk, hv = heads(q, num_heads), heads(k, num_heads), heads(v, num_heads)
    gram = {"q": hq @ hq.transpose(-1, -2), "k": hk @ hk.transpose(-1, -2), "v": hv @ hv.transpose(-1, -2)}
    weights = {
        "qq": torch.softmax(gram["q"], -1),
        "kk": torch.softmax(gram["k"], -1),
        "vv": torch.softmax(gram["v"], -1),
        "csa": torch.softmax(gram["q"], -1) + torch.softmax(gram["k"], -1),
        "all": torch.softmax((gram["q"] + gram["k"] + gram["v"]) / 3, -1),
    }[mode]
    tokens = block.attn.proj(layer_norm(merge(weights @ hv), block.attn.inner_attn_ln))
    content = layer_norm(tokens[:, 1:], model.norm) @ model.head.weight.T + model.head.bias
    dense_map = content.transpose(1, 2).reshape(len(pixel_values), -1, *grid)
    context = {"qq": (q,), "kk": (k,), "vv": (v,), "csa": (q, k), "all": (q, k, v)}[mode]
    return dense_map, tuple(feature[:, 1:] for feature in context)


# ---------------------------------------------------------- tests ----------------------------------------------------


def test_ordinary_forward_matches_a_written_out_eva02_on_a_non_square_input():
    model = tiny_eva_model()
    with torch.no_grad():
        x, grid = embed_reference(model, pixels())
        for block in model.blocks:
            x = block_reference(block, x, grid, model.config.num_attention_heads)
        expected = layer_norm(x[:, 0], model.norm) @ model.head.weight.T + model.head.bias
        torch.testing.assert_close(model.get_image_features(pixels()).pooler_output, expected, atol=1e-5, rtol=1e-4)


def test_ordinary_forward_matches_timms_eva02_clip():
    timm_eva = pytest.importorskip("timm.models.eva")
    model = tiny_eva_model()
    reference = timm_eva.Eva(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, qkv_fused=False, mlp_ratio=85 / 32,
        swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=(16, 16),
        num_classes=16, global_pool="token",
    ).eval()
    renames = {".attn.inner_attn_ln.": ".attn.norm.", ".mlp.w1.": ".mlp.fc1_g.", ".mlp.w2.": ".mlp.fc1_x.",
               ".mlp.ffn_ln.": ".mlp.norm.", ".mlp.w3.": ".mlp.fc2.", ".attn.q_bias": ".attn.q_proj.bias",
               ".attn.v_bias": ".attn.v_proj.bias"}
    state = {}
    for name, tensor in model.state_dict().items():
        for ours, theirs in renames.items():
            name = name.replace(ours, theirs)
        state[name] = tensor
    reference.load_state_dict(state, strict=False)
    missing = set(reference.state_dict()) - set(state)
    assert all(".k_bias" in name or "rope" in name for name in missing), missing
    square = pixels(32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.get_image_features(square).pooler_output, reference(square), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["qq", "kk", "vv", "csa", "all"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_every_decoupled_mode_matches_the_written_out_ss_attn(mode, attn_implementation):
    model = tiny_eva_model(decoupled_attention=mode)
    model.config._attn_implementation = attn_implementation
    with torch.no_grad():
        output = model.get_dense_features(pixels())
        dense_map, context = decoupled_reference(model, pixels(), mode)
    assert output.dense_embeds.shape == (2, 16, 4, 6)
    torch.testing.assert_close(output.dense_embeds, F.normalize(dense_map, dim=1), atol=1e-5, rtol=1e-4)
    assert len(output.context_features) == len(context)
    for ours, expected in zip(output.context_features, context):
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_decoupled_path_differs_from_the_scaled_or_rotated_variants():
    """Guards the three §8 differences: a 1/sqrt(d) scale or rope in the decoupled path would change the output."""
    model = tiny_eva_model(decoupled_attention="qq")
    with torch.no_grad():
        ours = model.get_dense_features(pixels()).dense_embeds
        model.config.decoupled_attention = "vanilla"
        assert not torch.allclose(ours, model.get_dense_features(pixels()).dense_embeds, atol=1e-3)
        model.config.decoupled_attention = "maskclip"
        assert model.get_dense_features(pixels()).context_features == ()


class RampScale(torch.nn.Module):
    """Patch i: (its tokens + a fixed random direction) * a length growing with i."""

    def forward(self, tokens):
        offsets = torch.randn(tokens.shape[1:], generator=torch.Generator().manual_seed(2))
        return (tokens + offsets) * torch.linspace(0.2, 3.0, tokens.shape[1])[:, None]


def test_region_and_mask_pooling_pool_the_raw_map_then_normalise():
    model = tiny_eva_model(decoupled_attention="csa")
    # A final "norm" that turns and scales each patch differently (and no head bias) makes the features' directions
    # and lengths vary widely, so the pooling order shows in the result. (The real map is checked against the written-out path above.)
    model.norm = RampScale()
    model.head.bias.data.zero_()
    boxes = [torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.25, 0.25, 1.0, 0.75]])] * 2
    masks = [torch.zeros(2, HEIGHT, WIDTH)] * 2
    masks[0][0, :16, :24] = 1
    masks[0][1, 8:, 16:] = 1
    with torch.no_grad():
        raw_map = model._dense_map_and_context(pixels())[0]
        regions = torch.cat(model.get_region_features(pixels(), boxes))
        mask_features = torch.cat(model.get_mask_features(pixels(), masks))
    lengths = raw_map.norm(dim=1)
    assert lengths.std() / lengths.mean() > 0.1
    scale = torch.tensor([6.0, 4.0, 6.0, 4.0])
    rois = [image_boxes * scale for image_boxes in boxes]
    expected = F.normalize(roi_align(raw_map, rois, output_size=1, sampling_ratio=-1, aligned=True).flatten(1), dim=-1)
    torch.testing.assert_close(regions, expected, atol=1e-5, rtol=1e-4)
    normalised_first = roi_align(F.normalize(raw_map, dim=1), rois, output_size=1, sampling_ratio=-1, aligned=True)
    assert not torch.allclose(regions, F.normalize(normalised_first.flatten(1), dim=-1), atol=1e-4)
    # A mask covering whole patches is the mean of their raw features, normalised.
    expected_mask = F.normalize(raw_map[0, :, :2, :3].mean(dim=(1, 2)), dim=0)
    torch.testing.assert_close(mask_features[0], expected_mask, atol=1e-5, rtol=1e-4)


def test_save_reload_auto_classes_and_modes(tmp_path):
    model = tiny_eva_model(decoupled_attention="all")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "modeling_declip_eva.py").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "declip_eva_vision_model"
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is DeCLIPEvaVisionModel
    with torch.no_grad():
        assert torch.equal(loaded.get_dense_features(pixels()).dense_embeds, model.get_dense_features(pixels()).dense_embeds)
    assert DeCLIPEvaVisionModel.from_pretrained(tmp_path, decoupled_attention="kk").config.decoupled_attention == "kk"
    with pytest.raises(ValueError, match="valid values are"):
        DeCLIPEvaVisionConfig(decoupled_attention="nope")
    assert set(DECOUPLED_ATTENTION_MODES) == {"qq", "kk", "vv", "csa", "all", "vanilla", "maskclip"}


def test_refuses_a_checkpoint_missing_weights(tmp_path):
    model = tiny_eva_model()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({name: tensor for name, tensor in state.items() if not name.startswith("head.")}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="declip-convert CKPT --arch"):
        DeCLIPEvaVisionModel.from_pretrained(tmp_path)


def test_loads_in_bfloat16_close_to_float32(tmp_path):
    model = tiny_eva_model()
    model.save_pretrained(tmp_path)
    bf16 = DeCLIPEvaVisionModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    with torch.no_grad():
        dense = bf16.get_dense_features(pixels().bfloat16()).dense_embeds
        regions = bf16.get_region_features(pixels().bfloat16(), [torch.tensor([[0.0, 0.0, 1.0, 1.0]])] * 2)
        expected = model.get_dense_features(pixels()).dense_embeds
    assert dense.dtype == torch.bfloat16 and regions[0].dtype == torch.bfloat16
    assert F.cosine_similarity(dense.float(), expected, dim=1).min() > 0.98


def test_input_not_a_multiple_of_the_patch_size_is_refused():
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        tiny_eva_model().get_dense_features(pixels(30, 48))


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["declip_hf"] = None  # any `import declip_hf` now raises ImportError
    folder, inputs_file, outputs_file = sys.argv[1:]
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__name__ == "DeCLIPEvaVisionModel", type(model)
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    with torch.no_grad():
        dense = model.get_dense_features(load_file(inputs_file)["pixel_values"]).dense_embeds
    save_file({"dense": dense.contiguous()}, outputs_file)
    """
)


def test_trust_remote_code_loads_without_the_package(tmp_path):
    model = tiny_eva_model(decoupled_attention="csa")
    model.save_pretrained(tmp_path / "model")
    save_file({"pixel_values": pixels()}, tmp_path / "inputs.safetensors")
    (tmp_path / "remote.py").write_text(REMOTE_CODE_SCRIPT)
    env = {"PATH": "", "PYTHONPATH": "", "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "HOME": str(tmp_path)}
    arguments = [tmp_path / "model", tmp_path / "inputs.safetensors", tmp_path / "out.safetensors"]
    result = subprocess.run([sys.executable, "remote.py", *map(str, arguments)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    with torch.no_grad():
        expected = model.get_dense_features(pixels()).dense_embeds
    assert torch.equal(load_file(tmp_path / "out.safetensors")["dense"], expected)


def test_activation_checkpointing_gives_the_same_gradients():
    """distill's --gradient_checkpointing: the checkpointed blocks recompute in backward, same gradients."""
    plain, checkpointed = tiny_eva_model(decoupled_attention="csa"), tiny_eva_model(decoupled_attention="csa")
    checkpointed.activation_checkpointing_enable()
    grads = []
    for model in (plain, checkpointed):
        model.train()
        model.get_dense_features(pixels()).dense_embeds.square().sum().backward()
        grads.append(model.blocks[0].attn.q_proj.weight.grad)
    assert checkpointed.blocks[0].gradient_checkpointing
    torch.testing.assert_close(grads[0], grads[1])


def test_the_clip_class_points_an_eva_folder_to_the_eva_class(tmp_path):
    from declip_hf import DeCLIPVisionModel

    tiny_eva_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="loads with DeCLIPEvaVisionModel"):
        DeCLIPVisionModel.from_pretrained(tmp_path)
