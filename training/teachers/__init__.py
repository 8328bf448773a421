"""The frozen teachers of DeCLIP's distillation (docs/method.md §4, §9): the starting CLIP, which embeds the grid
crops for the content loss, and one or more vision foundation models (VFMs), whose patch features give the context
loss. The VFMs are read by the per-family adapters of `declip_hf.vfm` (DINOv2, DINO, SAM; chosen by the config's
`model_type`), the same readers the analysis uses; this package wraps them for training.

All run in eval mode without gradients, optionally in half precision, and are never wrapped by Accelerate: they
have nothing to synchronise, and DDP would refuse modules without trainable parameters.
"""

from declip_hf.vfm import VFM_ADAPTERS, VFMAdapter, check_vfm_config, vfm_adapter_class, vfm_patch_size

from .base import freeze
from .clip import FrozenCLIPTeacher
from .context import ContextTeachers, FrozenVFM

__all__ = [
    "VFM_ADAPTERS",
    "ContextTeachers",
    "FrozenCLIPTeacher",
    "FrozenVFM",
    "VFMAdapter",
    "check_vfm_config",
    "freeze",
    "vfm_adapter_class",
    "vfm_patch_size",
]
