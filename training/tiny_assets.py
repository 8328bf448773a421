"""The built-in small default of the distillation script: tiny random CLIP and DINOv2 checkpoints and a few dozen
generated images as local parquet shards, written on first use so that `configs/tiny.yaml` runs anywhere, offline.

Layout under the assets folder: `clip/` (a random `CLIPModel` with tokenizer, Hub layout), `dinov2/` (a random
`Dinov2Model`), `images/train-0000{i}-of-0000{n}.parquet` (one `image` column, `datasets.Image` feature). A few
deliberately unusable images (corrupt bytes, a 5x5 px image) are included so that skip counting shows in the logs,
and some in other colour modes (grey, palette, RGBA, CMYK, 16-bit grey) that must be converted, not skipped.
"""

import contextlib
import io
import os
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np
import PIL.Image
import datasets
from datasets import Dataset, Features, Image

from declip_hf.loading_utils import quiet_transformers
from declip_hf.tiny import save_tiny_clip, save_tiny_dinov2

# Images that are not usable on purpose: decoding fails, or smaller than the 10 px minimum of §3.
NUM_BAD_IMAGES = 2


def synthetic_image(index: int, rng: np.random.Generator) -> PIL.Image.Image:
    """A random-sized image of smooth colour gradients with a few rectangles: structure for the losses to fit."""
    width, height = int(rng.integers(24, 96)), int(rng.integers(24, 96))
    ys, xs = np.mgrid[0:height, 0:width] / max(width, height)
    base = rng.uniform(0, 1, size=(3, 3))
    pixels = np.stack([base[c, 0] + base[c, 1] * xs + base[c, 2] * ys for c in range(3)], axis=-1)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width - 4)), int(rng.integers(0, height - 4))
        x1, y1 = x0 + int(rng.integers(4, width // 2 + 5)), y0 + int(rng.integers(4, height // 2 + 5))
        pixels[y0:y1, x0:x1] = rng.uniform(0, 1, size=3)
    image = PIL.Image.fromarray((np.clip(pixels / pixels.max(), 0, 1) * 255).astype(np.uint8))
    return _in_some_mode(image, index)


def _in_some_mode(image: PIL.Image.Image, index: int) -> PIL.Image.Image:
    """Every few images in a mode the data pipeline must convert to RGB."""
    converters = {
        3: lambda im: im.convert("L"),
        5: lambda im: im.convert("P"),
        7: lambda im: im.convert("RGBA"),
        9: lambda im: im.convert("CMYK"),
        11: lambda im: PIL.Image.fromarray(np.asarray(im.convert("L")).astype(np.uint16) * 257)  # mode "I;16",
    }
    return converters.get(index % 12, lambda im: im)(image)


def encode(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if image.mode == "CMYK" else "PNG")
    return buffer.getvalue()


def bad_images() -> list[bytes]:
    truncated_png = encode(PIL.Image.new("RGB", (40, 40), (200, 10, 10)))[:50]
    tiny = encode(PIL.Image.new("RGB", (5, 5), (10, 200, 10)))
    return [truncated_png, tiny]


def write_image_shards(folder: Path, num_images: int, num_shards: int, seed: int = 0) -> list[Path]:
    """`num_images` generated images (the last `NUM_BAD_IMAGES` of them unusable), dealt over parquet shards."""
    rng = np.random.default_rng(seed)
    images = [encode(synthetic_image(index, rng)) for index in range(num_images - NUM_BAD_IMAGES)] + bad_images()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(num_shards):
        cells = [{"bytes": data, "path": None} for data in images[shard::num_shards]]
        path = folder / f"train-{shard:05d}-of-{num_shards:05d}.parquet"
        Dataset.from_dict({"image": cells}, features=Features({"image": Image()})).to_parquet(str(path))
        paths.append(path)
    return paths


def make_tiny_assets(root: str | Path, num_images: int = 48, num_shards: int = 2) -> Path:
    """Write the tiny checkpoints and images under `root` unless they are there already; returns `root`.

    Says in one line what it writes, without the progress bars of `save_pretrained` and `to_parquet`. Safe when
    several processes start at once: each writes a private folder and renames it into place; a process that loses
    the race drops its copy.
    """
    root = Path(root)
    if root.exists():
        return root
    print(f"Writing the tiny assets (random CLIP and DINOv2 checkpoints, {num_images} generated images) to {root}",
          file=sys.stderr, flush=True)
    staging = root.parent / f".{root.name}.tmp-{uuid.uuid4().hex[:8]}"
    with quiet_transformers(), _no_datasets_progress_bars():
        save_tiny_clip(staging / "clip")
        save_tiny_dinov2(staging / "dinov2")
        write_image_shards(staging / "images", num_images, num_shards)
    try:
        os.rename(staging, root)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return root


@contextlib.contextmanager
def _no_datasets_progress_bars():
    """`datasets`' bars off for the block, then as they were (unless HF_DATASETS_DISABLE_PROGRESS_BARS decides)."""
    was_disabled = datasets.are_progress_bars_disabled()
    forced = datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is not None  # the environment variable has priority
    if not forced:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not forced and not was_disabled:
            datasets.enable_progress_bars()
