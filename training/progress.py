"""Progress of the distillation run: loss terms, images and skipped images summed over processes at each update,
shown on a tqdm bar, sent to Accelerate's trackers and appended to `RUN_DIR/logs.jsonl` (main process)."""

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from training.views import SKIP_REASONS

LOSS_NAMES = ("content", "context", "total")


class TrainingProgress:
    """Running totals of the run. `add_micro_batch` on every process after each forward; `end_update` (a collective:
    two all-reduces) on every process after each optimizer update; it writes a log record every `logging_steps`.

    Args:
        accelerator: the run's `Accelerator`.
        log_path (`Path`): the JSON-lines log (appended to, so a resumed run continues it).
        total_steps (`int`): optimizer updates of the whole run (for the bar).
        logging_steps (`int`): write a record every this many updates.
        state (`dict`, *optional*): `state_dict()` of a previous run to continue from.
    """

    def __init__(self, accelerator, log_path: Path, total_steps: int, logging_steps: int, state: dict | None = None):
        self.accelerator = accelerator
        self.log_path = Path(log_path)
        self.logging_steps = logging_steps
        state = state or {}
        self.step = state.get("step", 0)
        self.images_seen = state.get("images_seen", 0)
        self.skipped = dict(state.get("skipped", dict.fromkeys(SKIP_REASONS, 0)))
        self.elapsed_before = state.get("elapsed_s", 0.0)
        self.last_losses: dict[str, float] = state.get("final_losses", {})
        self.started = time.monotonic()
        self._reset_window()
        # Losses in float32 and counts in int64: float64 cannot be all-reduced on every accelerator (MPS, XLA).
        self._pending_losses = torch.zeros(len(LOSS_NAMES), dtype=torch.float32)
        self._pending_counts = torch.zeros(2 + len(SKIP_REASONS), dtype=torch.int64)
        if accelerator.is_main_process:
            self._drop_records_after(self.step)
        self.bar = tqdm(
            total=total_steps, initial=self.step, disable=not accelerator.is_main_process, desc="distill", unit="step"
        )

    def _drop_records_after(self, step: int) -> None:
        """A fresh run starts a new log; a resumed one drops what the interrupted run logged after its checkpoint,
        so that each step appears once."""
        if not self.log_path.exists():
            return
        kept = [line for line in self.log_path.read_text().splitlines() if json.loads(line)["step"] <= step]
        self.log_path.write_text("".join(line + "\n" for line in kept))

    def _reset_window(self) -> None:
        self.window_start = time.monotonic()
        self.window_images = 0
        self.window_sums = torch.zeros(len(LOSS_NAMES), dtype=torch.float64)
        self.window_micro_batches = 0

    def add_micro_batch(self, terms: dict[str, torch.Tensor], batch_size: int, skipped: torch.Tensor) -> None:
        """Record one forward pass of this process: its loss terms, images used and images skipped."""
        # One device-to-host copy for all terms, not one sync per `.item()`.
        self._pending_losses += torch.stack([terms[name].detach().float() for name in LOSS_NAMES]).cpu()
        counts = torch.tensor([1, batch_size], dtype=torch.int64)
        self._pending_counts += torch.cat([counts, skipped.cpu().to(torch.int64)])

    def end_update(self, epoch: int, lr: float) -> dict | None:
        """Sum this update's records over processes; returns the log record when one is written."""
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
        self.last_losses = {
            name: float(value) / max(self.window_micro_batches, 1) for name, value in zip(LOSS_NAMES, self.window_sums)
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
            "world_size": self.accelerator.num_processes,
        }
        self._reset_window()
        if self.accelerator.is_main_process:
            with self.log_path.open("a") as log:
                log.write(json.dumps(record) + "\n")
            self.bar.set_postfix(
                content=f"{record['loss/content']:.4f}",
                context=f"{record['loss/context']:.4f}",
                lr=f"{lr:.2e}",
                img_s=f"{record['images_per_s']:.2f}",
                skipped=record["skipped_total"],
            )
        scalars = {key: value for key, value in record.items() if isinstance(value, (int, float))}
        self.accelerator.log(scalars, step=self.step)
        return record

    def flush(self, epoch: int, lr: float) -> dict | None:
        """Write a record for the updates since the last one, if any (at the end of the run)."""
        return self._write_record(epoch, lr) if self.window_micro_batches else None

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
        }

    def close(self) -> None:
        self.bar.close()
