"""declip_hf.vfm (docs/method.md §9): one reader per VFM family, shared by the distillation's context teachers and
the analysis, so the correlation maps a user inspects are those the context loss aligns with."""

import ast
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModel

import declip_hf
from declip_hf.analysis import VFMPatchFeatures, correlation_map, vfm_correlation
from declip_hf.analyze import main as analyze_main
from declip_hf.vfm import VFM_ADAPTERS, DinoAdapter, Dinov2Adapter, SamAdapter
from training.teachers import FrozenVFM

FAMILIES = {  # fixture name -> the adapter that must read it
    "tiny_dinov2_dir": Dinov2Adapter,
    "tiny_dinov2_registers_dir": Dinov2Adapter,
    "tiny_dino_dir": DinoAdapter,
    "tiny_sam_dir": SamAdapter,
}


def test_declip_hf_never_imports_training():
    """declip_hf is the installed package; training/ is a folder of scripts beside it (no upward imports)."""
    offenders = []
    for path in Path(declip_hf.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            offenders += [f"{path.name}: {name}" for name in names if name.split(".")[0] == "training"]
    assert not offenders


@pytest.mark.parametrize("fixture", list(FAMILIES))
def test_analysis_and_training_read_each_family_with_the_same_adapter(fixture, request):
    """Same adapter class, same maps to the bit: the analysis' VFM row is the context teacher's target."""
    model = AutoModel.from_pretrained(request.getfixturevalue(fixture)).eval()
    analysis_reader, teacher = VFMPatchFeatures(model), FrozenVFM(model)
    assert type(analysis_reader.adapter) is type(teacher.adapter) is FAMILIES[fixture]
    assert analysis_reader.patch_size == teacher.patch_size
    side = 8 * teacher.patch_size  # an 8 x 8 grid, not the checkpoint's own size for any tiny VFM
    pixels = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    features = analysis_reader(pixels)
    assert features.shape[-2:] == (8, 8) and features.dtype == torch.float32
    assert torch.equal(features, teacher(pixels))
    torch.testing.assert_close(vfm_correlation(analysis_reader, pixels, 19), correlation_map(teacher(pixels), 19))


def test_analysis_reader_refuses_sizes_off_the_patch_grid(tiny_sam_dir):
    with pytest.raises(ValueError, match="not a multiple of its patch size 4"):
        VFMPatchFeatures.from_pretrained(tiny_sam_dir)(torch.randn(1, 3, 30, 32))


def test_analysis_reader_names_every_supported_family_for_another_model(tiny_clip_dir):
    with pytest.raises(ValueError) as error:
        VFMPatchFeatures.from_pretrained(tiny_clip_dir)
    assert "is a 'clip' model" in str(error.value)
    assert all(model_type in str(error.value) for model_type in VFM_ADAPTERS)


@pytest.mark.parametrize("fixture", ["tiny_dinov2_registers_dir", "tiny_dino_dir", "tiny_sam_dir"])
def test_analyze_command_draws_the_correlations_of_each_family(fixture, request, tiny_clip_dir, tmp_path):
    vfm_dir = request.getfixturevalue(fixture)
    Image.new("RGB", (40, 32), (120, 80, 200)).save(tmp_path / "scene.png")
    report = analyze_main([str(tmp_path / "scene.png"), "--model", str(tiny_clip_dir), "--vfm", str(vfm_dir),
                           "--out", str(tmp_path / "out"), "--figure-images", "1", "--points", "0.5,0.5"])
    assert report["vfm"] == str(vfm_dir) and "correlation_scene.png" in report["figures"]
    with Image.open(tmp_path / "out" / "correlation_scene.png") as image:
        assert image.format == "PNG"
