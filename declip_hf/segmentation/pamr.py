"""Pixel-adaptive mask refinement (PAMR; Araslanov & Roth, CVPR 2020), as NACLIP (WACV 2025) applies it to the
similarity maps of training-free segmentation (its `pamr.py`, 10 iterations, dilations 8 and 16).

Each iteration replaces every pixel's scores by a weighted mean of its neighbours' scores: for each dilation d, the
8 pixels at offsets {-d, 0, d}^2 other than (0, 0), image borders replicated. The weights come from the image
only: for neighbour p, `-|I(x) - I(p)| / (1e-8 + 0.1 * sigma(x))` per colour channel, sigma being the standard
deviation (unbiased) of the 9 values of every dilation's 3 x 3 stencil taken together (the centre counted once per
dilation), averaged over the channels, then a softmax over all the neighbours.
"""

import torch
import torch.nn.functional as F
from torch import nn


def _offsets(dilation: int, with_centre: bool) -> list[tuple[int, int]]:
    steps = (-dilation, 0, dilation)
    return [(dy, dx) for dy in steps for dx in steps if with_centre or (dy, dx) != (0, 0)]


def _shifted_views(x: torch.Tensor, offsets: list[tuple[int, int]], dilation: int) -> list[torch.Tensor]:
    """(B, C, H, W) -> one (B, C, H, W) view per offset: view k at (y, x) is x at (y + dy_k, x + dx_k), borders
    replicated. One padded copy serves all the offsets."""
    _, _, height, width = x.shape
    padded = F.pad(x, [dilation] * 4, mode="replicate")
    return [padded[:, :, dilation + dy : dilation + dy + height, dilation + dx : dilation + dx + width]
            for dy, dx in offsets]


def _shifted(x: torch.Tensor, offsets: list[tuple[int, int]], dilation: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, len(offsets), H, W), the views of `_shifted_views` stacked."""
    return torch.stack(_shifted_views(x, offsets, dilation), dim=2)


class PAMR(nn.Module):
    r"""
    Refines per-class score maps along the image's edges.

    Args:
        num_iterations (`int`, *optional*, defaults to 10): Propagation steps.
        dilations (`tuple[int]`, *optional*, defaults to `(8, 16)`): Neighbourhood radii in pixels.
    """

    def __init__(self, num_iterations: int = 10, dilations: tuple[int, ...] = (8, 16)):
        super().__init__()
        self.num_iterations = num_iterations
        self.dilations = tuple(dilations)

    def neighbour_weights(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) image -> (B, P, H, W) weights summing to 1 over the P = 8 * len(dilations) neighbours."""
        stencils = torch.cat([_shifted(image, _offsets(d, with_centre=True), d) for d in self.dilations], dim=2)
        spread = stencils.std(dim=2, keepdim=True)  # (B, 3, 1, H, W), over all dilations' stencils together
        neighbours = torch.cat([_shifted(image, _offsets(d, with_centre=False), d) for d in self.dilations], dim=2)
        affinity = -(image[:, :, None] - neighbours).abs() / (1e-8 + 0.1 * spread)  # (B, 3, P, H, W)
        return affinity.mean(dim=1).softmax(dim=1)

    def forward(self, image: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """image (B, 3, H, W), scores (B, C, H, W) at the image's size -> refined scores (B, C, H, W)."""
        if image.shape[-2:] != scores.shape[-2:]:
            raise ValueError(f"PAMR needs scores at the image's size, got {tuple(scores.shape[-2:])} for an image of "
                             f"{tuple(image.shape[-2:])}.")
        weights = self.neighbour_weights(image.float())
        scores = scores.float()
        for _ in range(self.num_iterations):
            refined = torch.zeros_like(scores)
            index = 0
            # One neighbour at a time: (B, C, H, W) memory, not (B, C, P, H, W), for 171 classes at full size.
            for dilation in self.dilations:
                for neighbour in _shifted_views(scores, _offsets(dilation, with_centre=False), dilation):
                    refined += neighbour * weights[:, index : index + 1]
                    index += 1
            scores = refined
        return scores
