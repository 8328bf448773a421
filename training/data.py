"""Streaming training images for DeCLIP distillation (CVPR 2025, arXiv 2505.04410) with 🤗 datasets.

A source (Hub id, local image folder, parquet files or webdataset shards) is opened as a streaming
`datasets.IterableDataset` whose image column is left undecoded; every process takes a disjoint part of it
(`shard_for_process`); `ImageViewsDataset` decodes each image in our own code (so a bad file is counted and skipped,
never fatal) and turns it into the three views of training/views.py; `make_dataloader` batches them.

How the training loop must use this (each point is a trap that silently loses data or hangs):

1. NEVER pass the dataloader to `accelerator.prepare`. `shard_for_process` already gives each rank its own part;
   `prepare` would shard the batches a second time and every rank would silently train on 1 / world_size of its
   part. Move the batches to the device yourself.
2. Ranks can hold different numbers of batches (skipped images, shards of different sizes); a rank that leaves the
   epoch while the others still step hangs DDP. Iterate with `batches_in_step(loader, accelerator)`, which stops
   every rank as soon as one runs out.
3. Call `dataset.set_epoch(epoch)` before each epoch (new shuffle, new views) and build the loader without
   persistent workers (`make_dataloader` does), so the workers see the new epoch.
4. Resume: keep a `StreamPosition`, `advance` it with every batch the loop consumes and save its `state_dict()`
   with the checkpoint; on resume call `dataset.load_stream_state(state)` before iterating. The batches that follow
   are exactly those of an uninterrupted run (same seed, world size and number of workers): each worker re-reads
   its part of the stream up to the saved position without decoding it, so unlike `datasets`' own `state_dict()`
   nothing in the shuffle buffer is lost. One exception: with more than two workers, an interruption after one of
   them ran out of images in that epoch can reorder the epoch's last batches (none is lost or repeated).
   A checkpoint taken at the very end of an epoch resumes into an epoch with nothing left: expect no batch there.
"""

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import PIL.Image
import torch
from datasets import Image, IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node
from datasets.utils.file_utils import xopen
from torch.utils.data import DataLoader, get_worker_info

from training.views import SKIP_REASONS, UnusableImage, ViewConfig, make_views, to_rgb

VIEW_KEYS = ("student", "crops", "boxes", "crop_valid", "vfm")
# Per-example bookkeeping that travels with the views so nothing is lost inside dataloader workers.
POSITION_KEYS = ("worker", "num_workers", "stream_position")

# Local files -> the `datasets` builder that streams them; any other folder is read with `imagefolder`.
_BUILDER_BY_SUFFIX = {".parquet": "parquet", ".tar": "webdataset"}


# ----------------------------------------------------------------------------------------------------------------
# Sources


def resolve_source(source: str, data_files=None) -> tuple[str, dict]:
    """The `load_dataset` path and keyword arguments for `source`: a Hub id, a local folder, file or glob pattern."""
    is_pattern = any(char in source for char in "*?[")
    path = Path(source).expanduser()
    if data_files is not None and (is_pattern or path.exists()):
        raise ValueError(
            f"data_files only selects files of a Hub dataset; for local files give a folder or a glob pattern as the "
            f"source instead (e.g. '{source.rstrip('/')}/*.parquet')"
        )
    if is_pattern:
        return _BUILDER_BY_SUFFIX.get(Path(source).suffix, "imagefolder"), {"data_files": source}
    if path.exists():
        return _local_builder(path)
    if source.startswith(("/", ".", "~")) or Path(source).suffix in _BUILDER_BY_SUFFIX:
        raise ValueError(f"Dataset source {source!r} does not exist: give an existing local folder/file or a Hub id")
    return source, {"data_files": data_files} if data_files is not None else {}


def _local_builder(path: Path) -> tuple[str, dict]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for suffix, builder in _BUILDER_BY_SUFFIX.items():
        matching = [str(p) for p in files if p.suffix == suffix]
        if matching:
            return builder, {"data_files": matching}
    if path.is_file():
        raise ValueError(f"Cannot stream {path}: use parquet (.parquet), webdataset (.tar) or a folder of images")
    return "imagefolder", {"data_dir": str(path)}


