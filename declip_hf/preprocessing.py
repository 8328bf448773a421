"""Image preprocessing shared by DeCLIP's training views and its evaluation (docs/method.md §3)."""

from PIL import Image


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
