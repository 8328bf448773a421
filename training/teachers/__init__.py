"""The frozen teachers of DeCLIP's distillation (docs/method.md §4, §9): the starting CLIP, which embeds the grid
crops for the content loss, and one or more vision foundation models (VFMs), whose patch features give the context
loss. One adapter per VFM family (DINOv2, DINO, SAM) behind one interface, chosen by the config's `model_type`.

All run in eval mode without gradients, optionally in half precision, and are never wrapped by Accelerate: they
have nothing to synchronise, and DDP would refuse modules without trainable parameters.
"""

from .base import VFMAdapter, freeze
from .clip import FrozenCLIPTeacher
from .registry import VFM_ADAPTERS, ContextTeachers, FrozenVFM, check_vfm_config, vfm_adapter_class, vfm_patch_size

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
