"""declip-hf: DeCLIP (CVPR 2025, "Decoupled Learning for Open-Vocabulary Dense Perception") for Hugging Face."""

from transformers import AutoConfig, AutoModel

from .models import (
    DECOUPLED_ATTENTION_MODES,
    TRAINABLE_ATTENTION_MODES,
    DeCLIPCheckpointError,
    DeCLIPDenseOutput,
    DeCLIPEvaVisionConfig,
    DeCLIPEvaVisionModel,
    DeCLIPVisionConfig,
    DeCLIPVisionModel,
    pool_boxes,
    pool_masks,
    prepare_dense_inputs,
)
from .segmentation import ClassEmbeddings, DeCLIPSegmentationOutput, DeCLIPSegmenter

__version__ = "0.1.0"

AutoConfig.register(DeCLIPVisionConfig.model_type, DeCLIPVisionConfig, exist_ok=True)
AutoModel.register(DeCLIPVisionConfig, DeCLIPVisionModel, exist_ok=True)
# Saved folders then carry this code and an `auto_map`, so they load with `trust_remote_code=True` anywhere.
DeCLIPVisionConfig.register_for_auto_class()
DeCLIPVisionModel.register_for_auto_class("AutoModel")
# The EVA02-CLIP student (docs/method.md §8): the architecture of the authors' released checkpoints.
AutoConfig.register(DeCLIPEvaVisionConfig.model_type, DeCLIPEvaVisionConfig, exist_ok=True)
AutoModel.register(DeCLIPEvaVisionConfig, DeCLIPEvaVisionModel, exist_ok=True)
DeCLIPEvaVisionConfig.register_for_auto_class()
DeCLIPEvaVisionModel.register_for_auto_class("AutoModel")

__all__ = [
    "DECOUPLED_ATTENTION_MODES",
    "TRAINABLE_ATTENTION_MODES",
    "ClassEmbeddings",
    "DeCLIPCheckpointError",
    "DeCLIPDenseOutput",
    "DeCLIPEvaVisionConfig",
    "DeCLIPEvaVisionModel",
    "DeCLIPSegmentationOutput",
    "DeCLIPSegmenter",
    "DeCLIPVisionConfig",
    "DeCLIPVisionModel",
    "pool_boxes",
    "pool_masks",
    "prepare_dense_inputs",
]
