"""Streaming training data (training/data.py): disjoint coverage per rank and worker, skip counts, reshuffling, resume,
per-rank epoch tallies, source validation, and bounded decoding of huge images.

Every usable test image is a solid colour whose red value is 7 * id, in a different mode or format each, so the id
can be read back from the student view and every image can be counted exactly once.
"""

import io
import json
import random
import re
import shutil
import struct
import tarfile
import time
import zlib
from collections import Counter
from types import SimpleNamespace

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from accelerate import Accelerator
from accelerate.data_loader import IterableDatasetShard
from accelerate.state import AcceleratorState
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from huggingface_hub import HfApi, constants as hub_constants
from huggingface_hub.errors import RepositoryNotFoundError
from transformers.utils import logging as transformers_logging

from training.data import (
    MAX_DECODED_PIXELS,
    SKIP_REASONS,
    ImageViewsDataset,
    SkipCounter,
    StreamPosition,
    all_ranks_have_batch,
    batches_in_step,
    decode_image,
    make_dataloader,
    open_image_stream,
    reduction_scale,
    shard_for_process,
    sharding_warning,
    validate_source,
)
from training.tiny_assets import make_tiny_assets
from training.views import UnusableImage, ViewConfig, make_views, to_rgb

# Three dataloader workers on this 2-core machine are on purpose (one per parquet shard); torch warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")

CONFIG = ViewConfig(student_size=64, student_patch=4, teacher_size=32, vfm_patch=2, max_crops=6)
CLIP_MEAN_RED, CLIP_STD_RED = 0.48145466, 0.26862954
NUM_GOOD = 30
BAD_KINDS = {"undecodable": 3, "truncated": 17, "tiny": 25, "missing": 33}  # kind -> row (row 33 is the last)
NUM_ROWS = NUM_GOOD + len(BAD_KINDS)


def encoded(image: PIL.Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format)
    return buffer.getvalue()


def good_image(image_id: int) -> bytes:
    """A solid image with red = 7 * id once converted to RGB, in one of five modes/formats."""
    red = 7 * image_id
    size = (20 + image_id % 7, 14 + image_id % 5)
    makers = [
        lambda: encoded(PIL.Image.new("RGB", size, (red, 100, 200)), "PNG"),
        lambda: encoded(PIL.Image.new("RGBA", size, (red, 50, 50, 255)), "PNG"),
        lambda: encoded(PIL.Image.new("CMYK", size, (255 - red, 0, 0, 0)), "TIFF"),
        lambda: encoded(PIL.Image.new("L", size, red), "PNG"),
        lambda: encoded(PIL.Image.fromarray(np.full(size[::-1], red * 257, dtype=np.uint16)), "PNG"),  # I;16
    ]
    return makers[image_id % len(makers)]()


def bad_image(kind: str) -> bytes | None:
    jpeg = encoded(PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)), "JPEG")
    return {
        "undecodable": np.random.default_rng(1).bytes(300),
        "truncated": jpeg[: len(jpeg) // 2],
        "tiny": encoded(PIL.Image.new("RGB", (5, 50)), "PNG"),
        "missing": None,
    }[kind]


def table_rows() -> list[dict]:
    """NUM_ROWS rows: the bad images at the rows of BAD_KINDS, good ids 0.. elsewhere; path = the row's name."""
    bad_at_row = {row: kind for kind, row in BAD_KINDS.items()}
    rows, next_id = [], 0
    for row in range(NUM_ROWS):
        if row in bad_at_row:
            data, name = bad_image(bad_at_row[row]), bad_at_row[row]
        else:
            data, name = good_image(next_id), f"id{next_id}"
            next_id += 1
        rows.append({"image": None if data is None else {"bytes": data, "path": name}, "row": row})
    return rows


@pytest.fixture(autouse=True)
def no_parquet_shutdown_sleep(monkeypatch):
    # `datasets` waits 5 s after every pass over shuffled parquet shards (a guard against an Arrow crash when its
    # reader threads outlive the interpreter, apache/arrow#45214); these test processes live on, so skip the wait.
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory):
    """Three parquet shards of 12, 11 and 11 rows (30 good images, one of each bad kind, the last row bad)."""
    folder = tmp_path_factory.mktemp("parquet")
    rows = table_rows()
    features = Features({"image": ImageFeature(), "row": Value("int64")})
    for shard, (start, stop) in enumerate([(0, 12), (12, 23), (23, NUM_ROWS)]):
        Dataset.from_list(rows[start:stop], features=features).to_parquet(folder / f"train-{shard:05d}.parquet")
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """An image folder: 9 good files and one corrupt .png."""
    folder = tmp_path_factory.mktemp("images")
    for image_id in range(9):
        (folder / f"{image_id}.png").write_bytes(good_image(image_id))
    (folder / "corrupt.png").write_bytes(bad_image("undecodable"))
    return folder


