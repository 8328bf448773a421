"""DeCLIPVisionModel against computations written out plainly from docs/method.md (section 1 and 2)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

from declip_hf import DECOUPLED_ATTENTION_MODES, TRAINABLE_ATTENTION_MODES, DeCLIPVisionConfig, DeCLIPVisionModel
from declip_hf.models.region_pooling import pool_boxes, pool_masks

# Odd sizes everywhere (37, 24, 4 heads of 8) so that a swapped axis or head split cannot go unnoticed.
TINY = dict(
    image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
    projection_dim=24,
)
PATCH = TINY["patch_size"]
HEADS = TINY["num_attention_heads"]


def make_model(mode: str = "qq", seed: int = 0) -> DeCLIPVisionModel:
    """A tiny model with weights large enough that attention is far from uniform (CLIP's init is nearly flat)."""
    model = DeCLIPVisionModel(DeCLIPVisionConfig(**TINY, decoupled_attention=mode)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) * 0.3
            is_norm_scale = name.endswith("weight") and parameter.ndim == 1
            parameter.copy_(1 + noise if is_norm_scale else noise)
    return model


def pixels(batch_size: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch_size, 3, height, width, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------------------
# The reference: CLIP's vision tower and DeCLIP's last layer, written out with the model's weights only.
# --------------------------------------------------------------------------------------------------------------------


def layer_norm(x, norm):
    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + norm.eps) * norm.weight + norm.bias


def linear(x, layer):
    return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def per_head(x):
    """(B, T, C) -> list of H tensors (B, T, d)."""
    head_dim = x.shape[-1] // HEADS
    return [x[..., head * head_dim : (head + 1) * head_dim] for head in range(HEADS)]


def softmax_similarity(a, b, scale):
    return torch.softmax(scale * a @ b.transpose(-1, -2), dim=-1)


def mlp(x, layer):
    hidden = linear(layer_norm(x, layer.layer_norm2), layer.mlp.fc1)
    return linear(hidden * torch.sigmoid(1.702 * hidden), layer.mlp.fc2)  # quick_gelu


def clip_layer(x, layer):
    y = layer_norm(x, layer.layer_norm1)
    attention = layer.self_attn
    scale = (x.shape[-1] // HEADS) ** -0.5
    q, k, v = (per_head(linear(y, projection)) for projection in (attention.q_proj, attention.k_proj, attention.v_proj))
    attended = torch.cat([softmax_similarity(q[h], k[h], scale) @ v[h] for h in range(HEADS)], dim=-1)
    x = x + linear(attended, attention.out_proj)
    return x + mlp(x, layer)


def resized_position_embedding(model, grid_height, grid_width):
    """CLS position kept; the learned square grid resized bicubically (align_corners=False) to (h, w)."""
    weight = model.embeddings.position_embedding.weight
    side = math.isqrt(weight.shape[0] - 1)
    grid = weight[1:].reshape(side, side, -1).permute(2, 0, 1)[None]  # (1, C, side, side)
    grid = F.interpolate(grid, size=(grid_height, grid_width), mode="bicubic", align_corners=False)
    return torch.cat([weight[:1], grid[0].permute(1, 2, 0).reshape(grid_height * grid_width, -1)])


def patch_embeddings(model, pixel_values):
    """Non-overlapping patches flattened (channel, row, column) and multiplied by the conv kernel: (B, N, C)."""
    batch_size, channels, height, width = pixel_values.shape
    patches = pixel_values.reshape(batch_size, channels, height // PATCH, PATCH, width // PATCH, PATCH)
    patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch_size, (height // PATCH) * (width // PATCH), -1)
    kernel = model.embeddings.patch_embedding.weight.reshape(TINY["hidden_size"], -1)
    return patches @ kernel.T


def last_layer_input(model, pixel_values):
    batch_size, _, height, width = pixel_values.shape
    cls = model.embeddings.class_embedding.expand(batch_size, 1, -1)
    x = torch.cat([cls, patch_embeddings(model, pixel_values)], dim=1)
    x = layer_norm(x + resized_position_embedding(model, height // PATCH, width // PATCH), model.pre_layrnorm)
    for layer in model.encoder.layers[:-1]:
        x = clip_layer(x, layer)
    return x


# Per mode: the attention weights of one head from (q, k, v, scale), and the context projections returned.
DECOUPLED_WEIGHTS = {
    "qq": lambda q, k, v, s: softmax_similarity(q, q, s),
    "kk": lambda q, k, v, s: softmax_similarity(k, k, s),
    "vv": lambda q, k, v, s: softmax_similarity(v, v, s),
    "csa": lambda q, k, v, s: softmax_similarity(q, q, s) + softmax_similarity(k, k, s),
    "all": lambda q, k, v, s: torch.softmax(s * (q @ q.mT + k @ k.mT + v @ v.mT) / 3, dim=-1),
}
CONTEXT_OF = {"qq": "q", "kk": "k", "vv": "v", "csa": "qk", "all": "qkv", "vanilla": "", "maskclip": ""}


def reference_last_layer(mode, x, layer):
    """(content tokens (B, 1+N, C), {"q": ..., "k": ..., "v": ...} raw projections)."""
    attention = layer.self_attn
    y = layer_norm(x, layer.layer_norm1)
    projections = {"q": linear(y, attention.q_proj), "k": linear(y, attention.k_proj), "v": linear(y, attention.v_proj)}
    if mode == "vanilla":
        return clip_layer(x, layer), projections
    if mode == "maskclip":
        x = x + linear(projections["v"], attention.out_proj)
        return x + mlp(x, layer), projections
    q, k, v = (per_head(projections[name]) for name in "qkv")
    scale = (x.shape[-1] // HEADS) ** -0.5
    attended = torch.cat([DECOUPLED_WEIGHTS[mode](q[h], k[h], v[h], scale) @ v[h] for h in range(HEADS)], dim=-1)
    return linear(attended, attention.out_proj), projections  # no residual, no layer_norm2, no MLP


def reference_dense(model, pixel_values, mode):
    batch_size, _, height, width = pixel_values.shape
    content_tokens, projections = reference_last_layer(mode, last_layer_input(model, pixel_values), model.encoder.layers[-1])
    content = linear(layer_norm(content_tokens, model.post_layernorm), model.visual_projection)[:, 1:]
    content = content / content.norm(dim=-1, keepdim=True)
    dense = content.reshape(batch_size, height // PATCH, width // PATCH, -1).permute(0, 3, 1, 2)  # row-major patches
    return dense, tuple(projections[name][:, 1:] for name in CONTEXT_OF[mode])


# --------------------------------------------------------------------------------------------------------------------
# Dense features
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(32, 32), (24, 40)])
@pytest.mark.parametrize("mode", DECOUPLED_ATTENTION_MODES)
def test_dense_features_match_plain_computation(mode, height, width):
    model = make_model(mode)
    pixel_values = pixels(2, height, width)
    with torch.no_grad():
        output = model.get_dense_features(pixel_values)
        expected_dense, expected_context = reference_dense(model, pixel_values, mode)

    assert output.dense_embeds.shape == (2, TINY["projection_dim"], height // PATCH, width // PATCH)
    torch.testing.assert_close(output.dense_embeds, expected_dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.dense_embeds.norm(dim=1), torch.ones(2, height // PATCH, width // PATCH))
    assert len(output.context_features) == len(expected_context) == len(CONTEXT_OF[mode])
    for feature, expected in zip(output.context_features, expected_context):
        assert feature.shape == (2, (height // PATCH) * (width // PATCH), TINY["hidden_size"])
        torch.testing.assert_close(feature, expected, atol=1e-5, rtol=1e-5)


def test_modes_differ_from_each_other():
    """Guards the test above against weights so flat that every mode gives the same map."""
    pixel_values = pixels(1, 32, 32)
    with torch.no_grad():
        maps = {mode: make_model(mode).get_dense_features(pixel_values).dense_embeds for mode in DECOUPLED_ATTENTION_MODES}
    for first in DECOUPLED_ATTENTION_MODES:
        for second in DECOUPLED_ATTENTION_MODES:
            if first < second:
                assert (maps[first] - maps[second]).abs().max() > 1e-2, (first, second)


def test_position_embedding_is_resized_bicubically():
    model = make_model()
    pixel_values = pixels(1, 24, 40)
    with torch.no_grad():
        embeddings = model.embeddings(pixel_values, interpolate_pos_encoding=True)
        expected = resized_position_embedding(model, 6, 10)
        expected[1:] += patch_embeddings(model, pixel_values)[0]
        expected[0] += model.embeddings.class_embedding
    torch.testing.assert_close(embeddings[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("height, width", [(30, 32), (32, 34)])
def test_size_not_multiple_of_patch_raises(height, width):
    model = make_model()
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        model.get_dense_features(pixels(1, height, width))
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        model.get_region_features(pixels(1, height, width), [torch.tensor([[0.0, 0.0, 1.0, 1.0]])])


def test_unknown_mode_raises_value_error_naming_valid_modes():
    with pytest.raises(ValueError, match="'bad'.*qq, kk, vv, csa, all, vanilla, maskclip"):
        DeCLIPVisionConfig(**TINY, decoupled_attention="bad")
    config = DeCLIPVisionConfig(**TINY)
    with pytest.raises(ValueError, match="qq, kk, vv, csa, all, vanilla, maskclip"):
        config.decoupled_attention = "qk"


def test_fresh_projection_initialised_like_clip_with_projection():
    """std hidden**-0.5 (0.125 here), as CLIPVisionModelWithProjection does, not the generic 0.02."""
    torch.manual_seed(0)
    config = DeCLIPVisionConfig(**{**TINY, "hidden_size": 64})
    projection = DeCLIPVisionModel(config).visual_projection.weight
    assert 0.11 < projection.std().item() < 0.14


# --------------------------------------------------------------------------------------------------------------------
# The ordinary forward is plain CLIP
# --------------------------------------------------------------------------------------------------------------------


def plain_clip_twins(model):
    """CLIPVisionModel and CLIPVisionModelWithProjection holding exactly `model`'s weights."""
    config = CLIPVisionConfig(**TINY)
    state = model.state_dict()
    tower = CLIPVisionModel(config).eval()
    tower.load_state_dict({key: value for key, value in state.items() if not key.startswith("visual_projection.")})
    with_projection = CLIPVisionModelWithProjection(config).eval()
    renamed = {key if key.startswith("visual_projection.") else f"vision_model.{key}": value for key, value in state.items()}
    with_projection.load_state_dict(renamed)
    return tower, with_projection


@pytest.mark.parametrize("height, width", [(32, 32), (24, 40)])
def test_forward_and_image_features_equal_plain_clip(height, width):
    model = make_model("csa")
    tower, with_projection = plain_clip_twins(model)
    pixel_values = pixels(2, height, width)
    with torch.no_grad():
        output = model(pixel_values, interpolate_pos_encoding=True, output_hidden_states=True)
        expected = tower(pixel_values, interpolate_pos_encoding=True, output_hidden_states=True)
        image_embeds = model.get_image_features(pixel_values, interpolate_pos_encoding=True).pooler_output
        expected_embeds = with_projection(pixel_values, interpolate_pos_encoding=True).image_embeds
        # and the plain CLIP path written out: the CLS token of the full tower, post LN, projection
        cls = clip_layer(last_layer_input(model, pixel_values), model.encoder.layers[-1])[:, 0]
        written_out = linear(layer_norm(cls, model.post_layernorm), model.visual_projection)

    torch.testing.assert_close(output.last_hidden_state, expected.last_hidden_state, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(output.pooler_output, expected.pooler_output, atol=1e-6, rtol=1e-6)
    assert len(output.hidden_states) == len(expected.hidden_states) == TINY["num_hidden_layers"] + 1
    for hidden, expected_hidden in zip(output.hidden_states, expected.hidden_states):
        torch.testing.assert_close(hidden, expected_hidden, atol=1e-6, rtol=1e-6)
    assert image_embeds.shape == (2, TINY["projection_dim"])
    torch.testing.assert_close(image_embeds, expected_embeds, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(image_embeds, written_out, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Region and mask pooling (docs/method.md §2)
# --------------------------------------------------------------------------------------------------------------------


def bilinear_sample(feature, y, x):
    """torchvision's RoIAlign sampling of a (D, h, w) map at one continuous point (pixel centres at integers)."""
    _, height, width = feature.shape
    if y < -1 or y > height or x < -1 or x > width:
        return torch.zeros(feature.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    dy, dx = y - y_low, x - x_low
    return (
        (1 - dy) * (1 - dx) * feature[:, y_low, x_low]
        + (1 - dy) * dx * feature[:, y_low, x_high]
        + dy * (1 - dx) * feature[:, y_high, x_low]
        + dy * dx * feature[:, y_high, x_high]
    )


def manual_region_feature(feature, box):
    """RoIAlign 1x1, aligned=True, adaptive sampling (ceil(size) points per side), then L2 normalisation."""
    _, height, width = feature.shape
    x1, y1, x2, y2 = (float(c) * scale - 0.5 for c, scale in zip(box, (width, height, width, height)))
    box_width, box_height = x2 - x1, y2 - y1
    samples_x, samples_y = math.ceil(box_width), math.ceil(box_height)
    points = [
        bilinear_sample(feature, y1 + (iy + 0.5) * box_height / samples_y, x1 + (ix + 0.5) * box_width / samples_x)
        for iy in range(samples_y)
        for ix in range(samples_x)
    ]
    pooled = torch.stack(points).mean(0)
    return pooled / pooled.norm()


def test_region_features_match_manual_roi_align():
    model = make_model("csa")
    pixel_values = pixels(2, 24, 40)  # grid 6 x 10: x must scale by the width, y by the height
    boxes = [
        torch.tensor([[0.13, 0.27, 0.71, 0.9], [0.0, 0.0, 1.0, 1.0]]),  # fractional; whole frame (border clamping)
        torch.tensor([[0.52, 0.05, 0.97, 0.41]]),
    ]
    with torch.no_grad():
        regions = model.get_region_features(pixel_values, boxes)
        dense = model.get_dense_features(pixel_values).dense_embeds

    assert [region.shape for region in regions] == [(2, TINY["projection_dim"]), (1, TINY["projection_dim"])]
    for image_index, (image_regions, image_boxes) in enumerate(zip(regions, boxes)):
        for region, box in zip(image_regions, image_boxes):
            torch.testing.assert_close(region, manual_region_feature(dense[image_index], box), atol=1e-5, rtol=1e-5)


def downsample_by_patch(masks):
    """Area resize by exactly 1/PATCH: each grid cell is the mean of its PATCH x PATCH block of mask pixels."""
    count, height, width = masks.shape
    blocks = masks.reshape(count, height // PATCH, PATCH, width // PATCH, PATCH)
    return blocks.mean(dim=(2, 4))


def test_mask_features_match_manual_weighted_mean():
    model = make_model("all")
    pixel_values = pixels(2, 24, 40)
    generator = torch.Generator().manual_seed(3)
    soft_masks = torch.rand(2, 24, 40, generator=generator)  # at input resolution: resized to the 6 x 10 grid
    binary_masks = (torch.rand(1, 6, 10, generator=generator) > 0.5).float()  # already at the grid resolution
    with torch.no_grad():
        pooled = model.get_mask_features(pixel_values, [soft_masks, binary_masks])
        dense = model.get_dense_features(pixel_values).dense_embeds

    assert [features.shape for features in pooled] == [(2, TINY["projection_dim"]), (1, TINY["projection_dim"])]
    for image_index, grid_masks in enumerate([downsample_by_patch(soft_masks), binary_masks]):
        for mask_index, mask in enumerate(grid_masks):
            features = dense[image_index]  # (D, h, w)
            mean = (features * mask).sum(dim=(1, 2)) / (mask.sum() + 1e-12)
            torch.testing.assert_close(pooled[image_index][mask_index], mean / mean.norm(), atol=1e-5, rtol=1e-5)


def test_mask_smaller_than_a_patch_still_pools_its_patch():
    model = make_model()
    mask = torch.zeros(1, 32, 32)
    # One pixel at the corner of the patch at grid row 3, column 5: bilinear resizing samples each patch between
    # its two middle pixels (13.5, 21.5) and would miss it.
    mask[0, 12, 20] = 1.0
    with torch.no_grad():
        (pooled,) = model.get_mask_features(pixels(1, 32, 32), [mask])
        dense = model.get_dense_features(pixels(1, 32, 32)).dense_embeds
    torch.testing.assert_close(pooled[0], dense[0, :, 3, 5], atol=1e-5, rtol=1e-5)


def test_boxes_keep_float32_precision_under_bf16_autocast():
    boxes = [torch.tensor([[0.0, 0.0, 0.7771, 0.5]])]
    dense = F.normalize(torch.randn(1, TINY["projection_dim"], 8, 40), dim=1).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = pool_boxes(dense, boxes)
    # A bf16 box corner would be 31.125 instead of 31.084 on this 40-wide grid and pool a different region. Pooling
    # runs in float32 and only the result is rounded to the map's dtype, so the two agree exactly.
    assert under_autocast.dtype == torch.bfloat16
    assert torch.equal(under_autocast, pool_boxes(dense.float(), boxes).bfloat16())


@pytest.fixture(scope="module")
def checked_model():
    return make_model("csa")


def test_bf16_model_gives_bf16_region_and_mask_features_pooled_in_float32(checked_model):
    """docs: region and mask features come back in the dense map's dtype (they used to be float32 for a bf16 model)."""
    model = copy.deepcopy(checked_model).to(torch.bfloat16)
    pixel_values = pixels(2, 24, 40).bfloat16()
    boxes = [torch.tensor([[0.1, 0.2, 0.6, 0.9]]), torch.tensor([[0.3, 0.0, 1.0, 0.5], [0.0, 0.5, 0.5, 1.0]])]
    masks = [torch.rand(2, 24, 40, generator=torch.Generator().manual_seed(2)) > 0.5, torch.ones(1, 6, 10)]
    with torch.no_grad():
        dense = model.get_dense_features(pixel_values).dense_embeds
        regions = model.get_region_features(pixel_values, boxes)
        mask_embeds = model.get_mask_features(pixel_values, masks)
    assert dense.dtype == torch.bfloat16
    assert {tensor.dtype for tensor in (*regions, *mask_embeds)} == {torch.bfloat16}
    # Pooled from the float32 copy of the bf16 map, rounded once at the end.
    torch.testing.assert_close(torch.cat(regions), pool_boxes(dense.float(), boxes).bfloat16(), atol=0, rtol=0)
    torch.testing.assert_close(torch.cat(mask_embeds), pool_masks(dense.float(), masks).bfloat16(), atol=0, rtol=0)


BAD_BOXES = {
    "reversed": ([[0.6, 0.2, 0.1, 0.9]], r"boxes\[0\]\[0\] .* is empty or reversed"),
    "zero width": ([[0.1, 0.2, 0.5, 0.9], [0.3, 0.2, 0.3, 0.9]], r"boxes\[0\]\[1\] .* is empty or reversed"),
    "pixels, not normalised": ([[10.0, 20.0, 50.0, 90.0]], r"outside \[0, 1\].*not in pixels"),
    "negative": ([[-0.2, 0.0, 0.5, 0.5]], r"outside \[0, 1\]"),
    "huge (used to crash RoIAlign)": ([[0.0, 0.0, 1e6, 1e6]], r"outside \[0, 1\]"),
    "NaN": ([[0.1, float("nan"), 0.5, 0.9]], r"NaN or infinite"),
    "not (K, 4)": ([0.1, 0.2, 0.5, 0.9], r"boxes\[0\] must be a \(K, 4\) tensor"),
}


@pytest.mark.parametrize("case", BAD_BOXES)
def test_bad_boxes_raise_naming_the_box(checked_model, case):
    image_boxes, message = BAD_BOXES[case]
    with pytest.raises(ValueError, match=message):
        checked_model.get_region_features(pixels(1, 32, 32), [torch.tensor(image_boxes)])
    with pytest.raises(ValueError, match=message):  # the public pooling function refuses them too
        pool_boxes(torch.randn(1, 4, 8, 8), [torch.tensor(image_boxes)])


def test_box_lists_must_match_the_batch(checked_model):
    box = torch.tensor([[0.1, 0.2, 0.5, 0.9]])
    with pytest.raises(ValueError, match="1 boxes lists for a batch of 2 images"):
        checked_model.get_region_features(pixels(2, 32, 32), [box])
    with pytest.raises(TypeError, match="one tensor per image"):
        checked_model.get_region_features(pixels(1, 32, 32), box)


def test_box_edges_within_rounding_of_the_frame_are_clamped(checked_model):
    """An edge a hair outside [0, 1] (float rounding of pixel edge / size) pools as the edge itself."""
    with torch.no_grad():
        (rounded,) = checked_model.get_region_features(pixels(1, 32, 32), [torch.tensor([[-5e-5, 0.0, 1.00005, 1.0]])])
        (exact,) = checked_model.get_region_features(pixels(1, 32, 32), [torch.tensor([[0.0, 0.0, 1.0, 1.0]])])
    assert torch.equal(rounded, exact)


def test_empty_mask_raises_instead_of_a_zero_feature(checked_model):
    """Replaces the old guarantee "an empty mask pools to a zero vector, not NaN": a zero vector scores every class
    alike, so an all-False mask is now an error that names it."""
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, :4, :4] = True
    with pytest.raises(ValueError, match=r"masks\[0\]\[1\] is empty \(all False / zero\)"):
        checked_model.get_mask_features(pixels(1, 32, 32), [masks])


BAD_MASKS = {
    "NaN": (lambda: torch.full((1, 32, 32), float("nan")), r"masks\[0\]\[0\] has NaN"),
    "negative": (lambda: -torch.ones(1, 32, 32), r"negative values"),
    "(H, W) without the mask axis": (lambda: torch.ones(32, 32), r"must be a \(K, H, W\) tensor"),
    "another frame's shape": (lambda: torch.ones(1, 20, 30), r"masks\[0\] are 20x30 but the input is 32x32"),
    "transposed": (lambda: torch.ones(1, 40, 24), r"masks\[0\] are 40x24"),
}


@pytest.mark.parametrize("case", BAD_MASKS)
def test_bad_masks_raise_naming_the_mask(checked_model, case):
    make_masks, message = BAD_MASKS[case]
    height, width = (24, 40) if case == "transposed" else (32, 32)
    with pytest.raises(ValueError, match=message):
        checked_model.get_mask_features(pixels(1, height, width), [make_masks()])


def test_masks_of_the_input_frame_pool_alike_at_any_resolution_and_weight_scale(checked_model):
    """A mask on the patch grid, at the input's resolution, at twice it (the original image's, say) or as 0/255 uint8
    pools to the same feature: weights are normalised and area-resized onto the grid."""
    grid_mask = torch.zeros(1, 6, 10, dtype=torch.bool)
    grid_mask[0, 2:5, 1:7] = True
    pixel_mask = grid_mask.repeat_interleave(PATCH, dim=1).repeat_interleave(PATCH, dim=2)  # 24 x 40
    original_mask = pixel_mask.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # 48 x 80
    with torch.no_grad():
        pooled = [
            checked_model.get_mask_features(pixels(1, 24, 40), [mask])[0]
            for mask in (grid_mask, pixel_mask, original_mask, pixel_mask.to(torch.uint8) * 255)
        ]
    for other in pooled[1:]:
        torch.testing.assert_close(other, pooled[0], atol=1e-6, rtol=1e-6)


BAD_PIXELS = {
    "uint8 (not run through the processor)": (
        lambda: torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), TypeError, r"uint8.*image processor"
    ),
    "one (3, H, W) image": (lambda: pixels(1, 32, 32)[0], ValueError, r"\(3, 32, 32\).*pixel_values\[None\]"),
    "(H, W)": (lambda: torch.rand(32, 32), ValueError, r"\(32, 32\); expected a batch \(B, 3, H, W\)"),
    "channels last": (lambda: torch.rand(1, 32, 32, 3), ValueError, r"32 channels.*permute\(0, 3, 1, 2\)"),
    "empty batch": (lambda: torch.rand(0, 3, 32, 32), ValueError, r"empty batch"),
    "0-size image": (lambda: torch.rand(1, 3, 0, 32), ValueError, r"0-size image"),
}


@pytest.mark.parametrize("case", BAD_PIXELS)
@pytest.mark.parametrize("method", ["dense", "region", "mask"])
def test_bad_pixel_values_raise_before_any_computation(checked_model, case, method):
    make_pixels, error, message = BAD_PIXELS[case]
    whole_image = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    calls = {
        "dense": lambda pixel_values: checked_model.get_dense_features(pixel_values),
        "region": lambda pixel_values: checked_model.get_region_features(pixel_values, [whole_image]),
        "mask": lambda pixel_values: checked_model.get_mask_features(pixel_values, [torch.ones(1, 32, 32)]),
    }
    with pytest.raises(error, match=message):
        calls[method](make_pixels())


# --------------------------------------------------------------------------------------------------------------------
# Gradients and mixed precision
# --------------------------------------------------------------------------------------------------------------------

# Parameters of the last layer each decoupled mode reads; the rest of the last layer must stay out of the graph.
LAST_LAYER_USED = {
    "qq": {"layer_norm1", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj"},
    "kk": {"layer_norm1", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"},
    "vv": {"layer_norm1", "self_attn.v_proj", "self_attn.out_proj"},
    "csa": {"layer_norm1", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"},
    "all": {"layer_norm1", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"},
}


@pytest.mark.parametrize("mode", TRAINABLE_ATTENTION_MODES)
def test_gradients_reach_exactly_the_parameters_the_decoupled_path_uses(mode):
    model = make_model(mode).train()
    output = model.get_dense_features(pixels(2, 32, 32))
    generator = torch.Generator().manual_seed(4)
    loss = (output.dense_embeds * torch.randn(output.dense_embeds.shape, generator=generator)).sum()
    loss = loss + sum((feature * torch.randn(feature.shape, generator=generator)).sum() for feature in output.context_features)
    loss.backward()

    last = f"encoder.layers.{TINY['num_hidden_layers'] - 1}."
    for name, parameter in model.named_parameters():
        used = not name.startswith(last) or name[len(last) :].rsplit(".", 1)[0] in LAST_LAYER_USED[mode]
        if used:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"{name} got no gradient"
        else:
            assert parameter.grad is None, f"{name} should be outside the decoupled path"


@pytest.mark.parametrize("mode", TRAINABLE_ATTENTION_MODES)
def test_bf16_autocast_close_to_fp32(mode):
    model = make_model(mode)
    pixel_values = pixels(2, 24, 40)
    boxes = [torch.tensor([[0.1, 0.2, 0.6, 0.9]]), torch.tensor([[0.3, 0.0, 1.0, 0.5]])]
    with torch.no_grad():
        full = model.get_dense_features(pixel_values)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model.get_dense_features(pixel_values)
            regions = model.get_region_features(pixel_values, boxes)
    assert half.dense_embeds.dtype == torch.bfloat16
    cosine = F.cosine_similarity(half.dense_embeds.float(), full.dense_embeds, dim=1)
    assert cosine.min() > 0.995, cosine.min()
    for half_feature, full_feature in zip(half.context_features, full.context_features):
        relative_error = (half_feature.float() - full_feature).norm() / full_feature.norm()
        assert relative_error < 2e-2, relative_error
    assert [region.shape for region in regions] == [(1, TINY["projection_dim"])] * 2
    assert torch.isfinite(torch.cat(regions).float()).all()


def test_changing_the_configs_mode_on_a_built_model_takes_effect():
    model = make_model("csa")
    model.config.decoupled_attention = "vanilla"
    with torch.no_grad():
        output = model.get_dense_features(pixels(1, 32, 32))
    assert output.context_features == ()


@pytest.mark.parametrize("mode", TRAINABLE_ATTENTION_MODES)
def test_eager_attention_implementation_matches_fused(mode):
    model = make_model(mode)
    eager = copy.deepcopy(model)  # its own config, so only this copy switches to eager
    eager.set_attn_implementation("eager")
    assert model.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    with torch.no_grad():
        fused_output = model.get_dense_features(pixels(2, 24, 40))
        eager_output = eager.get_dense_features(pixels(2, 24, 40))
    torch.testing.assert_close(eager_output.dense_embeds, fused_output.dense_embeds, atol=1e-5, rtol=1e-5)
