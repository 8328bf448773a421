"""What every frozen teacher shares: frozen, in eval mode, in its dtype (docs/method.md §4, §9)."""

import torch
from torch import nn


def freeze(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    return model.to(dtype=dtype).eval().requires_grad_(False)