def row_names(stream) -> list[str]:
    return [example["image"]["path"] if example["image"] else "missing" for example in stream]


def image_ids(batch) -> list[int]:
    """Read each image's id back from the red channel of its student view's top-left pixel."""
    red = batch["student"][:, 0, 0, 0] * CLIP_STD_RED + CLIP_MEAN_RED
    return [round(value * 255 / 7) for value in red.tolist()]


def views_dataset(source, rank=0, world_size=1, shuffle_buffer=0, seed=0) -> ImageViewsDataset:
    stream = shard_for_process(open_image_stream(str(source)), rank, world_size, seed, shuffle_buffer)
    return ImageViewsDataset(stream, "image", CONFIG, seed=seed, rank=rank)


# ---------------------------------------------------------------------------------------------------------------
# Disjoint coverage


# 3 shards: split by examples for 2 ranks, by shards for 3; the buffer fed by all shards at once or one at a time.
@pytest.mark.parametrize("world_size, input_shards", [(2, 10), (3, 10), (2, 1)])
def test_ranks_read_disjoint_parts_that_cover_the_stream(parquet_dir, world_size, input_shards):
    stream = open_image_stream(str(parquet_dir))
    assert stream.num_shards == 3 and stream.column_names == ["image"]
    parts = [
        row_names(shard_for_process(stream, rank, world_size, 0, shuffle_buffer=8, shuffle_input_shards=input_shards))
        for rank in range(world_size)
    ]
    everything = [name for part in parts for name in part]
    assert len(everything) == NUM_ROWS and len(set(everything)) == NUM_ROWS
    assert all(len(part) >= NUM_ROWS // world_size - 1 for part in parts)


def test_a_streamed_image_folder_is_one_shard_and_still_split_disjointly(image_folder):
    stream = open_image_stream(str(image_folder))
    assert stream.num_shards == 1
    parts = [row_names(shard_for_process(stream, rank, 2, seed=0, shuffle_buffer=4)) for rank in range(2)]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(str(path) for path in image_folder.iterdir())

    # Two dataloader workers on each rank of a single-shard source: both workers get images, each image once.
    seen, skipped, workers = Counter(), torch.zeros(len(SKIP_REASONS), dtype=torch.long), set()
    for rank in range(2):
        for batch in make_dataloader(views_dataset(image_folder, rank, 2, shuffle_buffer=4), 2, num_workers=2):
            seen.update(image_ids(batch))
            skipped += batch["skipped"]
            workers.add((rank, int(batch["worker"])))
    assert seen == Counter(range(9))
    assert dict(zip(SKIP_REASONS, skipped.tolist()))["undecodable"] == 1 and skipped.sum() == 1
    assert workers == {(0, 0), (0, 1), (1, 0), (1, 1)}


# 2 processes (1 example in 2 each, as 3 shards do not divide by 2): workers stride over their process's stream;
# 1 process with 3 workers: each worker reads whole shards.
@pytest.mark.parametrize("world_size, num_workers", [(2, 0), (2, 2), (1, 3)])
def test_every_image_is_seen_once_and_bad_ones_are_counted(parquet_dir, world_size, num_workers):
    seen, skipped, workers = Counter(), torch.zeros(len(SKIP_REASONS), dtype=torch.long), set()
    for rank in range(world_size):
        loader = make_dataloader(views_dataset(parquet_dir, rank, world_size, shuffle_buffer=8), 4, num_workers)
        for batch in loader:
            workers.add((rank, int(batch["worker"])))
            size = batch["student"].shape[0]
            assert batch["crops"].shape == (size, 6, 3, 32, 32) and batch["boxes"].shape == (size, 6, 4)
            assert batch["vfm"].shape == (size, 3, 32, 32) and batch["crop_valid"].dtype == torch.bool
            seen.update(image_ids(batch))
            skipped += batch["skipped"]
    assert seen == Counter(range(NUM_GOOD))
    assert len(workers) == world_size * max(1, num_workers)  # every worker contributed
    expected = {reason: int(reason in BAD_KINDS) for reason in SKIP_REASONS}
    assert dict(zip(SKIP_REASONS, skipped.tolist())) == expected


def test_preparing_an_already_split_loader_would_drop_data(parquet_dir):
    # What `accelerator.prepare(dataloader)` does to an iterable dataset on 2 processes: keep every other batch.
    dataset = views_dataset(parquet_dir, rank=0, world_size=2)
    own = sum(1 for _ in dataset)
    prepared = IterableDatasetShard(dataset, batch_size=1, num_processes=2, process_index=0)
    assert sum(1 for _ in prepared) < own


# ---------------------------------------------------------------------------------------------------------------
# Epochs and resume


def epoch_batches(dataset: ImageViewsDataset, epoch: int, num_workers: int = 0) -> list[dict]:
    dataset.set_epoch(epoch)
    return list(make_dataloader(dataset, 3, num_workers))


def test_each_epoch_reshuffles_reproducibly(parquet_dir):
    dataset = views_dataset(parquet_dir, rank=0, world_size=2, shuffle_buffer=8, seed=5)
    first, second = epoch_batches(dataset, 0), epoch_batches(dataset, 1)
    again = epoch_batches(views_dataset(parquet_dir, rank=0, world_size=2, shuffle_buffer=8, seed=5), 1)
    order = lambda batches: [i for batch in batches for i in image_ids(batch)]  # noqa: E731
    assert order(first) != order(second)
    assert order(second) == order(again)
    for a, b in zip(second, again):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["crops"], b["crops"])

    other_rank = views_dataset(parquet_dir, rank=1, world_size=2, shuffle_buffer=8, seed=5)
    assert sorted(order(second) + order(epoch_batches(other_rank, 1))) == list(range(NUM_GOOD))


