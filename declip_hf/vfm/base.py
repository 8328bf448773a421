"""The interface every vision foundation model (VFM) adapter implements: how DeCLIP reads a VFM's patch features,
for the context loss in training and for the correlation maps of the analysis (docs/method.md §9)."""

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


class VFMAdapter(nn.Module):
    """One VFM family read as DeCLIP's context teacher: pixels of its view -> (B, C, g, g) patch features.

    Subclasses name the `model_types` they read (the registry in `registry.py` is keyed on them), say where the
    patch size sits in the config, and implement `forward`. The view of a teacher with patch p for a student grid
    of g x g patches is (g * p) px square, normalised with the VFM's own mean/std (`registry.vfm_normalisation`).
    """

    model_types: tuple[str, ...] = ()

    @staticmethod
    def patch_size(config: PretrainedConfig) -> int:
        return config.patch_size

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, V, V) view -> (B, C, V / patch, V / patch) features, in the model's dtype."""
        raise NotImplementedError
