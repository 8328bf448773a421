"""Image preprocessing shared by DeCLIP's training views and its evaluation (docs/method.md §3), and the public
dense-input helper that reproduces the training view for users."""

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

# Extra field of a released folder's image processor (saved and loaded like any processor attribute): the side the
# student was distilled at, the size to give `prepare_dense_inputs`. The processor itself works at config.image_size.
TRAINING_SIZE_FIELD = "declip_training_size"


def letterbox(image: Image.Image, size: int, centred: bool = False) -> Image.Image:
    """Resize an RGB image's longest side to `size` (bicubic) and pad with black to a `size` square.

    `centred` puts the left/top padding at floor(pad / 2) (teacher crops); otherwise the image sits top-left and the
    padding is right/bottom (student and VFM views). Resized sides use Python's `round`, as open_clip does, and are
    at least 1 px.
    """
    width, height = image.size
    scale = size / max(width, height)
    new_width, new_height = max(1, round(width * scale)), max(1, round(height * scale))
    resized = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    left, top = ((size - new_width) // 2, (size - new_height) // 2) if centred else (0, 0)
    canvas = Image.new("RGB", (size, size))  # black: pixel value 0 before normalisation
    canvas.paste(resized, (left, top))
    return canvas


def prepare_dense_inputs(
    images: Image.Image | Sequence[Image.Image],
    size: int,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> torch.Tensor:
    """`pixel_values` for dense features exactly as DeCLIP's student saw its training images (docs/method.md §3).

    Each image is converted to RGB, its longest side resized to `size` (bicubic) and padded right/bottom with black
    to a `size` square (`letterbox`), then normalised as `(pixel / 255 - mean) / std`. Pass the released image
    processor's `image_mean`/`image_std` and its recorded `declip_training_size` (or any multiple of the patch
    size). Unlike the image processor (shortest-edge resize and centre crop at CLIP's input size, for the global
    embedding), nothing is cropped away: a box normalised to the padded square maps to the original image by
    multiplying with `max(width, height)`.

    Args:
        images (`PIL.Image.Image` or a sequence of them): the images; other modes (L, RGBA, CMYK, ...) are converted.
        size (`int`): side of the square input, in pixels.
        mean, std (`Sequence[float]`, *optional*, default to OpenAI CLIP's): per-channel normalisation.

    Returns:
        `torch.FloatTensor` of shape `(batch_size, 3, size, size)`.
    """
    images = [images] if isinstance(images, Image.Image) else list(images)
    if not images or not all(isinstance(image, Image.Image) for image in images):
        raise ValueError("prepare_dense_inputs expects a PIL image or a non-empty sequence of PIL images.")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive number of pixels, got {size!r}.")
    if len(mean) != 3 or len(std) != 3 or any(value <= 0 for value in std):
        raise ValueError(f"mean and std need 3 channel values each (std > 0), got {mean!r} and {std!r}.")
    squares = [letterbox(image.convert("RGB"), size) for image in images]
    pixels = torch.from_numpy(np.stack([np.asarray(square) for square in squares]))  # (B, size, size, 3) uint8
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels.permute(0, 3, 1, 2).float() / 255.0 - mean_t) / std_t  # (B, 3, size, size)