@pytest.mark.parametrize("num_workers", [0, 2, 3])  # 2 workers stride over examples, 3 read a shard each
def test_resume_yields_the_batches_of_an_uninterrupted_run(parquet_dir, num_workers):
    make = lambda: views_dataset(parquet_dir, shuffle_buffer=8, seed=3)  # noqa: E731
    uninterrupted = epoch_batches(make(), 1, num_workers)

    position = StreamPosition()
    position.start_epoch(1)
    dataset = make()
    dataset.set_epoch(1)
    consumed = []
    for batch in make_dataloader(dataset, 3, num_workers):
        consumed.append(batch)
        position.advance(batch)
        if len(consumed) == 5:  # the next batch is worker 1's (of 2) or worker 2's (of 3), not worker 0's
            break
    state = json.loads(json.dumps(position.state_dict()))  # as stored in a checkpoint

    resumed_dataset = make()
    resumed_dataset.load_stream_state(state)
    resumed_dataset.set_epoch(1)
    resumed = list(make_dataloader(resumed_dataset, 3, num_workers))

    assert len(consumed) + len(resumed) == len(uninterrupted)
    for expected, got in zip(uninterrupted, consumed + resumed):
        assert image_ids(expected) == image_ids(got)
        assert torch.equal(expected["boxes"], got["boxes"]) and torch.equal(expected["crops"], got["crops"])
    total_skipped = sum(batch["skipped"] for batch in consumed + resumed)
    assert total_skipped.sum() == len(BAD_KINDS)  # the skipped images are counted once, not again after resuming

    # The saved position belongs to epoch 1 only: the next epoch starts from its beginning.
    assert sum(len(image_ids(batch)) for batch in epoch_batches(resumed_dataset, 2, num_workers)) == NUM_GOOD


