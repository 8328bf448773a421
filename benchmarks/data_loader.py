"""Speed of the training data pipeline alone: images/s per dataloader worker process (docs/method.md §3).

Generates real-size JPEGs (640 x 480 by default, COCO's typical size; smooth random content so they compress like
photos), then measures two things:

1. In this process with one torch thread (as in a dataloader worker), each stage of the recipe's views per image:
   JPEG decode (`training/data.py decode_image`), the 20 grid crops at 224 px for the teacher, the 560 px student
   view and the 490 px DINOv2 view (`training/views.py`), reported per stage and as images/s per worker.
2. The real loader (`open_image_stream` on the JPEG folder -> `ImageViewsDataset` -> `make_dataloader`, batch 2)
   with each `--workers` count, images/s end to end.

How many workers one GPU needs: workers >= GPU images/s / (images/s per worker), plus headroom (the README gives
the rule and this machine's number).

    python benchmarks/data_loader.py                     # 64 images, workers 0 and 2 (a minute on 2 cores)
    python benchmarks/data_loader.py --tiny              # 8 small images: checks the script in seconds
"""

import argparse
import io
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `training.*` from the repository root

from declip_hf.models.preprocessing import letterbox  # noqa: E402
from training.data import ImageViewsDataset, decode_image, make_dataloader, open_image_stream  # noqa: E402
from training.views import ViewConfig, make_grid_crops, normalise, to_rgb  # noqa: E402


def photo_like_jpeg(width: int, height: int, rng: np.random.Generator, quality: int = 90) -> bytes:
    """A JPEG of smooth random content (coarse noise upsampled): it compresses like a photo (about 0.1-0.2 bytes per
    pixel at quality 90), unlike white noise, so decoding costs what a COCO image costs."""
    coarse = rng.integers(0, 256, size=(height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    image = PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def stage_seconds(jpegs: list[bytes], config: ViewConfig) -> dict[str, list[float]]:
    """Seconds per image of each stage of `make_views` (the same calls, timed apart), decode included."""
    stages = {"decode": [], "teacher crops": [], "student view": [], "VFM view": []}
    for index, data in enumerate(jpegs):
        rng = random.Random(index)
        start = time.perf_counter()
        image = to_rgb(decode_image({"bytes": data, "path": None}, config.source_side))
        stages["decode"].append(time.perf_counter() - start)
        start = time.perf_counter()
        make_grid_crops(image, config, rng)
        stages["teacher crops"].append(time.perf_counter() - start)
        start = time.perf_counter()
        normalise([letterbox(image, config.student_size, centred=False)], config.clip_mean, config.clip_std)
        stages["student view"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for view in config.vfm_views.values():
            normalise([letterbox(image, config.grid_size * view.patch, centred=False)], view.mean, view.std)
        stages["VFM view"].append(time.perf_counter() - start)
    return stages


def loader_images_per_second(folder: Path, config: ViewConfig, workers: int, batch_size: int) -> float:
    """End-to-end images/s of the training loader over the JPEG folder (worker start-up included, as in an epoch)."""
    dataset = ImageViewsDataset(open_image_stream(str(folder)), "image", config, seed=0)
    start, images = time.perf_counter(), 0
    for batch in make_dataloader(dataset, batch_size, workers):
        images += len(batch["student"])
    return images / (time.perf_counter() - start)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="8 small images and tiny views (a smoke test).")
    parser.add_argument("--images", type=int, default=64, help="JPEGs to generate.")
    parser.add_argument("--size", type=int, nargs=2, default=[640, 480], metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 2], help="Dataloader worker counts to run.")
    parser.add_argument("--batch_size", type=int, default=2, help="Per-GPU batch of the loader (the recipe's 2).")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)  # what a dataloader worker gets (torch sets 1 thread in each worker)
    if args.tiny:
        args.images, args.size = 8, [80, 60]
        config = ViewConfig(student_size=64, student_patch=4, teacher_size=32, vfm_patch=2)
    else:
        config = ViewConfig()  # the recipe: 560 px student, 20 crops at 224 px, DINOv2 view 490 px
    rng = np.random.default_rng(0)
    jpegs = [photo_like_jpeg(*args.size, rng) for _ in range(args.images)]
    stages = stage_seconds(jpegs, config)
    per_image = sum(statistics.mean(values) for values in stages.values())
    print(f"{args.images} JPEGs of {args.size[0]}x{args.size[1]} (mean {statistics.mean(map(len, jpegs)) / 1024:.0f} "
          f"KiB); views: student {config.student_size} px, {config.max_crops} crops at {config.teacher_size} px, "
          f"VFM {config.vfm_size} px; torch {torch.__version__}")
    print("\nOne process, one torch thread (a dataloader worker):\n")
    print("| stage | ms per image |\n|---|---:|")
    for name, values in stages.items():
        print(f"| {name} | {statistics.mean(values) * 1e3:.1f} |")
    print(f"| **all** | **{per_image * 1e3:.1f}** |\n\nimages/s per worker: {1 / per_image:.1f}\n")
    with tempfile.TemporaryDirectory() as folder:
        for index, data in enumerate(jpegs):
            (Path(folder) / f"{index:05d}.jpg").write_bytes(data)
        print(f"The training loader (batch {args.batch_size}), end to end, worker start-up included:\n")
        print("| workers | images/s |\n|---:|---:|")
        for workers in args.workers:
            print(f"| {workers} | {loader_images_per_second(Path(folder), config, workers, args.batch_size):.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
