"""The context teachers of the distillation: frozen VFMs read by their adapters from `declip_hf.vfm`
(docs/method.md §4.2, §9)."""

import torch
from torch import nn
from transformers import PreTrainedModel

from declip_hf.vfm import vfm_adapter_class

from .base import freeze


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