def test_sharding_warning_says_when_processes_read_more_than_their_share(parquet_dir, image_folder):
    parquet = open_image_stream(str(parquet_dir))  # 3 shards
    assert sharding_warning(parquet, world_size=3, num_workers=0) is None
    assert sharding_warning(parquet, world_size=1, num_workers=3) is None
    processes = sharding_warning(parquet, world_size=2, num_workers=0)
    assert "not divisible by 2 processes" in processes
    # ... and what to do about it.
    assert "launch a number of processes that divides 3, or re-shard the data into a multiple of 2 files" in processes
    assert "or accept it" in processes
    workers = sharding_warning(parquet, world_size=1, num_workers=2)
    assert "not divisible by 2 dataloader workers" in workers
    assert "set --dataloader_num_workers to a divisor of 3 (e.g. 1)" in workers
    assert "re-shard the data into a multiple of 2 files" in workers and "or accept it" in workers
    six_shards = Dataset.from_dict({"image": [None] * 6}).to_iterable_dataset(num_shards=6)
    assert "a divisor of 6 (e.g. 3)" in sharding_warning(six_shards, world_size=1, num_workers=4)
    assert "a divisor of 3 (e.g. 1)" in sharding_warning(six_shards, world_size=2, num_workers=2)
    assert sharding_warning(open_image_stream(str(image_folder)), world_size=1, num_workers=0) is None


def test_resuming_with_another_number_of_workers_is_refused(parquet_dir):
    dataset = views_dataset(parquet_dir)
    dataset.load_stream_state({"epoch": 0, "batches": 1, "num_workers": 2, "consumed": {"0": 4}})
    with pytest.raises(ValueError, match="2 dataloader workers"):
        next(iter(dataset))


# ---------------------------------------------------------------------------------------------------------------
# Stopping all ranks together


@pytest.fixture
def accelerator():
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)  # leave no global state to other tests


