"""The context teachers (adapters in declip_hf/vfm/, wrappers in training/teachers/; docs/method.md §9): the registry,
each adapter's features against a plain computation on a tiny random model, and the per-teacher views."""

import math
import random

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, SamVisionConfig
from transformers.models.sam.modeling_sam import SamVisionEncoder

from declip_hf import DeCLIPEvaVisionModel, DeCLIPVisionModel
from training.teachers import (
    VFM_ADAPTERS,
    ContextTeachers,
    FrozenCLIPTeacher,
    FrozenVFM,
    check_vfm_config,
    vfm_patch_size,
)
from training.tiny_assets import TINY_DINO_PATCH_SIZE, TINY_SAM_PATCH_SIZE
from training.views import ViewConfig, VFMView, make_views


# ---------------------------------------------------------------------------------------------------------- registry


def test_registry_covers_every_supported_family_and_names_them_for_any_other(tiny_clip_dir):
    assert set(VFM_ADAPTERS) == {"dinov2", "dinov2_with_registers", "vit", "sam", "sam_vision_model"}
    with pytest.raises(ValueError) as error:
        check_vfm_config(AutoConfig.from_pretrained(tiny_clip_dir), "my/clip")
    message = str(error.value)
    assert "'my/clip' is a 'clip' model" in message
    assert all(model_type in message for model_type in VFM_ADAPTERS)
    assert "facebook/sam-vit-base" in message and "facebook/dino-vitb16" in message


def test_patch_size_comes_from_each_teachers_config(tiny_dino_dir, tiny_sam_dir, tiny_dinov2_dir):
    assert vfm_patch_size(AutoConfig.from_pretrained(tiny_dino_dir), "dino") == TINY_DINO_PATCH_SIZE
    # SamConfig nests the encoder's settings in vision_config; a saved SamVisionModel has them at the top.
    assert vfm_patch_size(AutoConfig.from_pretrained(tiny_sam_dir), "sam") == TINY_SAM_PATCH_SIZE == 4
    assert vfm_patch_size(SamVisionConfig(patch_size=8), "sam vision") == 8
    assert vfm_patch_size(AutoConfig.from_pretrained(tiny_dinov2_dir), "dinov2") == 2


# ---------------------------------------------------------------------------------------------------------- DINO


