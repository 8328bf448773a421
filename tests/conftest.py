"""Shared fixtures: tiny random checkpoints on disk and an offline Hugging Face Hub cache."""

from pathlib import Path

import pytest

from declip_hf.hub.validation import build_offline_hub_cache
from declip_hf.models.tiny import save_tiny_clip, save_tiny_dinov2, save_tiny_eva
from training.tiny_assets import make_tiny_assets, save_tiny_dino, save_tiny_sam

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A random CLIPModel (both towers, tokenizer, image processor) in the Hub's on-disk layout."""
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def tiny_dinov2_dir(tmp_path_factory) -> Path:
    return save_tiny_dinov2(tmp_path_factory.mktemp("tiny_dinov2"))


@pytest.fixture(scope="session")
def tiny_dinov2_registers_dir(tmp_path_factory) -> Path:
    return save_tiny_dinov2(tmp_path_factory.mktemp("tiny_dinov2_reg"), num_register_tokens=4)


@pytest.fixture(scope="session")
def tiny_eva_dir(tmp_path_factory) -> Path:
    """A random EVA02 DeCLIP student (the authors' released architecture)."""
    return save_tiny_eva(tmp_path_factory.mktemp("tiny_eva"))


@pytest.fixture(scope="session")
def tiny_dino_dir(tmp_path_factory) -> Path:
    return save_tiny_dino(tmp_path_factory.mktemp("tiny_dino"))


@pytest.fixture(scope="session")
def tiny_sam_dir(tmp_path_factory) -> Path:
    return save_tiny_sam(tmp_path_factory.mktemp("tiny_sam"))


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> Path:
    """The built-in tiny assets (training/tiny_assets.py): CLIP, EVA02, DINOv2, DINO (patch 2) and SAM (patch 4)
    checkpoints and generated images."""
    return make_tiny_assets(tmp_path_factory.mktemp("assets") / "tiny")


@pytest.fixture
def offline_hub_cache(tmp_path):
    """Factory: `offline_hub_cache(repo_id, folder) -> env` for subprocesses that load `repo_id` offline."""
    return lambda repo_id, folder: build_offline_hub_cache(tmp_path / "hub_cache", repo_id, folder)