def test_all_ranks_have_batch_in_a_single_process(accelerator, parquet_dir):
    assert all_ranks_have_batch(accelerator, True) is True
    assert all_ranks_have_batch(accelerator, False) is False
    loader = make_dataloader(views_dataset(parquet_dir), 4, num_workers=0)
    counter, batches = SkipCounter(), 0
    for batch in batches_in_step(loader, accelerator):
        counter.add_counts(batch["skipped"])
        batches += 1
    assert batches == -(-NUM_GOOD // 4)
    assert counter.as_dict() == {reason: int(reason in BAD_KINDS) for reason in SKIP_REASONS}
    assert counter.reduce(accelerator).as_dict() == counter.as_dict() and counter.total == len(BAD_KINDS)


def test_a_survey_counts_the_skips_of_a_part_without_usable_images(parquet_dir, tmp_path):
    rows = [{"image": {"bytes": bad_image(kind), "path": kind}} for kind in ("undecodable", "truncated", "tiny")]
    rows.append({"image": None})
    Dataset.from_list(rows, features=Features({"image": ImageFeature()})).to_parquet(tmp_path / "bad.parquet")
    unusable = views_dataset(tmp_path)
    assert list(make_dataloader(unusable, 2, num_workers=0)) == []  # the loader cannot report these skips
    usable, skipped = unusable.survey()
    assert usable == 0 and skipped.as_dict() == {
        "undecodable": 1, "truncated": 1, "too_large": 0, "missing": 1, "tiny": 1, "mode": 0
    }
    usable, skipped = views_dataset(parquet_dir).survey()
    assert usable == NUM_GOOD and skipped.total == len(BAD_KINDS)
    assert views_dataset(parquet_dir).survey(max_examples=5)[0] + 1 == 5  # row 3 is bad


# ---------------------------------------------------------------------------------------------------------------
# Sources and their validation


def test_webdataset_shards_stream_with_their_image_column(tmp_path):
    with tarfile.open(tmp_path / "shard-000.tar", "w") as archive:
        for image_id in range(4):
            data = encoded(PIL.Image.new("RGB", (16, 12), (7 * image_id, 0, 0)), "PNG")
            member = tarfile.TarInfo(f"sample{image_id:03d}.png")
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    with pytest.raises(ValueError, match="has no column 'image'.*'png'.*--image_column"):
        validate_source(str(tmp_path))
    stream = shard_for_process(open_image_stream(str(tmp_path), image_column="png"), 0, 1, seed=0, shuffle_buffer=0)
    batches = list(make_dataloader(ImageViewsDataset(stream, "png", CONFIG, seed=0), 4, num_workers=0))
    assert image_ids(batches[0]) == [0, 1, 2, 3]


def test_validate_source_names_the_columns_and_the_flag(tmp_path):
    Dataset.from_dict({"picture": [{"bytes": good_image(0), "path": None}], "caption": ["x"]}).cast_column(
        "picture", ImageFeature()
    ).to_parquet(tmp_path / "data.parquet")
    expected = r"no column 'image'; its columns are \['picture', 'caption'\].*--image_column"
    with pytest.raises(ValueError, match=expected):
        validate_source(str(tmp_path), image_column="image")
    validate_source(str(tmp_path), image_column="picture")
    validate_source(str(tmp_path / "*.parquet"), image_column="picture")
    with pytest.raises(ValueError, match="data_files only selects files of a Hub dataset"):
        validate_source(str(tmp_path), image_column="picture", data_files="*.parquet")


@pytest.mark.parametrize(
    "source, where",
    [
        ("/nonexistent/images", "'/' holds no 'nonexistent'"),
        ("./no_such_folder", "'.' holds no 'no_such_folder'"),
        ("missing.parquet", "'.' holds no 'missing.parquet'"),
        ("data/imgs", "'data' holds no 'imgs'"),  # `data/` exists here: a local path, not a Hub id
        ("data/imgs/train", "'data' holds no 'imgs'"),  # no Hub id has two slashes
        ("my images", "'.' holds no 'my images'"),  # nor a space
    ],
)
def test_a_missing_local_path_fails_at_once_without_asking_the_hub(tmp_path, monkeypatch, source, where):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    monkeypatch.setattr(HfApi, "dataset_info", lambda *args, **kwargs: pytest.fail("asked the Hub"))
    with pytest.raises(ValueError, match=re.escape(f"No such folder or Hub dataset: '{source}': {where}")):
        validate_source(source)


class HubUnreachable(Exception):
    """What huggingface_hub raises without network (httpx's ConnectError, or requests' ConnectionError)."""


def hub_answering(error: Exception):
    def dataset_info(self, repo_id, timeout=None):
        assert timeout is not None  # one bounded request, not load_dataset's half minute of retries
        raise error

    return dataset_info


def test_a_name_that_may_be_a_hub_id_is_looked_up_once_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    response = SimpleNamespace(status_code=404, headers={}, request=None)  # what the error reads of an HTTP response
    not_found = RepositoryNotFoundError("404 Client Error: Repository Not Found", response=response)
    monkeypatch.setattr(HfApi, "dataset_info", hub_answering(not_found))
    with pytest.raises(ValueError, match="No such folder or Hub dataset: 'imgs': .*the Hub has no such dataset"):
        validate_source("imgs")
    monkeypatch.setattr(HfApi, "dataset_info", hub_answering(HubUnreachable("Name or service not known")))
    started = time.monotonic()
    with pytest.raises(ValueError, match="No such folder or Hub dataset: 'someone/imgs': .*could not be reached"):
        validate_source("someone/imgs")
    assert time.monotonic() - started < 5


def test_offline_a_hub_id_not_in_the_cache_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(HfApi, "dataset_info", lambda *args, **kwargs: pytest.fail("asked the Hub while offline"))
    with pytest.raises(ValueError, match="No such folder or Hub dataset: 'someone/imgs': .*offline mode"):
        validate_source("someone/imgs")


def test_writing_the_tiny_assets_says_what_it_writes_without_progress_bars(tmp_path, capfd):
    root = make_tiny_assets(tmp_path / "assets", num_images=6, num_shards=1)
    out, err = capfd.readouterr()
    expected = f"Writing the tiny assets (random CLIP, EVA02, DINOv2, DINO and SAM checkpoints, 6 generated images) to {root}\n"
    assert expected == out + err
    assert sorted(path.name for path in root.iterdir()) == ["clip", "dino", "dinov2", "eva", "images", "sam"]
    # The bars are back for what follows.
    assert not datasets.are_progress_bars_disabled() and transformers_logging.is_progress_bar_enabled()
    make_tiny_assets(root)
    assert capfd.readouterr() == ("", "")  # already there: nothing to say
    # A folder written before the DINO and SAM teachers existed gets just those, with a line saying so.
    shutil.rmtree(root / "sam")
    clip_files = sorted((root / "clip").iterdir())
    make_tiny_assets(root)
    assert capfd.readouterr().err == f"Adding the tiny SAM checkpoint(s) to {root}\n"
    assert (root / "sam" / "config.json").is_file() and sorted((root / "clip").iterdir()) == clip_files


# ---------------------------------------------------------------------------------------------------------------
# Huge images: decoded reduced or skipped, never decoded in full


def gradient_jpeg(width: int, height: int) -> bytes:
    """A smooth photo-like JPEG (a reduced decode of it must look like a resize of the full one)."""
    xs = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    ys = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    pixels = np.stack(np.broadcast_arrays(xs + 0 * ys, ys + 0 * xs, (xs + ys) / 2), axis=-1).astype(np.uint8)
    return encoded(PIL.Image.fromarray(pixels), "JPEG")


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height RGB pixels and holds none of them (a "bomb header")."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def decode_reason(data: bytes, needed_side: int | None = None) -> str:
    with pytest.raises(UnusableImage) as raised:
        decode_image({"bytes": data, "path": None}, needed_side)
    return raised.value.reason


def test_views_need_at_most_teacher_size_times_max_split_pixels_a_side():
    assert ViewConfig().source_side == 224 * 6
    assert CONFIG.source_side == 32 * 6
    assert ViewConfig(student_size=1120, student_patch=16, max_split=2).source_side == 1120
    # Full size below twice the need; otherwise the largest of 1/8, 1/4, 1/2 that keeps the need (and 10 px).
    assert reduction_scale((2687, 2000), 1344) == 1
    assert reduction_scale((2688, 100), 1344) == 2
    assert reduction_scale((12000, 12000), 1344) == 8
    assert reduction_scale((30000, 40), 1344) == 4  # 1/8 would leave 5 px rows: "tiny"


def test_a_large_jpeg_is_decoded_reduced_and_its_views_barely_change():
    data = gradient_jpeg(1600, 1200)
    full = to_rgb(decode_image({"bytes": data, "path": None}))
    reduced = to_rgb(decode_image({"bytes": data, "path": None}, CONFIG.source_side))
    assert full.size == (1600, 1200) and reduced.size == (200, 150)  # 1/8: still >= 192 px
    views_full = make_views(full, CONFIG, random.Random(0))
    views_reduced = make_views(reduced, CONFIG, random.Random(0))
    for key in ("student", "vfm", "crops"):  # normalised units: 0.05 is about 3 grey levels
        assert (views_full[key] - views_reduced[key]).abs().mean() < 0.05, key
    # Boxes stay exact: edges on the decoded image's pixel grid, the same grid cells as at full size.
    assert torch.allclose(views_full["boxes"], views_reduced["boxes"], atol=0.5 / 200)
    assert torch.equal(views_full["crop_valid"], views_reduced["crop_valid"])
    edges = views_reduced["boxes"][views_reduced["crop_valid"]] * 200
    assert torch.allclose(edges, edges.round(), atol=1e-4)


def test_a_normal_sized_image_is_decoded_exactly_as_before():
    data = gradient_jpeg(300, 380)  # under twice the 192 px the tiny views need
    plain = PIL.Image.open(io.BytesIO(data))
    plain.load()
    decoded = decode_image({"bytes": data, "path": None}, CONFIG.source_side)
    assert decoded.size == (300, 380) and np.array_equal(np.asarray(decoded), np.asarray(plain))


def test_images_over_the_pixel_limit_are_skipped_before_decoding():
    side = int(MAX_DECODED_PIXELS**0.5) + 1
    assert decode_reason(png_header(side, side)) == "too_large"  # PIL would let this through without a warning
    assert decode_reason(png_header(12000, 12000), CONFIG.source_side) == "too_large"  # PIL: a warning only
    assert decode_reason(png_header(100_000, 100_000)) == "too_large"  # PIL's own refusal
    assert decode_reason(png_header(3000, 3000)) == "undecodable"  # under the limit: decoded, and lacks pixels
    # A JPEG of 12000 x 12000 px is decoded at 1/8 (1500 x 1500), not skipped.
    image = decode_image({"bytes": gradient_jpeg(4000, 3000), "path": None}, ViewConfig().source_side)
    assert image.size == (2000, 1500)
