"""One training epoch: forward and backward per batch, an optimizer step per ``accumulate`` batches, and the
device read only once every ``sync_every`` steps, so a GPU is never kept waiting by the host."""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from ..errors import DogkitError
from ..progress import progress_bar
from .device import to_input
from .distributed import all_gather_objects, all_reduce, all_reduce_tensor
from .loaders import make_loader
from .optim import apply_freeze

NO_BAD_STEP = torch.iinfo(torch.int64).max


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


def train_loader(trainer):
    """The training loader, made once: its persistent workers then serve every epoch."""
    cfg, dist = trainer.cfg, trainer.dist
    sampler = None
    if dist.enabled:
        sampler = DistributedSampler(trainer.train_images, dist.world, dist.rank, shuffle=True, seed=cfg.seed,
                                     drop_last=True)
    # Each rank's augmentation streams get their own seed; all follow from (seed, epoch, rank, batch),
    # so the workers can persist across epochs without changing a pixel.
    return make_loader(
        trainer.train_images, cfg.batch_size, shuffle=sampler is None, workers=trainer.workers,
        seed=cfg.seed + 1000 * dist.rank, epoch=trainer.epoch, pin_memory=trainer.device.type == "cuda",
        drop_last=len(trainer.train_images) > cfg.batch_size, sampler=sampler, persistent=True)


def forward_backward(trainer, x, y, micro: int, boundary: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and logits (detached) of one micro-batch, its gradients accumulated; and the labels on the device."""
    cfg, device = trainer.cfg, trainer.device
    x, y = to_input(x, device, cfg.channels_last), y.to(device, non_blocking=True)
    if trainer.cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()
    # Between optimizer steps DDP need not all-reduce gradients: no_sync saves the traffic.
    sync = nullcontext() if boundary or not trainer.dist.enabled else trainer.step_model.no_sync()
    with sync:
        with torch.autocast(device.type, dtype=trainer.amp_dtype, enabled=trainer.amp_dtype is not None):
            logits = trainer.step_model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        if micro % cfg.accumulate == 0:
            trainer.optimizer.zero_grad(set_to_none=True)
        trainer.scaler.scale(loss / cfg.accumulate).backward()
    return loss.detach(), logits.detach(), y


def optimizer_step(trainer) -> None:
    """One optimizer step, then the averages and a per-step schedule."""
    # The fp16 GradScaler skips steps with inf/nan gradients; only there is the scale read (a synchronisation),
    # since a skipped step is no iterate for the averages. bf16 needs none.
    check_skip = trainer.use_scaler and trainer.averager is not None
    scale_before = trainer.scaler.get_scale() if check_skip else None
    trainer.scaler.step(trainer.optimizer)
    trainer.scaler.update()
    stepped = not check_skip or trainer.scaler.get_scale() >= scale_before
    if trainer.averager is not None:
        if stepped:
            trainer.averager.update(trainer.model)
        else:  # no iterate: P's windows reach one step further back
            trainer.averager.skip(trainer.model)
    if trainer.schedule_when == "step":
        trainer.scheduler.step()
    trainer.global_step += 1


def synchronise(trainer, stats: EpochStats, bar, start_step: int) -> None:
    """Stop every rank together if any saw a non-finite loss, naming the first one; update the bar."""
    bad = stats.first_non_finite(trainer.dist)
    if bad is not None:
        micro, value = bad
        step = micro // trainer.cfg.accumulate
        raise DogkitError(
            f"loss became {value} at epoch {trainer.epoch + 1}, step {step + 1} (global step "
            f"{start_step + step + 1}); training stopped. The last good checkpoint is kept in "
            f"{trainer.run_dir / 'last.pt'}. Lower the learning rate (--lr) or check the data."
        )
    if bar is not None:
        bar.set_text(stats.text())


def train_epoch(trainer) -> dict:
    """One epoch over the training split; returns its row of metrics.csv (training side)."""
    cfg = trainer.cfg
    trainer.model.train()
    frozen = apply_freeze(cfg, trainer.model, trainer.epoch)
    if trainer.train_loader is None:
        trainer.train_loader = train_loader(trainer)
    # Resumed from a recovery checkpoint: the epoch goes on from the batch after it, with its sums so far.
    position, trainer.resume_position = trainer.resume_position, None
    done = position["micro"] if position else 0
    trainer.train_loader.batch_sampler.set_epoch(trainer.epoch, skip=done)
    stats, unsynced = EpochStats(trainer.device), 0
    if position:
        # Each process's own sums; under another number of processes the first carries all of them.
        states = position["stats"]
        if len(states) == trainer.dist.world:
            stats.restore(states[trainer.dist.rank])
        elif trainer.dist.is_main:
            stats.restore({**states[0], **{k: sum(st[k] for st in states) for k in EpochStats.SUMS}})
    start_step = trainer.global_step - done // cfg.accumulate  # the epoch's first step
    title = f"epoch {trainer.epoch + 1}/{cfg.epochs}"
    with progress_bar(title, trainer.steps_per_epoch) if trainer.dist.is_main else nullcontext(None) as bar:
        if bar is not None and done:
            bar.advance(done // cfg.accumulate)
        tick = time.perf_counter()
        for micro, (x, y) in enumerate(trainer.train_loader, start=done):
            if micro >= trainer.steps_per_epoch * cfg.accumulate:
                break
            stats.wait += time.perf_counter() - tick
            boundary = (micro + 1) % cfg.accumulate == 0
            stats.record(micro, *forward_backward(trainer, x, y, micro, boundary))
            unsynced += 1
            if boundary:
                optimizer_step(trainer)
                if bar is not None:
                    bar.advance()
                if (trainer.global_step - start_step) % cfg.sync_every == 0:
                    synchronise(trainer, stats, bar, start_step)
                    unsynced = 0
                    if trainer.recovery_due():
                        trainer.save_recovery({"micro": micro + 1,
                                               "stats": all_gather_objects(trainer.dist, stats.state())})
            tick = time.perf_counter()
        if unsynced:
            synchronise(trainer, stats, bar, start_step)
    return epoch_row(trainer, stats, frozen)


def epoch_row(trainer, stats: EpochStats, frozen: str) -> dict:
    """The epoch's training metrics over every process's images; throughput counts them all."""
    elapsed = time.perf_counter() - stats.start
    loss_sum, plain_sum, correct, seen = all_reduce(trainer.dist, [float(stats.loss_sum), float(stats.plain_sum),
                                                                   float(stats.correct), float(stats.seen)])
    return {"epoch": trainer.epoch + 1, "train_loss": loss_sum / max(seen, 1),
            "train_loss_plain": plain_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1), "lr": trainer.optimizer.param_groups[0]["lr"],
            "epoch_time_s": elapsed, "img_per_s": seen / elapsed if elapsed else 0.0,
            "data_wait_share": stats.wait / elapsed if elapsed else 0.0, "trainable": frozen}