def open_image_stream(
    source: str, split: str = "train", image_column: str = "image", streaming: bool = True, data_files=None
) -> IterableDataset:
    """Open `source` as an `IterableDataset` holding only `image_column`, undecoded ({"bytes", "path"} dicts).

    The column is cast to `datasets.Image(decode=False)` so a broken file fails in `decode_image` (counted and
    skipped), not inside the `datasets` iterator (which would end the run).
    """
    builder, kwargs = resolve_source(source, data_files)
    try:
        dataset = load_dataset(builder, split=split, streaming=streaming, **kwargs)
    except FileNotFoundError as error:
        raise ValueError(f"Cannot open dataset source {source!r} (split {split!r}): {error}") from error
    if not streaming:  # downloaded and cached once; iterate it like a stream with enough shards to split
        dataset = dataset.to_iterable_dataset(num_shards=max(1, min(len(dataset), 64)))
    _check_image_column(dataset, image_column, source)
    return dataset.select_columns([image_column]).cast_column(image_column, Image(decode=False))


def _check_image_column(dataset: IterableDataset, image_column: str, source: str) -> None:
    columns = dataset.column_names
    if columns is None:  # some Hub streams declare no features: look at the first example
        columns = list(next(iter(dataset.take(1)), {}))
    if image_column not in columns:
        raise ValueError(
            f"Dataset {source!r} has no column {image_column!r}; its columns are {columns}. "
            f"Pass the one holding the images with --image_column."
        )


def validate_source(source: str, split: str = "train", image_column: str = "image", data_files=None) -> None:
    """Fail early (before any model is built) with a clear ValueError if `source` cannot be streamed as images.

    Streaming `load_dataset` only lists the files and reads the schema, so this is cheap.
    """
    open_image_stream(source, split, image_column, streaming=True, data_files=data_files)


# ----------------------------------------------------------------------------------------------------------------
# Distribution


def shard_for_process(
    stream: IterableDataset,
    rank: int,
    world_size: int,
    seed: int,
    shuffle_buffer: int,
    shuffle_input_shards: int = 10,
) -> IterableDataset:
    """This rank's disjoint part of `stream`, shuffled with a `shuffle_buffer`-example buffer (0 or 1: no shuffle).

    `split_dataset_by_node` deals whole shards to ranks when `world_size` divides the number of shards, otherwise
    every rank reads the whole stream and keeps every `world_size`-th example (e.g. a streamed image folder, which
    is one shard). Either way the parts are disjoint and cover the stream. The shuffle is seeded identically on
    every rank (required for that split) and changes with `set_epoch` (see `ImageViewsDataset.set_epoch`).

    `shuffle_input_shards` shards feed the buffer at a time (`datasets`' `max_buffer_input_shards`): more mixes
    better, but with several parquet shards `datasets` then reads them in threads and pauses 5 s at the end of
    every pass (a guard against apache/arrow#45214); 1 avoids the pause, which matters only for tiny runs.
    """
    if shuffle_buffer > 1:
        stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer, max_buffer_input_shards=shuffle_input_shards)
    return split_dataset_by_node(stream, rank=rank, world_size=world_size)


