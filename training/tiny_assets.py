"""The built-in small default of the distillation script: tiny random CLIP, DINOv2, DINO and SAM checkpoints and a
few dozen generated images as local parquet shards, written on first use so that `configs/tiny.yaml` (and every
teacher and ablation, docs/method.md §9-§10) runs anywhere, offline.

Layout under the assets folder: `clip/` (a random `CLIPModel` with tokenizer, Hub layout), `dinov2/` (a random
`Dinov2Model`), `dino/` (a random `ViTModel`, as facebook/dino-vitb16), `sam/` (a random `SamModel`, as
facebook/sam-vit-base), `images/train-0000{i}-of-0000{n}.parquet` (one `image` column, `datasets.Image` feature). A few
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
import torch
from datasets import Dataset, Features, Image
from transformers import SamConfig, SamImageProcessor, SamModel, ViTConfig, ViTImageProcessor, ViTModel
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from declip_hf.models.loading_utils import quiet_transformers
from declip_hf.models.tiny import save_tiny_clip, save_tiny_dinov2, save_tiny_eva

# The tiny teachers' patch sizes. With the tiny CLIP's patch 4 and a 64 px student view (16 x 16 grid), the DINO
# view is 32 px and the SAM view 64 px, the same grid; SAM's 8 x 8 position grid (32 px) is then resized to 16 x 16,
# as a real SAM's 64 x 64 grid is to 35 x 35 for a 560 px student.
TINY_DINO_PATCH_SIZE = 2
TINY_SAM_PATCH_SIZE = 4
_TINY_VIT = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
             "image_size": 32, "patch_size": TINY_DINO_PATCH_SIZE}

# Images that are not usable on purpose: decoding fails, or smaller than the 10 px minimum of §3.
NUM_BAD_IMAGES = 2


def save_tiny_dino(path: str | Path, seed: int = 0) -> Path:
    """Write a random DINO (v1) `ViTModel` and its image processor (ImageNet statistics, as facebook/dino-vitb16)."""
    path = Path(path)
    torch.manual_seed(seed)
    ViTModel(ViTConfig(**_TINY_VIT)).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=IMAGENET_DEFAULT_MEAN,
                      image_std=IMAGENET_DEFAULT_STD).save_pretrained(path)
    return path


def tiny_sam_config() -> SamConfig:
    """SAM's layout at hidden size 32, patch 4: 2 blocks (a windowed one, window 4, then a global one), a 24-channel
    neck."""
    channels = 24
    vision = {**_TINY_VIT, "patch_size": TINY_SAM_PATCH_SIZE, "mlp_dim": 37, "window_size": 4,
              "global_attn_indexes": [1], "output_channels": channels, "num_pos_feats": channels // 2,
              "initializer_range": 0.02}  # SamVisionConfig's own 1e-10 would make every feature about 0
    vision.pop("intermediate_size")
    prompt = {"hidden_size": channels, "image_size": 32, "patch_size": TINY_SAM_PATCH_SIZE}
    decoder = {"hidden_size": channels, "mlp_dim": 37, "num_attention_heads": 4, "iou_head_hidden_dim": channels}
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def save_tiny_sam(path: str | Path, seed: int = 0) -> Path:
    """Write a random `SamModel` and its image processor. SAM initialises its absolute and relative position
    embeddings to zero; they are drawn at random here so that resizing them changes the features, as it does for
    the trained checkpoints."""
    path = Path(path)
    torch.manual_seed(seed)
    model = SamModel(tiny_sam_config())
    with torch.no_grad():
        for name, parameter in model.vision_encoder.named_parameters():
            if name == "pos_embed" or name.endswith(("rel_pos_h", "rel_pos_w")):
                parameter.normal_(std=0.5)
    model.save_pretrained(path)
    SamImageProcessor(size={"longest_edge": 32}, pad_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


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


# The checkpoints added after the first layout (teachers, and the EVA02 student of configs/tiny_eva.yaml): an assets
# folder written before them gets them on its next use.
LATER_TEACHERS = {"dino": save_tiny_dino, "sam": save_tiny_sam, "eva": save_tiny_eva}


def make_tiny_assets(root: str | Path, num_images: int = 48, num_shards: int = 2) -> Path:
    """Write the tiny checkpoints and images under `root` unless they are there already; returns `root`.

    Says in one line what it writes, without the progress bars of `save_pretrained` and `to_parquet`. Safe when
    several processes start at once: each writes a private folder and renames it into place; a process that loses
    the race drops its copy. A folder written before the DINO and SAM teachers existed gets just those.
    """
    root = Path(root)
    if root.exists():
        _add_later_teachers(root)
        return root
    print(f"Writing the tiny assets (random CLIP, EVA02, DINOv2, DINO and SAM checkpoints, {num_images} generated "
          f"images) to {root}", file=sys.stderr, flush=True)
    staging = root.parent / f".{root.name}.tmp-{uuid.uuid4().hex[:8]}"
    with quiet_transformers(), _no_datasets_progress_bars():
        save_tiny_clip(staging / "clip")
        save_tiny_dinov2(staging / "dinov2")
        for name, save in LATER_TEACHERS.items():
            save(staging / name)
        write_image_shards(staging / "images", num_images, num_shards)
    _rename_or_drop(staging, root)
    return root


def _add_later_teachers(root: Path) -> None:
    missing = [name for name in LATER_TEACHERS if not (root / name).exists()]
    if not missing or not (root / "clip").is_dir():  # not an assets folder of ours: leave it alone
        return
    print(f"Adding the tiny {' and '.join(name.upper() for name in missing)} checkpoint(s) to {root}",
          file=sys.stderr, flush=True)
    for name in missing:
        staging = root / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        with quiet_transformers():
            LATER_TEACHERS[name](staging)
        _rename_or_drop(staging, root / name)


def _rename_or_drop(staging: Path, target: Path) -> None:
    try:
        os.rename(staging, target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)


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
