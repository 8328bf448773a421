"""Streaming training images for DeCLIP distillation (CVPR 2025, arXiv 2505.04410) with 🤗 datasets.

A source (Hub id, local image folder, parquet files or webdataset shards) is opened as a streaming
`datasets.IterableDataset` whose image column is left undecoded; every process takes a disjoint part of it
(`shard_for_process`); `ImageViewsDataset` decodes each image in our own code (so a bad file is counted and skipped,
never fatal) and turns it into the training views of training/views.py; `make_dataloader` batches them.

Every skipped image is counted under one of `SKIP_REASONS`: "missing" (empty cell, unreadable path), "undecodable"
(not an image, or corrupt data), "truncated" (the file ends early), "too_large" (more than `MAX_DECODED_PIXELS`
to decode), "tiny" (under 10 px a side), "mode" (no RGB conversion). Memory stays bounded for huge images: a JPEG
larger than the views can use is decoded at 1/2, 1/4 or 1/8 scale, other formats above the limit are skipped.

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
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import PIL.Image
import torch
from datasets import Image, IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node
from datasets.utils.file_utils import xopen
from huggingface_hub import HfApi, constants as hub_constants
from huggingface_hub.errors import GatedRepoError, HFValidationError, HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id
from torch.utils.data import DataLoader, get_worker_info

from training.views import MIN_IMAGE_SIDE, SKIP_REASONS, UnusableImage, ViewConfig, make_views, to_rgb

# Per-example bookkeeping that travels with the views so nothing is lost inside dataloader workers.
POSITION_KEYS = ("worker", "num_workers", "stream_position")

# The most pixels decoded for one image: 2**26, about 8192 x 8192 (192 MiB as RGB, in each dataloader worker). JPEGs
# are decoded reduced (see `decode_image`), so this skips only huge images of other formats (PNG, TIFF, WebP, ...)
# as "too_large", before decoding. PIL itself refuses on opening any image declaring more than
# 2 * PIL.Image.MAX_IMAGE_PIXELS (about 179 million) pixels, a JPEG too; those count as "too_large" as well.
MAX_DECODED_PIXELS = 2**26

# Seconds to wait for the Hub to say whether a dataset id exists (one request, no retries).
HUB_LOOKUP_TIMEOUT_S = 10

# Local files -> the `datasets` builder that streams them; any other folder is read with `imagefolder`.
_BUILDER_BY_SUFFIX = {".parquet": "parquet", ".tar": "webdataset"}


# ----------------------------------------------------------------------------------------------------------------
# Sources


def resolve_source(source: str, data_files=None) -> tuple[str, dict]:
    """The `load_dataset` path and keyword arguments for `source`: a Hub id, a local folder, file or glob pattern.

    A source that is neither an existing path nor a Hub dataset fails at once with "No such folder or Hub dataset",
    instead of `load_dataset` retrying the Hub for half a minute: a missing path that looks local, or is no valid
    Hub id, is refused without asking the Hub; otherwise the Hub is asked once (see `_find_hub_dataset`).
    """
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
    if _looks_local(source):
        raise ValueError(f"{_no_such_source(source)}: {_missing_path_hint(path)}; give an existing local folder, "
                         f"file or glob pattern, or the id of a Hub dataset (namespace/name)")
    _find_hub_dataset(source)
    return source, {"data_files": data_files} if data_files is not None else {}


def _no_such_source(source: str) -> str:
    return f"No such folder or Hub dataset: {source!r}"


def _looks_local(source: str) -> bool:
    """Whether a source that does not exist was meant as a local path: written as one (/, ./, ../, ~, a backslash,
    a data-file suffix), not a valid Hub id, or inside a local folder that exists (`data/imgs` next to `data/`)."""
    if source.startswith(("/", ".", "~")) or "\\" in source or Path(source).suffix in _BUILDER_BY_SUFFIX:
        return True
    try:
        validate_repo_id(source)
    except HFValidationError:
        return True
    parent = Path(source).parent
    return parent != Path(".") and parent.is_dir()


def _missing_path_hint(path: Path) -> str:
    """Where the path stops existing, e.g. "'data' holds no 'imgs'"."""
    existing = next(parent for parent in path.parents if parent.is_dir())  # "." or "/" at the latest
    return f"'{existing}' holds no '{path.relative_to(existing).parts[0]}'"


def _find_hub_dataset(source: str) -> None:
    """Ask the Hub once whether dataset `source` exists; raise ValueError at once if it does not or cannot be asked.

    In offline mode (HF_HUB_OFFLINE=1) nothing is asked: `load_dataset` then reads the local cache, and
    `open_image_stream` rewords its failure. A gated dataset exists: `load_dataset` explains the access it needs.
    """
    if hub_constants.HF_HUB_OFFLINE:
        return
    try:
        HfApi().dataset_info(source, timeout=HUB_LOOKUP_TIMEOUT_S)
    except GatedRepoError:
        return
    except RepositoryNotFoundError as error:
        raise ValueError(
            f"{_no_such_source(source)}: no local folder or file of that name, and the Hub has no such dataset (for a "
            f"private one, log in with `hf auth login`)."
        ) from error
    except HfHubHTTPError:
        return  # the Hub answered with another error: `load_dataset` reports it in full
    except Exception as error:  # noqa: BLE001 - connection errors are httpx's or requests' by huggingface_hub version
        raise ValueError(
            f"{_no_such_source(source)}: no local folder or file of that name, and the Hub could not be reached to "
            f"look for it ({type(error).__name__}: {error}). Check the path; for a Hub dataset check the network, or "
            f"set HF_HUB_OFFLINE=1 to read one already in the local cache."
        ) from error


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
    except ConnectionError as error:
        if not hub_constants.HF_HUB_OFFLINE:
            raise
        raise ValueError(
            f"{_no_such_source(source)}: no local folder or file of that name, and in offline mode (HF_HUB_OFFLINE "
            f"is set) a Hub dataset can only be read from the local cache, which does not hold it ({error})."
        ) from error
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
    """A line for the log, with the ways out, when processes or dataloader workers must read more than their share.

    Reading whole shards needs the shard count to be divisible by the number of processes, and each process's
    shard count by its number of workers; otherwise examples are dealt out one by one from a stream that each of
    them reads in full (correct, only more I/O: worth knowing for a large Hub dataset).
    """
    num_shards, num_workers = stream.num_shards, max(1, num_workers)
    accept = (
        "or accept it: the data are still split exactly, only read more than once (which matters for a large remote "
        "dataset, hardly for local files)."
    )
    if num_shards % world_size:
        return (
            f"The dataset has {num_shards} shard(s), not divisible by {world_size} processes: every process reads all "
            f"of it and keeps 1 example in {world_size}. To read whole shards instead, launch a number of processes "
            f"that divides {num_shards}, or re-shard the data into a multiple of {world_size} files; {accept}"
        )
    shards_per_process = num_shards // world_size
    if shards_per_process % num_workers:
        divisor = max(d for d in range(1, num_workers + 1) if shards_per_process % d == 0)
        return (
            f"Each process has {shards_per_process} shard(s), not divisible by {num_workers} dataloader workers: "
            f"every worker reads all of its process's shards and decodes 1 image in {num_workers}. To read whole "
            f"shards instead, set --dataloader_num_workers to a divisor of {shards_per_process} (e.g. {divisor}), or "
            f"re-shard the data into a multiple of {world_size * num_workers} files ({num_workers} per process); "
            f"{accept}"
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


def decode_image(value, needed_side: int | None = None) -> PIL.Image.Image:
    """Decode an undecoded image cell ({"bytes", "path"}), or raise `UnusableImage`.

    With `needed_side` (the longest side the views can use, `ViewConfig.source_side`) a JPEG at least twice that
    size is decoded at 1/2, 1/4 or 1/8 scale (PIL's `draft`, in the JPEG decoder itself), never below `needed_side`
    on its long side; smaller images and other formats are decoded in full, so their views are unchanged. An image
    that would still need more than `MAX_DECODED_PIXELS` pixels is skipped as "too_large" before decoding.
    """
    data = _image_bytes(value)
    try:
        with warnings.catch_warnings():
            # PIL warns above MAX_IMAGE_PIXELS; our own limit, checked after the JPEG reduction, decides instead.
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(BytesIO(data))
        if needed_side is not None:
            _reduce_on_decode(image, needed_side)
        _check_decoded_size(image)
        image.load()  # decode now: truncation only shows when the pixels are read
    except UnusableImage:
        raise
    except PIL.Image.DecompressionBombError as error:  # PIL's own refusal, above 2 * PIL.Image.MAX_IMAGE_PIXELS
        raise UnusableImage("too_large", str(error)) from error
    except Exception as error:  # noqa: BLE001 - broken files raise OSError, SyntaxError, struct.error, ... all skipped
        reason = "truncated" if _ends_early(data, error) else "undecodable"
        raise UnusableImage(reason, f"{type(error).__name__}: {error}") from error
    return image


def _image_bytes(value) -> bytes:
    if value is None or (value.get("bytes") is None and value.get("path") is None):
        raise UnusableImage("missing", "empty image cell")
    if value["bytes"] is not None:
        return value["bytes"]
    try:
        with xopen(value["path"], "rb") as file:
            return file.read()
    except OSError as error:
        raise UnusableImage("missing", f"cannot read {value['path']} ({error})") from error


def reduction_scale(size: tuple[int, int], needed_side: int) -> int:
    """The largest JPEG decoding scale 1/s (s = 8, 4 or 2) that keeps the long side at least `needed_side` and the
    short side at least `MIN_IMAGE_SIDE`; 1 (full size) when none does."""
    long_side, short_side = max(size), min(size)
    fits = [s for s in (8, 4, 2) if long_side // s >= needed_side and short_side // s >= MIN_IMAGE_SIDE]
    return fits[0] if fits else 1


def _reduce_on_decode(image: PIL.Image.Image, needed_side: int) -> None:
    scale = reduction_scale(image.size, needed_side)
    if scale > 1:
        width, height = image.size
        # JPEG only (other formats ignore `draft`): PIL picks the largest s in 8, 4, 2 with s <= min(W // w, H // h),
        # which for (w, h) = (W // s, H // s) is exactly `scale`; the image becomes ceil(W / s) x ceil(H / s).
        image.draft(None, (width // scale, height // scale))


def _check_decoded_size(image: PIL.Image.Image) -> None:
    width, height = image.size
    if width * height > MAX_DECODED_PIXELS:
        raise UnusableImage(
            "too_large",
            f"{width}x{height} px ({image.format}) would be decoded at full size; the limit is "
            f"{MAX_DECODED_PIXELS} px (training.data.MAX_DECODED_PIXELS; only JPEG can be decoded reduced)",
        )


def _ends_early(data: bytes, error: Exception) -> bool:
    """Whether a file that failed to decode is cut short ("truncated") rather than corrupt ("undecodable").

    For JPEG, PNG and GIF the file's own end marker decides: PIL says "truncated" whenever its decoder wanted more
    data, which a corrupt progressive JPEG does too although all its bytes are there. Other formats: PIL's word.
    """
    for magic, has_end_marker in _END_MARKERS.items():
        if data.startswith(magic):
            return not has_end_marker(data.rstrip(b"\0\r\n\t "))  # tolerate padding after the end marker
    return "truncated" in str(error).lower()


# File signature -> whether the (padding-stripped) bytes end with that format's end marker.
_END_MARKERS = {
    b"\xff\xd8\xff": lambda data: data.endswith(b"\xff\xd9"),  # JPEG: EOI marker
    b"\x89PNG\r\n\x1a\n": lambda data: data[-12:-4] == b"\0\0\0\0IEND",  # PNG: empty IEND chunk + CRC
    b"GIF8": lambda data: data.endswith(b";"),  # GIF: trailer byte
}


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
    """The training views (training/views.py) of every usable image of this rank's stream; unusable ones are counted.

    Each example is a dict of the view tensors (`make_views`: "student", "crops", "boxes", "crop_valid" and each
    context teacher's view) plus "skipped", the (len(SKIP_REASONS),) counts of images skipped since the previous
    example of the same worker, and the `POSITION_KEYS` scalars that
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

    def survey(self, max_examples: int | None = None) -> tuple[int, SkipCounter]:
        """(usable images, skips per reason) of this rank's part of the current epoch, decoded here without views.

        For an epoch that gave no batch: skip counts travel with usable images, so a part without any cannot report
        its skips through the loader. Reads up to `max_examples` stream examples (all by default).
        """
        usable, skipped = 0, SkipCounter()
        for value in itertools.islice(self._worker_values(0, 1), max_examples):
            try:
                to_rgb(decode_image(value, self.view_config.source_side))
                usable += 1
            except UnusableImage as unusable:
                skipped.add(unusable.reason)
        return usable, skipped

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
                image = decode_image(value, self.view_config.source_side)
                views = make_views(to_rgb(image), self.view_config, self._rng(worker, index))
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
    view_keys = [key for key in examples[0] if key not in ("skipped", *POSITION_KEYS)]  # make_views' keys
    batch = {key: torch.stack([example[key] for example in examples]) for key in view_keys}
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