def sharding_warning(stream: IterableDataset, world_size: int, num_workers: int) -> str | None:
    """A line for the log when processes or dataloader workers must read more of `stream` than their share.

    Reading whole shards needs the shard count to be divisible by the number of processes, and each process's
    shard count by its number of workers; otherwise examples are dealt out one by one from a stream that each of
    them reads in full (correct, only more I/O: worth knowing for a large Hub dataset).
    """
    num_shards, num_workers = stream.num_shards, max(1, num_workers)
    if num_shards % world_size:
        return (
            f"The dataset has {num_shards} shard(s), not divisible by {world_size} processes: every process reads all "
            f"of it and keeps 1 example in {world_size}."
        )
    if (num_shards // world_size) % num_workers:
        return (
            f"Each process has {num_shards // world_size} shard(s), not divisible by {num_workers} dataloader workers: "
            f"every worker reads all of its process's shards and decodes 1 image in {num_workers}."
        )
    return None


def all_ranks_have_batch(accelerator, has_batch: bool) -> bool:
    """True only if every process has a batch (an all-reduce MIN, written as MAX of "missing"); works alone too."""
    missing = torch.tensor([0 if has_batch else 1], device=accelerator.device)
    return int(accelerator.reduce(missing, reduction="max").item()) == 0


def batches_in_step(loader: DataLoader, accelerator) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the loader's batches until any process runs out, so that all processes leave the epoch together."""
    iterator = iter(loader)
    while True:
        batch = next(iterator, None)
        if not all_ranks_have_batch(accelerator, batch is not None):
            return
        yield batch


# ----------------------------------------------------------------------------------------------------------------
# Decoding and skip counts


def decode_image(value) -> PIL.Image.Image:
    """Decode an undecoded image cell ({"bytes", "path"}) fully, or raise `UnusableImage`."""
    if value is None or (value.get("bytes") is None and value.get("path") is None):
        raise UnusableImage("missing", "empty image cell")
    data = value["bytes"]
    if data is None:
        try:
            with xopen(value["path"], "rb") as file:
                data = file.read()
        except OSError as error:
            raise UnusableImage("missing", f"cannot read {value['path']} ({error})") from error
    try:
        image = PIL.Image.open(BytesIO(data))
        image.load()  # decode now: truncation only shows when the pixels are read
    except PIL.Image.DecompressionBombError as error:
        raise UnusableImage("too_large", str(error)) from error
    except Exception as error:  # noqa: BLE001 - broken files raise OSError, SyntaxError, struct.error, ... all skipped
        reason = "truncated" if "truncated" in str(error).lower() else "undecodable"
        raise UnusableImage(reason, f"{type(error).__name__}: {error}") from error
    return image


class SkipCounter:
    """Skipped images per reason (`SKIP_REASONS`); summed over batches with `add_counts`, over ranks with `reduce`."""

    def __init__(self):
        self.counts = dict.fromkeys(SKIP_REASONS, 0)

    def add(self, reason: str) -> None:
        self.counts[reason] += 1

    def add_counts(self, counts: torch.Tensor) -> None:
        """Add a (len(SKIP_REASONS),) count tensor, e.g. a batch's "skipped"."""
        for reason, count in zip(SKIP_REASONS, counts.tolist()):
            self.counts[reason] += int(count)

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.counts[reason] for reason in SKIP_REASONS], dtype=torch.long)

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def reduce(self, accelerator) -> "SkipCounter":
        """The counts summed over all processes (a collective: call it on every rank)."""
        summed = SkipCounter()
        summed.add_counts(accelerator.reduce(self.as_tensor().to(accelerator.device), reduction="sum").cpu())
        return summed


# ----------------------------------------------------------------------------------------------------------------
# Views dataset, batching, resume position


@dataclass
class StreamPosition:
    """How far the loop got in the current epoch, enough to resume at exactly the next example.

    `consumed[w]` is the number of stream examples (used or skipped) behind the last batch taken from logical
    worker `w`; `batches` the number of batches taken this epoch. Update it with every batch the loop consumes.
    """

    epoch: int = 0
    batches: int = 0
    num_workers: int = 1
    consumed: dict[int, int] = field(default_factory=dict)

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.batches, self.consumed = epoch, 0, {}

    def advance(self, batch: dict[str, torch.Tensor]) -> None:
        self.batches += 1
        self.num_workers = int(batch["num_workers"])
        self.consumed[int(batch["worker"])] = int(batch["stream_position"])

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batches": self.batches,
            "num_workers": self.num_workers,
            "consumed": {str(worker): count for worker, count in self.consumed.items()},  # JSON-safe keys
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches, self.num_workers = state["epoch"], state["batches"], state["num_workers"]
        self.consumed = {int(worker): count for worker, count in state["consumed"].items()}


