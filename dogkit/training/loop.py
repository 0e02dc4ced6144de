"""One training epoch: forward and backward per batch, an optimizer step per ``accumulate`` batches, and the
device read only once every ``sync_every`` steps, so a GPU is never kept waiting by the host.

The loop sees only what it is handed: ``EpochParts``, the run's collaborators (fixed for the run), and
``EpochStart``, the state it advances; it returns an ``EpochResult`` for the trainer to apply. Nothing here
reads or writes the trainer itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, DistributedSampler

from ..errors import DogkitError
from ..progress import progress_bar
from .averaging import Averager
from .config import TrainConfig
from .device import to_input
from .distributed import Dist, all_gather_objects, all_reduce, all_reduce_tensor
from .loaders import ManifestImages, make_loader
from .optim import apply_freeze

NO_BAD_STEP = torch.iinfo(torch.int64).max


@dataclass(frozen=True)
class EpochParts:
    """What an epoch works with, named: the networks, the optimisation, the data, the device and the process
    group, and the two recovery hooks (``recovery_due()``; ``save_recovery(position, global_step)``)."""

    cfg: TrainConfig
    model: nn.Module  # the plain module: averages are updated from it
    step_model: nn.Module  # what is called: DDP and/or compiled around ``model``
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    use_scaler: bool  # a real fp16 GradScaler, whose skipped steps are no iterate for the averages
    scheduler: LRScheduler
    schedule_when: str  # "step": stepped here after every optimizer step; "plateau": by the trainer
    averager: Averager | None
    train_images: ManifestImages
    workers: int | None
    device: torch.device
    amp_dtype: torch.dtype | None
    dist: Dist
    cuda_graphs: bool
    steps_per_epoch: int
    run_dir: Path  # named when a non-finite loss stops the run
    recovery_due: Callable[[], bool]
    save_recovery: Callable[[dict, int], None]


@dataclass(frozen=True)
class EpochStart:
    """Where the epoch starts: epochs completed, optimizer steps taken, the loader (None: make it) and, when
    resumed from a recovery checkpoint, the position inside the epoch."""

    epoch: int
    global_step: int
    loader: DataLoader | None = None
    position: dict | None = None


@dataclass(frozen=True)
class EpochResult:
    """What the epoch changed: its row of metrics.csv (training side), the steps taken so far and the loader,
    whose persistent workers serve the next epoch."""

    row: dict
    global_step: int
    loader: DataLoader


class EpochStats:
    """Loss sum, correct count and the first non-finite micro-step, kept on the device: reading any of them
    makes the host wait for the GPU, so that happens only in ``first_non_finite``, ``text`` and at the end."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.plain_sum = torch.zeros((), dtype=torch.float64, device=device)  # cross-entropy without smoothing
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad = torch.full((), NO_BAD_STEP, dtype=torch.int64, device=device)  # micro-step, or none
        self.bad_loss = torch.zeros((), dtype=torch.float32, device=device)
        self.seen = 0
        self.wait = 0.0  # seconds spent waiting for the loader
        self.start = time.perf_counter()

    def record(self, micro: int, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        newly_bad = ~torch.isfinite(loss) & (self.first_bad == NO_BAD_STEP)
        self.first_bad = torch.where(newly_bad, micro, self.first_bad)
        self.bad_loss = torch.where(newly_bad, loss, self.bad_loss)
        self.loss_sum += loss.double() * len(labels)
        # The loss against the hard labels, comparable with validation's (label smoothing adds a floor to `loss`).
        self.plain_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        self.correct += (logits.argmax(1) == labels).sum()
        self.seen += len(labels)

    def first_non_finite(self, dist) -> tuple[int, str] | None:
        """(micro-step, loss) of the first non-finite loss on any process, or None."""
        bad = all_reduce_tensor(dist, self.first_bad, op="min") if dist.enabled else self.first_bad
        bad_micro = int(bad)  # the one wait for the device
        if bad_micro == NO_BAD_STEP:
            return None
        mine = int(self.first_bad) == bad_micro
        return bad_micro, f"{float(self.bad_loss)}" if mine else "non-finite (on another process)"

    SUMS = ("loss_sum", "plain_sum", "correct", "seen", "wait")

    def state(self) -> dict:
        """The sums so far, for a recovery checkpoint inside the epoch (a synchronisation: taken only then)."""
        return {"loss_sum": self.loss_sum.cpu(), "plain_sum": self.plain_sum.cpu(), "correct": self.correct.cpu(),
                "first_bad": self.first_bad.cpu(), "bad_loss": self.bad_loss.cpu(), "seen": self.seen,
                "wait": self.wait, "elapsed": time.perf_counter() - self.start}

    def restore(self, state: dict) -> None:
        for key in ("loss_sum", "plain_sum", "correct", "first_bad", "bad_loss"):
            getattr(self, key).copy_(state[key])
        self.seen, self.wait = int(state["seen"]), float(state["wait"])
        self.start = time.perf_counter() - float(state["elapsed"])

    def text(self) -> str:
        return (f"loss {float(self.loss_sum) / max(self.seen, 1):.3f}  "
                f"{self.seen / (time.perf_counter() - self.start):.1f} img/s")


def train_loader(parts: EpochParts, epoch: int) -> DataLoader:
    """The training loader, made once: its persistent workers then serve every epoch."""
    cfg, dist, images = parts.cfg, parts.dist, parts.train_images
    sampler = None
    if dist.enabled:
        sampler = DistributedSampler(images, dist.world, dist.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    # Each rank's augmentation streams get their own seed; all follow from (seed, epoch, rank, batch),
    # so the workers can persist across epochs without changing a pixel.
    return make_loader(
        images, cfg.batch_size, shuffle=sampler is None, workers=parts.workers,
        seed=cfg.seed + 1000 * dist.rank, epoch=epoch, pin_memory=parts.device.type == "cuda",
        drop_last=len(images) > cfg.batch_size, sampler=sampler, persistent=True)


def forward_backward(parts: EpochParts, x, y, micro: int,
                     boundary: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and logits (detached) of one micro-batch, its gradients accumulated; and the labels on the device."""
    cfg, device = parts.cfg, parts.device
    x, y = to_input(x, device, cfg.channels_last), y.to(device, non_blocking=True)
    if parts.cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()
    # Between optimizer steps DDP need not all-reduce gradients: no_sync saves the traffic.
    sync = nullcontext() if boundary or not parts.dist.enabled else parts.step_model.no_sync()
    with sync:
        with torch.autocast(device.type, dtype=parts.amp_dtype, enabled=parts.amp_dtype is not None):
            logits = parts.step_model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        if micro % cfg.accumulate == 0:
            parts.optimizer.zero_grad(set_to_none=True)
        parts.scaler.scale(loss / cfg.accumulate).backward()
    return loss.detach(), logits.detach(), y


def optimizer_step(parts: EpochParts, global_step: int) -> int:
    """One optimizer step, then the averages and a per-step schedule; returns the steps taken, one more."""
    # The fp16 GradScaler skips steps with inf/nan gradients; only there is the scale read (a synchronisation),
    # since a skipped step is no iterate for the averages. bf16 needs none.
    check_skip = parts.use_scaler and parts.averager is not None
    scale_before = parts.scaler.get_scale() if check_skip else None
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    stepped = not check_skip or parts.scaler.get_scale() >= scale_before
    if parts.averager is not None:
        if stepped:
            parts.averager.update(parts.model)
        else:  # no iterate: P's windows reach one step further back
            parts.averager.skip()
    if parts.schedule_when == "step":
        parts.scheduler.step()
    return global_step + 1


def synchronise(parts: EpochParts, stats: EpochStats, bar, epoch: int, start_step: int) -> None:
    """Stop every rank together if any saw a non-finite loss, naming the first one; update the bar."""
    bad = stats.first_non_finite(parts.dist)
    if bad is not None:
        micro, value = bad
        step = micro // parts.cfg.accumulate
        raise DogkitError(
            f"loss became {value} at epoch {epoch + 1}, step {step + 1} (global step "
            f"{start_step + step + 1}); training stopped. The last good checkpoint is kept in "
            f"{parts.run_dir / 'last.pt'}. Lower the learning rate (--lr) or check the data."
        )
    if bar is not None:
        bar.set_text(stats.text())


def resumed_stats(parts: EpochParts, position: dict | None) -> EpochStats:
    """The epoch's sums: zero, or those saved with the recovery checkpoint it resumes from."""
    stats = EpochStats(parts.device)
    if position:
        # Each process's own sums; under another number of processes the first carries all of them.
        states, dist = position["stats"], parts.dist
        if len(states) == dist.world:
            stats.restore(states[dist.rank])
        elif dist.is_main:
            stats.restore({**states[0], **{k: sum(st[k] for st in states) for k in EpochStats.SUMS}})
    return stats


def train_epoch(parts: EpochParts, start: EpochStart) -> EpochResult:
    """One epoch over the training split, from ``start``; returns its row, the steps taken and the loader."""
    cfg, epoch, global_step = parts.cfg, start.epoch, start.global_step
    parts.model.train()
    frozen = apply_freeze(cfg, parts.model, epoch)
    loader = start.loader if start.loader is not None else train_loader(parts, epoch)
    # Resumed from a recovery checkpoint: the epoch goes on from the batch after it, with its sums so far.
    done = start.position["micro"] if start.position else 0
    loader.batch_sampler.set_epoch(epoch, skip=done)
    stats, unsynced = resumed_stats(parts, start.position), 0
    start_step = global_step - done // cfg.accumulate  # the epoch's first step
    title = f"epoch {epoch + 1}/{cfg.epochs}"
    with progress_bar(title, parts.steps_per_epoch) if parts.dist.is_main else nullcontext(None) as bar:
        if bar is not None and done:
            bar.advance(done // cfg.accumulate)
        tick = time.perf_counter()
        for micro, (x, y) in enumerate(loader, start=done):
            if micro >= parts.steps_per_epoch * cfg.accumulate:
                break
            stats.wait += time.perf_counter() - tick
            boundary = (micro + 1) % cfg.accumulate == 0
            stats.record(micro, *forward_backward(parts, x, y, micro, boundary))
            unsynced += 1
            if boundary:
                global_step = optimizer_step(parts, global_step)
                if bar is not None:
                    bar.advance()
                if (global_step - start_step) % cfg.sync_every == 0:
                    synchronise(parts, stats, bar, epoch, start_step)
                    unsynced = 0
                    if parts.recovery_due():
                        parts.save_recovery({"micro": micro + 1,
                                             "stats": all_gather_objects(parts.dist, stats.state())}, global_step)
            tick = time.perf_counter()
        if unsynced:
            synchronise(parts, stats, bar, epoch, start_step)
    return EpochResult(epoch_row(parts, stats, epoch, frozen), global_step, loader)


def epoch_row(parts: EpochParts, stats: EpochStats, epoch: int, frozen: str) -> dict:
    """The epoch's training metrics over every process's images; throughput counts them all."""
    elapsed = time.perf_counter() - stats.start
    loss_sum, plain_sum, correct, seen = all_reduce(parts.dist, [float(stats.loss_sum), float(stats.plain_sum),
                                                                 float(stats.correct), float(stats.seen)])
    return {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
            "train_loss_plain": plain_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1), "lr": parts.optimizer.param_groups[0]["lr"],
            "epoch_time_s": elapsed, "img_per_s": seen / elapsed if elapsed else 0.0,
            "data_wait_share": stats.wait / elapsed if elapsed else 0.0, "trainable": frozen}