@pytest.mark.parametrize("side", [32, 20])  # the checkpoint's own size, and another grid (resized positions)
def test_dino_features_are_the_final_normed_last_block_without_cls(side, tiny_dino_dir):
    model = AutoModel.from_pretrained(tiny_dino_dir)
    pixels = torch.randn(2, 3, side, side)
    with torch.no_grad():
        last_block = model(pixel_values=pixels, interpolate_pos_encoding=True,
                           output_hidden_states=True).hidden_states[-1]  # before the final norm
        expected_tokens = model.layernorm(last_block)[:, 1:]
    features = FrozenVFM(model)(pixels)
    grid = side // TINY_DINO_PATCH_SIZE
    assert features.shape == (2, model.config.hidden_size, grid, grid)
    for row, col in [(0, 0), (0, grid - 1), (grid - 1, 2), (grid // 2, grid // 3)]:
        torch.testing.assert_close(features[:, :, row, col], expected_tokens[:, row * grid + col])


# ---------------------------------------------------------------------------------------------------------- SAM


def _cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys' cubic convolution weights of the 4 neighbours at offsets -1, 0, 1, 2 (PyTorch's bicubic, A = -0.75)."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _resize_matrix(source: int, target: int, cubic: bool) -> torch.Tensor:
    """(target, source) matrix of a 1-d resize with align_corners=False: bicubic (borders clamped) or linear."""
    matrix = torch.zeros(target, source, dtype=torch.float64)
    for out in range(target):
        x = (out + 0.5) * source / target - 0.5
        if cubic:
            base = math.floor(x)
            for offset, weight in zip((-1, 0, 1, 2), _cubic_weights(x - base)):
                matrix[out, min(max(base + offset, 0), source - 1)] += weight
        else:
            x = max(x, 0.0)
            base = min(math.floor(x), source - 1)
            matrix[out, base] += 1 - (x - base)
            matrix[out, min(base + 1, source - 1)] += x - base
    return matrix


def test_written_out_resizes_match_torch():
    """The test's own resizes are what the method names (bicubic / linear, align_corners=False)."""
    grid = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    cubic = _resize_matrix(8, 11, cubic=True)
    torch.testing.assert_close(cubic @ grid[0, 0] @ cubic.T, torch.nn.functional.interpolate(
        grid, size=(11, 11), mode="bicubic", align_corners=False)[0, 0])
    table = torch.randn(15, 4, dtype=torch.float64)
    torch.testing.assert_close(_resize_matrix(15, 21, cubic=False) @ table, torch.nn.functional.interpolate(
        table.T[None], size=21, mode="linear")[0].T)


def test_sam_refuses_other_sizes_by_itself(tiny_sam_dir):
    encoder = AutoModel.from_pretrained(tiny_sam_dir).vision_encoder
    with pytest.raises(ValueError, match="doesn't match model"):
        encoder(torch.randn(1, 3, 44, 44))


def test_sam_at_its_own_size_is_the_encoder_with_its_neck(tiny_sam_dir):
    model = AutoModel.from_pretrained(tiny_sam_dir)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.get_image_embeddings(pixels)  # (B, 24, 8, 8): the encoder including its neck
    torch.testing.assert_close(FrozenVFM(model)(pixels), expected)


def test_sam_at_another_size_equals_a_sam_built_for_that_size(tiny_sam_dir):
    """A 44 px view (11 x 11 grid) against an encoder configured for 44 px whose absolute position embedding is the
    8 x 8 one resized bicubically and whose global block's relative tables (15 rows for 8 patches) are resized
    linearly to 21 rows, all written out here; the windowed block keeps its 4 x 4 window tables."""
    model = AutoModel.from_pretrained(tiny_sam_dir)
    source = model.vision_encoder
    assert source.pos_embed.abs().sum() > 0  # random, not SAM's zero initialisation: the resize matters
    side, grid = 44, 11
    config = SamVisionConfig(**{**source.config.to_dict(), "image_size": side})
    reference = SamVisionEncoder(config).eval()
    state = {name: tensor.clone() for name, tensor in source.state_dict().items()}
    cubic = _resize_matrix(8, grid, cubic=True).float()
    state["pos_embed"] = torch.einsum("ih,jw,bhwc->bijc", cubic, cubic, source.pos_embed.detach())
    for index in config.global_attn_indexes:
        for axis in ("h", "w"):
            name = f"layers.{index}.attn.rel_pos_{axis}"
            state[name] = (_resize_matrix(2 * 8 - 1, 2 * grid - 1, cubic=False).float() @ state[name])
    reference.load_state_dict(state)
    pixels = torch.randn(2, 3, side, side)
    with torch.no_grad():
        expected = reference(pixels).last_hidden_state
    features = FrozenVFM(model)(pixels)
    assert features.shape == (2, config.output_channels, grid, grid) and features.std() > 0.5  # not all ~0
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
    # The resize changes the features: reading the 8 x 8 embedding's top-left corner instead would not match.
    state["pos_embed"] = torch.nn.functional.pad(source.pos_embed.detach(), (0, 0, 0, 3, 0, 3))
    reference.load_state_dict(state)
    with torch.no_grad():
        assert not torch.allclose(reference(pixels).last_hidden_state, features, atol=1e-3)


def test_sam_adapter_keeps_only_the_vision_encoder_frozen(tiny_sam_dir):
    model = AutoModel.from_pretrained(tiny_sam_dir)
    vfm = FrozenVFM(model, dtype=torch.bfloat16)
    parameters = dict(vfm.named_parameters())
    assert parameters and all(name.startswith("adapter.model.") for name in parameters)
    assert sum(p.numel() for p in parameters.values()) == sum(p.numel() for p in model.vision_encoder.parameters())
    assert not any(p.requires_grad for p in parameters.values())
    features = vfm(torch.randn(1, 3, 64, 64))
    assert features.dtype == torch.float32 and features.shape == (1, 24, 16, 16)


# ---------------------------------------------------------------------------------------------------------- views


def test_each_teacher_gets_its_view_at_its_patch_size():
    sam_view = VFMView(patch=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    config = ViewConfig(student_size=64, student_patch=4, teacher_size=32, vfm_patch=2, extra_vfm_views=(sam_view,))
    assert list(config.vfm_views) == ["vfm", "vfm_1"] and config.source_side == max(64, 16 * 4, 32 * 6)
    image = PIL.Image.fromarray(np.full((30, 40, 3), 255, dtype=np.uint8))  # white, letterboxed at the bottom
    views = make_views(image, config, random.Random(0))
    assert views["vfm"].shape == (3, 32, 32) and views["vfm_1"].shape == (3, 64, 64)
    # white -> (1 - mean) / std in each view's own normalisation; padding (black) -> -mean / std
    torch.testing.assert_close(views["vfm_1"][:, 0, 0], torch.full((3,), 2.0))
    torch.testing.assert_close(views["vfm_1"][:, -1, 0], torch.full((3,), -2.0))
    assert views["vfm"][0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, abs=1e-5)


def test_no_vfm_view_without_a_context_teacher():
    config = ViewConfig(student_size=64, student_patch=4, teacher_size=32, vfm_patch=None)
    image = PIL.Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8))
    assert set(make_views(image, config, random.Random(0))) == {"student", "crops", "boxes", "crop_valid"}
    with pytest.raises(ValueError, match="first VFM view"):
        ViewConfig(vfm_patch=None, extra_vfm_views=(VFMView(patch=16),))