def _worker_slot() -> tuple[int, int]:
    """(worker id, number of workers) of the calling dataloader worker; (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class ImageViewsDataset(torch.utils.data.IterableDataset):
    """The three views (training/views.py) of every usable image of this rank's stream; unusable ones are counted.

    Each example is a dict of the view tensors (`VIEW_KEYS`) plus "skipped", the (len(SKIP_REASONS),) counts of
    images skipped since the previous example of the same worker, and the `POSITION_KEYS` scalars that
    `StreamPosition.advance` reads. With dataloader workers, each worker takes a disjoint part of the rank's
    stream (see `_worker_values`).

    Args:
        stream (`IterableDataset`): this rank's stream, from `shard_for_process(open_image_stream(...), ...)`.
        image_column (`str`): the undecoded image column.
        view_config (`ViewConfig`): sizes of the views.
        seed (`int`): with (epoch, rank, worker, example index) it seeds each image's grid choice and shuffle.
        rank (`int`, *optional*, defaults to 0): this process's rank (for the view seeds).
    """

    def __init__(self, stream: IterableDataset, image_column: str, view_config: ViewConfig, seed: int, rank: int = 0):
        super().__init__()
        self.stream = stream
        self.image_column = image_column
        self.view_config = view_config
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.resume_position: StreamPosition | None = None

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the stream and redraw the views for `epoch`; a loaded resume position only applies to its epoch."""
        self.epoch = epoch
        if self.resume_position is not None and self.resume_position.epoch != epoch:
            self.resume_position = None

    def load_stream_state(self, state: dict) -> None:
        """Continue the saved epoch right after the last batch the loop consumed (a `StreamPosition.state_dict()`)."""
        self.resume_position = StreamPosition()
        self.resume_position.load_state_dict(state)
        self.epoch = self.resume_position.epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker_id, num_workers = _worker_slot()
        worker, start = self._resume_point(worker_id, num_workers)
        yield from self._views(self._worker_values(worker, num_workers), worker, num_workers, start)

    def _worker_values(self, worker: int, num_workers: int) -> Iterator[dict | None]:
        """This worker's undecoded image cells, in stream order.

        Whole shards when this rank's shards divide evenly among the workers (a second `split_dataset_by_node`);
        otherwise, e.g. for a single-shard image folder, every `num_workers`-th example of the rank's stream: each
        worker then reads the rank's part but decodes only its own images.
        """
        stream = self.stream
        by_shards = num_workers > 1 and stream.num_shards % num_workers == 0
        if by_shards:
            stream = split_dataset_by_node(stream, rank=worker, world_size=num_workers)
        stream.set_epoch(self.epoch)
        # `.iter()` rather than `iter(stream)`: inside a dataloader worker the latter splits by shards once more on
        # its own, which would leave all workers but one idle on a single-shard stream.
        values = (batch[self.image_column][0] for batch in stream.iter(batch_size=1))
        return values if by_shards else itertools.islice(values, worker, None, num_workers)

    def _resume_point(self, worker_id: int, num_workers: int) -> tuple[int, int]:
        """(logical worker, stream examples to skip). The dataloader takes batches from workers in turn, so after
        `batches` batches the next one belongs to logical worker `batches % num_workers`: rotating the roles lets
        physical worker 0 continue there."""
        position = self.resume_position
        if position is None:
            return worker_id, 0
        if position.num_workers != num_workers:
            raise ValueError(
                f"The saved data position was taken with {position.num_workers} dataloader workers, this run has "
                f"{num_workers}; resume with the same number of workers."
            )
        worker = (worker_id + position.batches) % num_workers
        return worker, position.consumed.get(worker, 0)

    def _views(self, values: Iterator[dict | None], worker: int, num_workers: int, start: int):
        # Each example is held back until the next usable one is found, so that the images skipped after it are
        # reported with it (and the position it carries already counts them); the last one carries the tail.
        skipped = SkipCounter()
        pending, index = None, start - 1
        for index, value in enumerate(values):
            if index < start:  # resume: fast-forward without decoding
                continue
            try:
                views = make_views(to_rgb(decode_image(value)), self.view_config, self._rng(worker, index))
            except UnusableImage as unusable:
                skipped.add(unusable.reason)
                continue
            if pending is not None:
                yield self._with_bookkeeping(pending, skipped, worker, num_workers, index)
                skipped = SkipCounter()
            pending = views
        if pending is not None:
            yield self._with_bookkeeping(pending, skipped, worker, num_workers, index + 1)

    def _rng(self, worker: int, index: int) -> random.Random:
        # A string seed is hashed with SHA-512, so it is the same in every process and Python session.
        return random.Random(f"declip-views/{self.seed}/{self.epoch}/{self.rank}/{worker}/{index}")

    @staticmethod
    def _with_bookkeeping(views, skipped: SkipCounter, worker: int, num_workers: int, position: int) -> dict:
        return {
            **views,
            "skipped": skipped.as_tensor(),
            "worker": torch.tensor(worker),
            "num_workers": torch.tensor(num_workers),
            "stream_position": torch.tensor(position),
        }


def collate_views(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack the views; sum the skip counts; keep the batch's position (all examples come from one worker)."""
    batch = {key: torch.stack([example[key] for example in examples]) for key in VIEW_KEYS}
    batch["skipped"] = torch.stack([example["skipped"] for example in examples]).sum(dim=0)
    workers = {int(example["worker"]) for example in examples}
    if len(workers) != 1:
        raise ValueError(f"A batch must come from one dataloader worker, got examples of workers {sorted(workers)}")
    # One worker yields its examples in stream order: the position after the batch is its last example's.
    batch.update({key: examples[-1][key] for key in POSITION_KEYS})
    return batch


def make_dataloader(dataset: ImageViewsDataset, batch_size: int, num_workers: int) -> DataLoader:
    """Batches of `collate_views`. Not persistent workers: each epoch's workers must see `set_epoch`.

    Do not pass the result to `accelerator.prepare` (see the module docstring).
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_views,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )
