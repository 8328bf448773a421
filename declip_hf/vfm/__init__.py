"""Vision foundation models (DINOv2, DINO, SAM) read as DeCLIP reads them (docs/method.md §4.2, §9): one adapter per
family, chosen by the checkpoint config's `model_type`, turning the pixels of the VFM's view into (B, C, g, g) patch
features. The distillation's context teachers (training/teachers/) and the analysis' `VFMPatchFeatures` both read
VFMs through this registry, so the maps a user inspects are the ones the context loss aligns with.
"""

from .base import VFMAdapter
from .dino import DinoAdapter
from .dinov2 import Dinov2Adapter
from .registry import (
    SUPPORTED_EXAMPLES,
    VFM_ADAPTERS,
    check_vfm_config,
    vfm_adapter_class,
    vfm_normalisation,
    vfm_patch_size,
)
from .sam import SamAdapter, resized_position_embedding

__all__ = [
    "SUPPORTED_EXAMPLES",
    "VFM_ADAPTERS",
    "DinoAdapter",
    "Dinov2Adapter",
    "SamAdapter",
    "VFMAdapter",
    "check_vfm_config",
    "resized_position_embedding",
    "vfm_adapter_class",
    "vfm_normalisation",
    "vfm_patch_size",
]
