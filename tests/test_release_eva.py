"""Releasing an EVA02 DeCLIP model (docs/method.md §8): validation passes, and the card names the right base model,
licence, architecture and paper numbers."""

import io
import json
import shutil
from contextlib import redirect_stdout

import pytest
import torch
from huggingface_hub import ModelCard

from declip_hf import DeCLIPEvaVisionModel
from declip_hf.hub import release
from declip_hf.hub.model_card import default_license, region_rows
from tests.test_release import RESULTS, build_tiny_run
from training.export import image_processor_for

AUTHORS_CHECKPOINT = "xiaomoguhzz/DeCLIP_EVA-B_DINOv2-B_csa_0.05_2.0"


@pytest.fixture(scope="module")
def eva_run(tmp_path_factory, tiny_clip_dir, tiny_eva_dir):
    """The tiny run's records around a tiny EVA02 model saved as training/export.py saves one."""
    run_dir = build_tiny_run(tmp_path_factory.mktemp("eva_run"), tiny_clip_dir)
    shutil.rmtree(run_dir / "model")
    model = DeCLIPEvaVisionModel.from_pretrained(tiny_eva_dir)
    torch.manual_seed(0)  # a fixed perturbation (the session checkpoint may have been built at any point)
    with torch.no_grad():
        for parameter in model.blocks.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(run_dir / "model")
    config = model.config
    image_processor_for(str(tiny_eva_dir), config.image_size, 64, config.patch_size).save_pretrained(run_dir / "model")
    shutil.copytree(tiny_eva_dir / "text_encoder", run_dir / "model" / "text_encoder")
    recorded = json.loads((run_dir / "training_args.json").read_text())
    recorded["args"]["student"] = str(tiny_eva_dir)
    (run_dir / "training_args.json").write_text(json.dumps(recorded))
    (run_dir / "eval_results.json").write_text(json.dumps(RESULTS))
    return run_dir


def test_eva_release_validates_and_its_card_names_base_model_licence_and_architecture(eva_run, tmp_path):
    out = tmp_path / "release"
    printed = io.StringIO()
    with redirect_stdout(printed):
        code = release.main([str(eva_run), "--repo-id", "someone/declip-eva-tiny", "--out", str(out),
                             "--base-model", AUTHORS_CHECKPOINT])
    assert code == 0, printed.getvalue()
    assert "[FAILED]" not in printed.getvalue()
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == AUTHORS_CHECKPOINT and card.data.license == "apache-2.0"
    assert "EVA02-CLIP: 2 layers, width 32" in card.text
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModel"] == (
        "modeling_declip_eva.DeCLIPEvaVisionModel"
    )


def test_eva02_licences():
    assert default_license("QuanSun/EVA-CLIP") == "mit"
    assert default_license(AUTHORS_CHECKPOINT) == "apache-2.0"


def test_region_reference_is_the_papers_eva02_number_for_an_eva02_b16_model():
    eva_b16 = {"model_type": "declip_eva_vision_model", "hidden_size": 768, "num_hidden_layers": 12, "patch_size": 16}
    assert [row["paper"] for row in region_rows(RESULTS, AUTHORS_CHECKPOINT, eva_b16)] == ["72.2 / 51.3"]
    eva_l14 = {**eva_b16, "hidden_size": 1024, "num_hidden_layers": 24, "patch_size": 14}
    assert [row["paper"] for row in region_rows(RESULTS, AUTHORS_CHECKPOINT, eva_l14)] == ["n/a"]
    # The OpenAI number still needs an OpenAI ViT-B/16 start, not an EVA02 model named after it.
    assert [row["paper"] for row in region_rows(RESULTS, "openai/clip-vit-base-patch16", eva_b16)] == ["72.2 / 51.3"]
    assert [row["paper"] for row in region_rows(RESULTS, "openai/clip-vit-base-patch16")] == ["65.0 / 38.8"]
