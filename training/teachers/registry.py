"""Which adapter reads which VFM: a registry keyed on the checkpoint config's `model_type` (docs/method.md §9)."""

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from .base import VFMAdapter, freeze
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


class FrozenVFM(nn.Module):
    """A frozen VFM read by its adapter: view pixels -> (B, C, g, g) float32 patch features."""

    def __init__(self, model: PreTrainedModel, dtype: torch.dtype = torch.float32):
        super().__init__()
        adapter_class = vfm_adapter_class(model.config, model.config.name_or_path)
        self.patch_size = adapter_class.patch_size(model.config)
        self.adapter = freeze(adapter_class(model), dtype)
        self.dtype = dtype

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.adapter(pixel_values.to(self.dtype)).float()


class ContextTeachers(nn.Module):
    """The run's context teachers, each reading its own view of the batch (`view_keys`, training/views.py).

    Args:
        vfms (`list[FrozenVFM]`): the teachers, in `--vfm` order; empty for the clipself ablation.
        view_keys (`list[str]`): the batch key of each teacher's view (teachers with the same patch size and
            normalisation share one view).
    """

    def __init__(self, vfms: list[FrozenVFM], view_keys: list[str]):
        super().__init__()
        if len(vfms) != len(view_keys):
            raise ValueError(f"{len(vfms)} context teachers but {len(view_keys)} view keys.")
        self.vfms = nn.ModuleList(vfms)
        self.view_keys = tuple(view_keys)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """One (B, C_i, g, g) feature map per teacher."""
        return tuple(vfm(batch[key]) for vfm, key in zip(self.vfms, self.view_keys))
