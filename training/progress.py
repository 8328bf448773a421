"""Progress of the distillation run: loss terms, images and skipped images summed over processes at each update,
shown on a tqdm bar, sent to Accelerate's trackers and appended to `RUN_DIR/logs.jsonl` (main process).

`logs.jsonl` holds one JSON object a line, valid for any JSON parser (non-finite numbers are written as the strings
"nan", "inf", "-inf"): update records (`step`, `loss/*`, `lr`, counts) and, at each epoch end, an epoch record
(`"event": "epoch"`) with every process's usable and skipped image counts.
"""

import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from training.checkpointing import write_file_atomically
from training.views import SKIP_REASONS

LOSS_NAMES = ("content", "context", "total")
EPOCH_EVENT = "epoch"
# An epoch is flagged as uneven when one process's usable images (or usable share of the images it read) are below
# this fraction of another's.
UNEVEN_RANK_RATIO = 0.5


def json_safe(value):
    """`value` with non-finite floats as strings ("nan", "inf", "-inf"): JSON has no NaN, and a bare NaN would make
    the log unreadable to strict parsers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def to_json_line(record: dict) -> str:
    return json.dumps(json_safe(record), allow_nan=False) + "\n"


def read_log_records(log_path: Path) -> tuple[list[dict], list[int]]:
    """(records, numbers of the lines that are not JSON objects): a kill mid-write can leave a torn last line."""
    records, torn = [], []
    for number, line in enumerate(Path(log_path).read_text().splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif line.strip():
            torn.append(number)
    return records, torn


class TrainingProgress:
    """Running totals of the run. `add_micro_batch` on every process after each forward; `end_update` (a collective:
    two all-reduces) on every process after each optimizer update; it writes a log record every `logging_steps`.

    Args:
        accelerator: the run's `Accelerator`.
        log_path (`Path`): the JSON-lines log (appended to, so a resumed run continues it).
        total_steps (`int`): optimizer updates of the whole run (for the bar).
        logging_steps (`int`): write a record every this many updates.
        state (`dict`, *optional*): `state_dict()` of a previous run to continue from.
        loss_names (`tuple[str]`, *optional*, defaults to `LOSS_NAMES`): the loss terms to record (the loss's
            `term_names`: no context term without a VFM, one term per teacher of an ensemble).
    """

    def __init__(self, accelerator, log_path: Path, total_steps: int, logging_steps: int, state: dict | None = None,
                 loss_names: tuple[str, ...] = LOSS_NAMES):
        self.accelerator = accelerator
        self.loss_names = tuple(loss_names)
        self.log_path = Path(log_path)
        self.logging_steps = logging_steps
        state = state or {}
        self.step = state.get("step", 0)
        self.images_seen = state.get("images_seen", 0)
        self.skipped = dict(state.get("skipped", dict.fromkeys(SKIP_REASONS, 0)))
        self.elapsed_before = state.get("elapsed_s", 0.0)
        self.last_losses: dict[str, float] = state.get("final_losses", {})
        self.nonfinite_updates = state.get("nonfinite_updates", 0)
        self.started = time.monotonic()
        self._reset_window()
        # Losses in float32 and counts in int64: float64 cannot be all-reduced on every accelerator (MPS, XLA).
        # Counts: finite micro-batches, images, then one per skip reason.
        self._pending_losses = torch.zeros(len(self.loss_names), dtype=torch.float32)
        self._pending_counts = torch.zeros(2 + len(SKIP_REASONS), dtype=torch.int64)
        self.epoch_images = EpochImageCounts()
        if accelerator.is_main_process:
            self._drop_records_after(self.step)
        self.bar = tqdm(
            total=total_steps, initial=self.step, disable=not accelerator.is_main_process, desc="distill", unit="step"
        )

    def _drop_records_after(self, step: int) -> None:
        """A fresh run starts a new log; a resumed one drops what the interrupted run logged after its checkpoint,
        so that each step appears once (event records of the checkpoint's step too: they were written after it).
        Lines that are not JSON (torn by a kill mid-write) are dropped with a warning."""
        if not self.log_path.exists():
            return
        records, torn = read_log_records(self.log_path)
        if torn:
            print(f"Warning: dropped {len(torn)} unreadable line(s) of {self.log_path} (line(s) "
                  f"{', '.join(map(str, torn))}), most likely torn by a kill while it was written.", file=sys.stderr)
        kept = [record for record in records if _kept_after_resume(record, step)]
        write_file_atomically(self.log_path, "".join(to_json_line(record) for record in kept))

    def _reset_window(self) -> None:
        self.window_start = time.monotonic()
        self.window_images = 0
        self.window_sums = torch.zeros(len(self.loss_names), dtype=torch.float64)
        self.window_micro_batches = 0

    def add_micro_batch(self, terms: dict[str, torch.Tensor], batch_size: int, skipped: torch.Tensor,
                        finite: bool = True) -> None:
        """Record one forward pass of this process: its loss terms (left out of the averages when not `finite`),
        images used and images skipped."""
        if finite:
            # One device-to-host copy for all terms, not one sync per `.item()`.
            self._pending_losses += torch.stack([terms[name].detach().float() for name in self.loss_names]).cpu()
        counts = torch.tensor([int(finite), batch_size], dtype=torch.int64)
        self._pending_counts += torch.cat([counts, skipped.cpu().to(torch.int64)])
        self.epoch_images.add(batch_size, int(skipped.sum()))

    def end_update(self, epoch: int, lr: float, skipped_update: bool = False) -> dict | None:
        """Sum this update's records over processes; returns the log record when one is written.
        `skipped_update`: the optimizer step was skipped for a non-finite loss (`--on_nonfinite skip`)."""
        self.nonfinite_updates += int(skipped_update)
        device = self.accelerator.device
        loss_sums = self.accelerator.reduce(self._pending_losses.to(device), reduction="sum").cpu()
        counts = self.accelerator.reduce(self._pending_counts.to(device), reduction="sum").cpu().tolist()
        self._pending_losses = torch.zeros_like(self._pending_losses)  # fresh: the sums above may alias them
        self._pending_counts = torch.zeros_like(self._pending_counts)
        (micro_batches, images), skipped = counts[:2], counts[2:]
        self.step += 1
        self.images_seen += int(images)
        for reason, count in zip(SKIP_REASONS, skipped):
            self.skipped[reason] += int(count)
        self.window_sums += loss_sums
        self.window_micro_batches += int(micro_batches)
        self.window_images += int(images)
        self.bar.update(1)
        if self.step % self.logging_steps:
            return None
        return self._write_record(epoch, lr)

    def _write_record(self, epoch: int, lr: float) -> dict:
        elapsed = time.monotonic() - self.window_start
        # No finite micro-batch in the window (all skipped as non-finite): no average to report.
        self.last_losses = {
            name: float(value) / self.window_micro_batches if self.window_micro_batches else None
            for name, value in zip(self.loss_names, self.window_sums)
        }
        record = {
            "step": self.step,
            "epoch": epoch,
            "lr": lr,
            **{f"loss/{name}": value for name, value in self.last_losses.items()},
            "images_seen": self.images_seen,
            "images_per_s": self.window_images / max(elapsed, 1e-9),
            "skipped": dict(self.skipped),
            "skipped_total": sum(self.skipped.values()),
            "nonfinite_updates": self.nonfinite_updates,
            "world_size": self.accelerator.num_processes,
        }
        self._reset_window()
        if self.accelerator.is_main_process:
            self._append(record)
            self.bar.set_postfix(
                **{name: _short(record[f"loss/{name}"]) for name in ("content", "context") if name in self.loss_names},
                lr=f"{lr:.2e}",
                img_s=f"{record['images_per_s']:.2f}",
                skipped=record["skipped_total"],
            )
        scalars = {key: value for key, value in record.items() if isinstance(value, (int, float))}
        self.accelerator.log(scalars, step=self.step)
        return record

    def _append(self, record: dict) -> None:
        with self.log_path.open("a") as log:
            log.write(to_json_line(record))  # one write per line: a kill tears at most the last line

    def flush(self, epoch: int, lr: float) -> dict | None:
        """Write a record for the updates since the last one, if any (at the end of the run)."""
        return self._write_record(epoch, lr) if self.window_images else None

    def log_event(self, event: str, **fields) -> dict:
        """Append a `{"event": event, "step": ..., **fields}` record (main process), e.g. why a run stopped."""
        record = {"event": event, "step": self.step, **fields}
        if self.accelerator.is_main_process:
            self._append(record)
        return record

    def end_epoch(self, epoch: int, ran_out: bool, ended_by: str) -> dict:
        """Log every process's usable/skipped images of `epoch` (a collective); warn when they differ a lot.
        `ran_out`: this process's data ended the epoch; `ended_by`: "data" or "max_steps"."""
        per_rank = self.epoch_images.gather(self.accelerator, ran_out)
        record = {"event": EPOCH_EVENT, "step": self.step, "epoch": epoch, "ended_by": ended_by, **per_rank}
        warning = uneven_ranks_warning(record)
        if warning:
            record["warning"] = warning
        if self.accelerator.is_main_process:
            self._append(record)
            if warning:
                tqdm.write(f"Warning: {warning}", file=sys.stderr)
        self.epoch_images = EpochImageCounts()
        return record

    @property
    def elapsed_s(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "images_seen": self.images_seen,
            "skipped": dict(self.skipped),
            "final_losses": dict(self.last_losses),
            "elapsed_s": self.elapsed_s,
            "nonfinite_updates": self.nonfinite_updates,
        }

    def close(self) -> None:
        self.bar.close()


# Events written before the checkpoint of their step (so a resume from that checkpoint keeps them): evaluations run
# before the update's checkpoint is saved.
EVENTS_BEFORE_CHECKPOINT = ("eval",)


def _kept_after_resume(record: dict, step: int) -> bool:
    written_after_checkpoint = "event" in record and record["event"] not in EVENTS_BEFORE_CHECKPOINT
    last_kept = step - 1 if written_after_checkpoint else step
    return isinstance(record.get("step"), int) and record["step"] <= last_kept


def _short(value) -> str:
    return "-" if value is None else f"{value:.4f}"


class EpochImageCounts:
    """This process's usable (trained on) and skipped images in the current epoch; part of its data position in a
    checkpoint (`state_dict`), so that a resumed epoch still reports whole-epoch counts."""

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.usable = state.get("usable", 0)
        self.skipped = state.get("skipped", 0)

    def add(self, usable: int, skipped: int) -> None:
        self.usable += usable
        self.skipped += skipped

    def state_dict(self) -> dict:
        return {"usable": self.usable, "skipped": self.skipped}

    def gather(self, accelerator, ran_out: bool) -> dict:
        mine = torch.tensor([[self.usable, self.skipped, int(ran_out)]], dtype=torch.int64, device=accelerator.device)
        usable, skipped, ran_out_flags = accelerator.gather(mine).cpu().T.tolist()  # (world, 3) -> 3 lists
        return {"usable_per_rank": usable, "skipped_per_rank": skipped,
                "ran_out_per_rank": [bool(flag) for flag in ran_out_flags]}


def uneven_ranks_warning(record: dict) -> str | None:
    """A sentence naming the processes whose usable images are far fewer (in count, or as a share of the images
    they read) than another's; None when the processes are even enough."""
    usable, skipped = record["usable_per_rank"], record["skipped_per_rank"]
    shares = [used / max(used + skip, 1) for used, skip in zip(usable, skipped)]
    low_count = min(usable) < UNEVEN_RANK_RATIO * max(usable)
    low_share = min(shares) < UNEVEN_RANK_RATIO * max(shares)
    if len(usable) < 2 or not (low_count or low_share):
        return None
    ranks = ", ".join(f"rank {rank}: {used} usable of {used + skip} read" for rank, (used, skip) in
                      enumerate(zip(usable, skipped)))
    return (f"epoch {record['epoch']}: the processes' data is uneven ({ranks}). Every process stops the epoch when "
            f"one runs out, so the others' remaining images go unused and the process with few usable images "
            f"repeats them each epoch. Spread the unusable images evenly over the shards (or remove them), or use "
            f"fewer processes.")