def test_context_teachers_read_their_own_views(tiny_dino_dir, tiny_sam_dir):
    dino, sam = (FrozenVFM(AutoModel.from_pretrained(path)) for path in (tiny_dino_dir, tiny_sam_dir))
    teachers = ContextTeachers([dino, sam], ["vfm", "vfm_1"])
    batch = {"vfm": torch.randn(2, 3, 32, 32), "vfm_1": torch.randn(2, 3, 64, 64)}
    dino_map, sam_map = teachers(batch)
    torch.testing.assert_close(dino_map, dino(batch["vfm"]))
    torch.testing.assert_close(sam_map, sam(batch["vfm_1"]))
    assert dino_map.shape[-2:] == sam_map.shape[-2:] == (16, 16)
    assert ContextTeachers([], [])(batch) == ()


# ------------------------------------------------------------------------------------------------- content teacher
@pytest.mark.parametrize("family", ["clip", "eva02"])
@pytest.mark.parametrize("side", [32, 48])  # the checkpoint's own size, and crops that resize the position embedding
def test_content_teacher_runs_the_last_layer_for_cls_only_with_the_models_own_embedding(
        family, side, tiny_clip_dir, tiny_eva_dir):
    """The teacher's shortcut (last layer for the CLS query only) gives `get_image_features`' embedding, and the
    last layer's MLP really sees one token per crop."""
    model_class, folder = {"clip": (DeCLIPVisionModel, tiny_clip_dir),
                           "eva02": (DeCLIPEvaVisionModel, tiny_eva_dir)}[family]
    crops = torch.randn(5, 3, side, side, generator=torch.Generator().manual_seed(side))
    reference_model = model_class.from_pretrained(folder).eval()
    extra = {"interpolate_pos_encoding": True} if family == "clip" else {}
    with torch.no_grad():
        expected = F.normalize(reference_model.get_image_features(crops, **extra).pooler_output, dim=-1)

    teacher = FrozenCLIPTeacher(model_class.from_pretrained(folder))
    last = teacher.model.encoder.layers[-1] if family == "clip" else teacher.model.blocks[-1]
    mlp_inputs = []
    last.mlp.register_forward_hook(lambda module, inputs, output: mlp_inputs.append(inputs[0].shape))
    embeds = teacher(crops)

    torch.testing.assert_close(embeds, expected, atol=2e-6, rtol=0)
    assert mlp_inputs == [torch.Size([5, 1, last.mlp.fc1.in_features if family == "clip" else last.mlp.w1.in_features])]
    assert embeds.dtype == torch.float32 and not embeds.requires_grad


def test_content_teacher_refuses_a_model_it_has_no_cls_path_for(tiny_dinov2_dir):
    with pytest.raises(ValueError, match="No content teacher for a 'dinov2' model"):
        FrozenCLIPTeacher(AutoModel.from_pretrained(tiny_dinov2_dir))
