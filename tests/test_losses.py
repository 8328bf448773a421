"""DeCLIP's losses and frozen teachers against plainly written computations (docs/method.md §4)."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, CLIPVisionModelWithProjection

from declip_hf import DeCLIPVisionModel
from training.losses import DeCLIPLoss, content_loss, context_loss
from training.teachers import FrozenCLIPTeacher, FrozenVFM, check_vfm_config


def _normalise(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(value * value for value in vector))
    return [value / norm for value in vector]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------------------- content


def _cell_box(row: int, col: int, rows: int, cols: int, height: int, width: int) -> list[float]:
    """A box covering grid cells [row, row+rows) x [col, col+cols), normalised. With RoIAlign(aligned=True,
    sampling_ratio=-1, 1x1) it samples exactly the centres of those cells, so its feature is their plain mean."""
    return [col / width, row / height, (col + cols) / width, (row + rows) / height]


def test_content_loss_matches_a_loop_over_valid_crops_only():
    torch.manual_seed(0)
    batch, dim, height, width, max_crops = 2, 6, 5, 7, 4
    dense = F.normalize(torch.randn(batch, dim, height, width), dim=1)
    # Each image: (row, col, rows, cols) cells per slot; slot validity.
    cells = [[(0, 0, 1, 1), (1, 2, 2, 2), (4, 6, 1, 1), (0, 0, 5, 7)], [(2, 3, 1, 3), (0, 0, 2, 1), (3, 1, 2, 2), (1, 1, 1, 1)]]
    valid = torch.tensor([[True, True, False, True], [False, True, True, False]])
    boxes = torch.tensor([[_cell_box(*cell, height, width) for cell in image] for image in cells])
    # Invalid slots hold garbage boxes: masking must ignore them.
    boxes[~valid] = torch.tensor([0.3, 0.9, 0.1, 0.2])
    teacher = F.normalize(torch.randn(int(valid.sum()), dim), dim=-1)

    similarities, teacher_index = [], 0
    for image in range(batch):
        for slot in range(max_crops):
            if not valid[image, slot]:
                continue
            row, col, rows, cols = cells[image][slot]
            mean = [
                sum(dense[image, channel, r, c].item() for r in range(row, row + rows) for c in range(col, col + cols))
                / (rows * cols)
                for channel in range(dim)
            ]
            similarities.append(_dot(_normalise(mean), teacher[teacher_index].tolist()))
            teacher_index += 1
    expected = 1.0 - sum(similarities) / len(similarities)

    assert content_loss(dense, boxes, valid, teacher).item() == pytest.approx(expected, abs=1e-5)


def test_content_loss_rejects_teacher_embeddings_of_another_count():
    dense = F.normalize(torch.randn(1, 4, 3, 3), dim=1)
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5]]])
    with pytest.raises(ValueError, match="valid boxes"):
        content_loss(dense, boxes, torch.tensor([[True, True]]), torch.randn(1, 4))


# ---------------------------------------------------------------------------------------------------------- context


def _bilinear_resize(grid: list[list[list[float]]], out_h: int, out_w: int) -> list[list[list[float]]]:
    """(C, h, w) nested lists -> (C, out_h, out_w): bilinear, half-pixel centres (align_corners=False)."""
    channels, in_h, in_w = len(grid), len(grid[0]), len(grid[0][0])

    def source(index: int, in_size: int, out_size: int) -> tuple[int, int, float]:
        position = max((index + 0.5) * in_size / out_size - 0.5, 0.0)
        low = min(int(math.floor(position)), in_size - 1)
        return low, min(low + 1, in_size - 1), position - low

    out = [[[0.0] * out_w for _ in range(out_h)] for _ in range(channels)]
    for y in range(out_h):
        y0, y1, ly = source(y, in_h, out_h)
        for x in range(out_w):
            x0, x1, lx = source(x, in_w, out_w)
            for ch in range(channels):
                top = grid[ch][y0][x0] * (1 - lx) + grid[ch][y0][x1] * lx
                bottom = grid[ch][y1][x0] * (1 - lx) + grid[ch][y1][x1] * lx
                out[ch][y][x] = top * (1 - ly) + bottom * ly
    return out


def _rows_from_tokens(tokens: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]) -> list[list[float]]:
    """(N, C) row-major tokens on `grid` -> rows (one per target cell) of normalised vectors, resized if needed."""
    height, width = grid
    channels = tokens.shape[1]
    as_grid = [[[tokens[r * width + c, ch].item() for c in range(width)] for r in range(height)] for ch in range(channels)]
    if grid != target:
        as_grid = _bilinear_resize(as_grid, *target)
    return [_normalise([as_grid[ch][r][c] for ch in range(channels)]) for r in range(target[0]) for c in range(target[1])]


def _plain_context_loss(features: list[torch.Tensor], student_grid, vfm_map: torch.Tensor) -> float:
    batch, vfm_channels, vfm_h, vfm_w = vfm_map.shape
    total, count = 0.0, 0
    for image in range(batch):
        vfm_tokens = vfm_map[image].reshape(vfm_channels, -1).T
        vfm_rows = _rows_from_tokens(vfm_tokens, (vfm_h, vfm_w), (vfm_h, vfm_w))
        student_rows = [_rows_from_tokens(feature[image], student_grid, (vfm_h, vfm_w)) for feature in features]
        for i in range(len(vfm_rows)):
            squared = 0.0
            for j in range(len(vfm_rows)):
                r_vfm = _dot(vfm_rows[i], vfm_rows[j])
                r_clip = sum(_dot(rows[i], rows[j]) for rows in student_rows) / len(student_rows)
                squared += (r_vfm - r_clip) ** 2
            total += math.sqrt(squared)
            count += 1
    return total / count


@pytest.mark.parametrize("num_features", [1, 2, 3], ids=["single", "csa", "all"])
def test_context_loss_same_grid_matches_plain_loops(num_features):
    torch.manual_seed(num_features)
    student_grid = (3, 4)
    features = [torch.randn(2, 12, 8) for _ in range(num_features)]
    vfm_map = torch.randn(2, 5, 3, 4)
    expected = _plain_context_loss(features, student_grid, vfm_map)
    assert context_loss(tuple(features), student_grid, vfm_map).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("num_features", [1, 2, 3], ids=["single", "csa", "all"])
def test_context_loss_resizes_the_student_map_bilinearly_to_the_vfm_grid(num_features):
    torch.manual_seed(10 + num_features)
    student_grid = (3, 4)
    features = [torch.randn(2, 12, 8) for _ in range(num_features)]
    vfm_map = torch.randn(2, 5, 5, 6)
    expected = _plain_context_loss(features, student_grid, vfm_map)
    assert context_loss(tuple(features), student_grid, vfm_map).item() == pytest.approx(expected, rel=1e-5)


def test_context_loss_is_zero_when_the_student_reproduces_the_vfm_correlations():
    vfm_map = torch.randn(2, 6, 4, 4)
    # Scaling rows changes nothing after normalisation; the channel count need not match.
    tokens = torch.cat([vfm_map, vfm_map], dim=1).flatten(2).transpose(1, 2) * 3.0
    assert context_loss((tokens,), (4, 4), vfm_map).item() == pytest.approx(0.0, abs=1e-5)


def test_total_is_the_weighted_sum_of_named_terms():
    torch.manual_seed(3)
    dense = F.normalize(torch.randn(1, 4, 4, 4), dim=1)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 1.0, 1.0]]])
    valid = torch.tensor([[True, True]])
    teacher = F.normalize(torch.randn(2, 4), dim=-1)
    context = (torch.randn(1, 16, 8),)
    vfm_map = torch.randn(1, 6, 4, 4)
    terms = DeCLIPLoss(content_weight=0.7, context_weight=0.25)(dense, context, boxes, valid, teacher, vfm_map)
    assert set(terms) == {"content", "context", "total"}
    assert terms["content"].item() == pytest.approx(content_loss(dense, boxes, valid, teacher).item())
    assert terms["context"].item() == pytest.approx(context_loss(context, (4, 4), vfm_map).item())
    assert terms["total"].item() == pytest.approx(0.7 * terms["content"].item() + 0.25 * terms["context"].item())


# ---------------------------------------------------------------------------------------------------------- teachers


def test_vfm_drops_cls_and_register_tokens(tiny_dinov2_registers_dir):
    model = AutoModel.from_pretrained(tiny_dinov2_registers_dir)
    num_registers = model.config.num_register_tokens
    assert num_registers == 4
    pixels = torch.randn(2, 3, 12, 12)
    tokens = model(pixel_values=pixels).last_hidden_state  # (B, 1 + R + 36, C)
    vfm_map = FrozenVFM(model)(pixels)
    grid = 12 // model.config.patch_size
    assert vfm_map.shape == (2, model.config.hidden_size, grid, grid)
    for image in range(2):
        for row in range(grid):
            for col in range(grid):
                expected = tokens[image, 1 + num_registers + row * grid + col]
                torch.testing.assert_close(vfm_map[image, :, row, col], expected)


def test_vfm_without_registers_drops_only_cls(tiny_dinov2_dir):
    model = AutoModel.from_pretrained(tiny_dinov2_dir)
    pixels = torch.randn(1, 3, 8, 8)
    tokens = model(pixel_values=pixels).last_hidden_state
    vfm_map = FrozenVFM(model)(pixels)
    torch.testing.assert_close(vfm_map[0, :, 0, 0], tokens[0, 1])
    torch.testing.assert_close(vfm_map[0, :, 3, 3], tokens[0, -1])


def test_vfm_rejects_other_models(tiny_clip_dir):
    with pytest.raises(ValueError, match="dinov2"):
        check_vfm_config(AutoConfig.from_pretrained(tiny_clip_dir), str(tiny_clip_dir))


def test_frozen_teachers_have_no_grad_and_half_precision_is_close(tiny_clip_dir, tiny_dinov2_dir):
    crops = torch.randn(3, 3, 32, 32)
    teacher = FrozenCLIPTeacher(DeCLIPVisionModel.from_pretrained(tiny_clip_dir))
    reference = CLIPVisionModelWithProjection.from_pretrained(tiny_clip_dir)
    embeds = teacher(crops)
    torch.testing.assert_close(embeds, F.normalize(reference(pixel_values=crops).image_embeds, dim=-1))
    assert not embeds.requires_grad and not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.model.training

    half = FrozenCLIPTeacher(DeCLIPVisionModel.from_pretrained(tiny_clip_dir), dtype=torch.bfloat16)(crops)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, embeds, atol=5e-2, rtol=0)

    vfm = FrozenVFM(AutoModel.from_pretrained(tiny_dinov2_dir), dtype=torch.bfloat16)
    assert vfm(torch.randn(1, 3, 8, 8)).dtype == torch.float32
    assert not any(p.requires_grad for p in vfm.parameters())


# ---------------------------------------------------------------------------------------------------------- ensembles


def _loss_inputs(seed: int = 5):
    torch.manual_seed(seed)
    dense = F.normalize(torch.randn(2, 4, 4, 4), dim=1)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5]], [[0.25, 0.25, 1.0, 1.0]]])
    valid = torch.tensor([[True], [True]])
    teacher = F.normalize(torch.randn(2, 4), dim=-1)
    context = (torch.randn(2, 16, 8),)
    return dense, context, boxes, valid, teacher


def test_ensemble_context_is_the_weighted_sum_of_per_teacher_terms_each_logged():
    dense, context, boxes, valid, teacher = _loss_inputs()
    dino_map, sam_map = torch.randn(2, 6, 4, 4), torch.randn(2, 5, 8, 8)  # SAM at another grid: interpolated
    loss = DeCLIPLoss(1.0, 0.1, teacher_weights=(0.7, 0.3), teacher_names=("dinov2-base", "sam-vit-base"))
    terms = loss(dense, context, boxes, valid, teacher, (dino_map, sam_map))
    assert tuple(terms) == loss.term_names == ("content", "context", "context/dinov2-base", "context/sam-vit-base",
                                              "total")
    dino, sam = context_loss(context, (4, 4), dino_map).item(), context_loss(context, (4, 4), sam_map).item()
    assert (terms["context/dinov2-base"].item(), terms["context/sam-vit-base"].item()) == pytest.approx((dino, sam))
    assert dino != pytest.approx(sam, abs=1e-3)
    assert terms["context"].item() == pytest.approx(0.7 * dino + 0.3 * sam)
    assert terms["total"].item() == pytest.approx(terms["content"].item() + 0.1 * (0.7 * dino + 0.3 * sam))
    with pytest.raises(ValueError, match="1 VFM feature maps for 2 context teachers"):
        loss(dense, context, boxes, valid, teacher, (dino_map,))


def test_one_teacher_logs_no_per_teacher_term_and_no_teacher_no_context_term():
    dense, context, boxes, valid, teacher = _loss_inputs()
    assert DeCLIPLoss().term_names == ("content", "context", "total")
    clipself = DeCLIPLoss(1.0, 0.1, teacher_weights=())
    terms = clipself(dense, (), boxes, valid, teacher, ())
    assert tuple(terms) == clipself.term_names == ("content", "total")
    assert terms["total"].item() == pytest.approx(content_loss(dense, boxes, valid, teacher).item())


def test_coupled_context_is_the_correlation_of_the_projected_dense_tokens():
    """--ablation coupled: the context loss compares the VFM with the content features themselves."""
    from declip_hf import DeCLIPDenseOutput
    from training.losses import TRAINING_SCHEMES

    dense = F.normalize(torch.randn(2, 4, 3, 5), dim=1)
    output = DeCLIPDenseOutput(dense_embeds=dense, context_features=())
    (tokens,) = TRAINING_SCHEMES["coupled"].context_of(output)
    assert tokens.shape == (2, 15, 4)
    torch.testing.assert_close(tokens[1, 5 + 2], dense[1, :, 1, 2])  # row-major: row 1, column 2
    assert TRAINING_SCHEMES["clipself"].context_of(output) == ()
    assert (TRAINING_SCHEMES["clipself"].dense_path, TRAINING_SCHEMES["coupled"].dense_path) == ("maskclip", "vanilla")
    assert not TRAINING_SCHEMES["clipself"].uses_vfm and TRAINING_SCHEMES["coupled"].uses_vfm
