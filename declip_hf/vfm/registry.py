"""Which adapter reads which VFM: a registry keyed on the checkpoint config's `model_type` (docs/method.md §9)."""

from transformers import PretrainedConfig
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..models.loading_utils import image_normalisation
from .base import VFMAdapter
from .dino import DinoAdapter
from .dinov2 import Dinov2Adapter
from .sam import SamAdapter

# model_type -> adapter class. A new VFM family is one adapter class added to this tuple.
VFM_ADAPTERS = {
    model_type: adapter for adapter in (Dinov2Adapter, DinoAdapter, SamAdapter) for model_type in adapter.model_types
}
SUPPORTED_EXAMPLES = ("facebook/dinov2-base", "facebook/dinov2-with-registers-base", "facebook/dino-vitb16",
                      "facebook/sam-vit-base")


def vfm_adapter_class(config: PretrainedConfig, name: str) -> type[VFMAdapter]:
    """The adapter for `config`; a ValueError naming the supported model types for any other model."""
    if config.model_type not in VFM_ADAPTERS:
        raise ValueError(
            f"--vfm {name!r} is a {config.model_type!r} model; the context teacher must be one of "
            f"{', '.join(VFM_ADAPTERS)} (e.g. {', '.join(SUPPORTED_EXAMPLES)})."
        )
    return VFM_ADAPTERS[config.model_type]


def check_vfm_config(config: PretrainedConfig, name: str) -> None:
    """Fail with a message that says what to pass when `name` is no supported VFM."""
    vfm_adapter_class(config, name)


def vfm_patch_size(config: PretrainedConfig, name: str) -> int:
    """The patch size of the VFM `config` describes (its view is the student's grid times this)."""
    return vfm_adapter_class(config, name).patch_size(config)


def vfm_normalisation(name_or_path: str, **hub_kwargs) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The VFM's image mean/std: its image-processor config's, ImageNet's when it has none."""
    return image_normalisation(name_or_path, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, **hub_kwargs)
