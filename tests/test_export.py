"""The saved model folder works with its own image processor: the ordinary forward, plain CLIP classes and
transformers' image-feature-extraction pipeline (the card's pipeline tag, so the Hub widget)."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, CLIPVisionModelWithProjection, pipeline

from declip_hf import DeCLIPVisionModel, prepare_dense_inputs
from declip_hf.models.tiny import TINY_CLIP_IMAGE_SIZE
from training.export import save_model

TRAINING_SIZE = 64  # twice the tiny CLIP's 32 px, as 560 is for a 224 px ViT-B/16 (docs/method.md §3)


@pytest.fixture(scope="module")
def saved_folder(tiny_clip_dir, tmp_path_factory) -> Path:
    student = DeCLIPVisionModel.from_pretrained(tiny_clip_dir, decoupled_attention="csa")
    folder = tmp_path_factory.mktemp("export") / "model"
    save_model(student, folder, str(tiny_clip_dir), alpha=1.0, student_size=TRAINING_SIZE)
    return folder


def test_processor_gives_the_model_input_size_and_records_the_training_size(saved_folder, tiny_clip_dir):
    processor = AutoImageProcessor.from_pretrained(saved_folder)
    recorded = json.loads((saved_folder / "preprocessor_config.json").read_text())
    assert processor.crop_size == {"height": TINY_CLIP_IMAGE_SIZE, "width": TINY_CLIP_IMAGE_SIZE}
    assert recorded["size"] == {"shortest_edge": TINY_CLIP_IMAGE_SIZE}
    assert recorded["declip_training_size"] == processor.declip_training_size == TRAINING_SIZE
    note = processor.declip_note
    assert "prepare_dense_inputs" in note and f"{TRAINING_SIZE}x{TRAINING_SIZE}" in note
    start = AutoImageProcessor.from_pretrained(tiny_clip_dir)  # statistics and resampling of the starting CLIP
    assert (processor.image_mean, processor.image_std, processor.resample) == (
        start.image_mean, start.image_std, start.resample
    )


def test_ordinary_forward_runs_on_the_processor_output(saved_folder):
    processor = AutoImageProcessor.from_pretrained(saved_folder)
    image = Image.new("RGB", (50, 37), (200, 120, 40))
    inputs = processor(images=image, return_tensors="pt")
    model = DeCLIPVisionModel.from_pretrained(saved_folder).eval()
    plain = CLIPVisionModelWithProjection.from_pretrained(saved_folder).eval()
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
        image_embeds = plain(**inputs).image_embeds
        # Dense use at the training resolution goes through the documented helper instead.
        dense_inputs = prepare_dense_inputs(
            image, processor.declip_training_size, processor.image_mean, processor.image_std
        )
        dense = model.get_dense_features(dense_inputs).dense_embeds
    patches = (TINY_CLIP_IMAGE_SIZE // model.config.patch_size) ** 2
    assert hidden.shape == (1, 1 + patches, model.config.hidden_size)
    assert image_embeds.shape == (1, model.config.projection_dim)
    grid = TRAINING_SIZE // model.config.patch_size
    assert dense.shape == (1, model.config.projection_dim, grid, grid)


def test_image_feature_extraction_pipeline_runs_offline(saved_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    extractor = pipeline("image-feature-extraction", model=str(saved_folder), trust_remote_code=True)
    image = Image.new("RGB", (64, 48), (10, 200, 90))
    features = extractor(image, return_tensors=True)
    patches = (TINY_CLIP_IMAGE_SIZE // extractor.model.config.patch_size) ** 2
    assert features.shape == (1, 1 + patches, extractor.model.config.hidden_size)
    with torch.no_grad():
        reference = extractor.model(**extractor.image_processor(images=image, return_tensors="pt"))
    torch.testing.assert_close(features, reference.last_hidden_state)
