"""The DeCLIP vision models (docs/method.md §1, §8): configurations and modeling of the CLIP and EVA02-CLIP students,
their shared dense API (region pooling, the letterbox preprocessing), tiny checkpoints and loading helpers.

The configuration_*/modeling_* files import only each other and their siblings here, with single-dot relative
imports: `save_pretrained` copies them (and what they import that way) into a saved folder for
`trust_remote_code=True`.
"""

from .configuration_declip import (
    DECOUPLED_ATTENTION_MODES,
    TRAINABLE_ATTENTION_MODES,
    DeCLIPCheckpointError,
    DeCLIPVisionConfig,
)
from .configuration_declip_eva import DeCLIPEvaVisionConfig
from .modeling_declip import DeCLIPDenseOutput, DeCLIPVisionModel
from .modeling_declip_eva import DeCLIPEvaVisionModel
from .preprocessing import prepare_dense_inputs
from .region_pooling import pool_boxes, pool_masks

__all__ = [
    "DECOUPLED_ATTENTION_MODES",
    "TRAINABLE_ATTENTION_MODES",
    "DeCLIPCheckpointError",
    "DeCLIPDenseOutput",
    "DeCLIPEvaVisionConfig",
    "DeCLIPEvaVisionModel",
    "DeCLIPVisionConfig",
    "DeCLIPVisionModel",
    "pool_boxes",
    "pool_masks",
    "prepare_dense_inputs",
]
