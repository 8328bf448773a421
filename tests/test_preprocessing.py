"""The public dense-input helper: DeCLIP's training view (letterbox, right/bottom padding, CLIP normalisation)."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

import declip_hf
from declip_hf import prepare_dense_inputs
from training.views import letterbox, normalise

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def gradient_image(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """An image whose every pixel differs, so a shift, flip or mis-scaled resize shows."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8)).convert(mode)


def plain_dense_inputs(image: Image.Image, size: int) -> torch.Tensor:
    """The training view written out pixel by pixel: resize the longest side, paste top-left on black, normalise."""
    width, height = image.size
    scale = size / max(width, height)
    resized = image.convert("RGB").resize(
        (max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC
    )
    expected = torch.empty(3, size, size)
    for channel in range(3):
        canvas = np.zeros((size, size), dtype=np.float32)
        plane = np.asarray(resized, dtype=np.float32)[..., channel]
        canvas[: plane.shape[0], : plane.shape[1]] = plane
        expected[channel] = (torch.from_numpy(canvas) / 255.0 - MEAN[channel]) / STD[channel]
    return expected


@pytest.mark.parametrize("width, height", [(50, 30), (30, 50), (40, 40), (7, 300)])
def test_dense_inputs_are_the_training_view(width, height):
    image = gradient_image(width, height)
    pixel_values = prepare_dense_inputs(image, size=48, mean=MEAN, std=STD)
    assert pixel_values.shape == (1, 3, 48, 48) and pixel_values.dtype == torch.float32
    torch.testing.assert_close(pixel_values[0], plain_dense_inputs(image, 48), rtol=0, atol=1e-6)
    # Exactly what training's student view gives (training/views.py).
    torch.testing.assert_close(pixel_values, normalise([letterbox(image, 48)], MEAN, STD), rtol=0, atol=0)


def test_dense_inputs_batch_convert_modes_and_pad_right_bottom():
    images = [gradient_image(60, 20), gradient_image(20, 60, mode="L"), gradient_image(30, 30, mode="RGBA")]
    pixel_values = prepare_dense_inputs(images, size=30)
    assert pixel_values.shape == (3, 3, 30, 30)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN), torch.tensor(OPENAI_CLIP_STD)
    black = -mean / std  # a padded pixel: 0 before normalisation
    # 60x20 -> 30x10 at the top: rows 10.. are padding; 20x60 -> 10x30 at the left: columns 10.. are padding.
    torch.testing.assert_close(pixel_values[0, :, 10:, :], black.view(3, 1, 1).expand(3, 20, 30))
    torch.testing.assert_close(pixel_values[1, :, :, 10:], black.view(3, 1, 1).expand(3, 30, 20))
    assert not torch.allclose(pixel_values[0, :, :10, :], black.view(3, 1, 1).expand(3, 10, 30))
    # A grey-scale image becomes three equal channels before normalisation.
    unnormalised = pixel_values[1, :, :, :10] * std.view(3, 1, 1) + mean.view(3, 1, 1)
    torch.testing.assert_close(unnormalised[0], unnormalised[1])
    torch.testing.assert_close(unnormalised[0], unnormalised[2])


@pytest.mark.parametrize(
    "images, kwargs, message",
    [
        ([], {"size": 32}, "non-empty sequence of PIL images"),
        (np.zeros((4, 4, 3), dtype=np.uint8), {"size": 32}, "PIL image"),
        (gradient_image(4, 4), {"size": 0}, "size must be a positive"),
        (gradient_image(4, 4), {"size": 32.0}, "size must be a positive"),
        (gradient_image(4, 4), {"size": 32, "std": (0.2, 0.0, 0.3)}, "std > 0"),
        (gradient_image(4, 4), {"size": 32, "mean": (0.5,)}, "3 channel values"),
    ],
)
def test_dense_inputs_refuse_bad_arguments(images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        prepare_dense_inputs(images, **kwargs)


def test_helper_is_exported():
    assert "prepare_dense_inputs" in declip_hf.__all__ and declip_hf.prepare_dense_inputs is prepare_dense_inputs
