"""``dogkit train``: one run of one regime, resumable, observable, with everything in its run folder.

``artifacts/runs/<name>/`` holds ``config.json`` (the resolved config), ``environment.json``,
``metrics.csv`` (one row per epoch), ``last.pt`` and ``best.pt`` (atomic), and at the end
``test_metrics.json`` for the best model (regime 2: also the raw iterate and every average).
"""

from __future__ import annotations

import io
import json
import math
import platform
import random
import subprocess
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.markup import escape
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from .. import __version__
from ..analysis.metrics import classification_metrics
from ..atomic import atomic_write_bytes, atomic_write_csv, atomic_write_text
from ..data.dataset import Dataset, load_dataset
from ..deploy.preprocess import PreprocessSpec
from ..errors import DogkitError
from ..progress import console, progress_bar
from ..runs import run_lock
from ..system import available_cpus
from .averaging import Averager, frozen_batchnorm, prepare_for_eval
from .checkpoint import check_compatible, load_checkpoint, save_checkpoint
from .config import TrainConfig, load_config
from .device import autocast_dtype, compile_settings, resolve_device, to_input
from .distributed import (
    Dist,
    all_gather_objects,
    all_reduce,
    all_reduce_tensor,
    barrier,
    broadcast_buffers,
    broadcast_object,
    init_distributed,
    shutdown,
)
from .evaluation import bn_batches, predict_logits
from .loaders import AugmentFn, EvalFn, ManifestImages, find_cache, make_loader, train_augment
from .models import Classifier, build_model, head_name

METRIC_KEYS = ("loss", "accuracy", "top5", "precision_macro", "recall_macro", "f1_macro")


@dataclass
class RunResult:
    run_dir: Path
    finished: bool
    epochs_done: int
    best: dict = field(default_factory=dict)
    test: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- device and precision


# ----------------------------------------------------------------------------- optimisation


def build_optimizer(cfg: TrainConfig, model: nn.Module, capturable: bool = False) -> torch.optim.Optimizer:
    params = model.parameters()
    adam = {"capturable": True} if capturable else {}
    if cfg.optimizer in ("adam", "averaged-adam"):
        # Averaged Adam is plain Adam (betas 0.9/0.999, eps 1e-8); the averaging lives in Averager.
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **adam)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **adam)
    if cfg.optimizer == "adamax":
        return torch.optim.Adamax(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)


def build_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """Returns (scheduler, when): when is 'step', 'epoch' or 'plateau' (epoch, fed the validation loss)."""
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=cfg.gamma, patience=2), "plateau"
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma), "epoch"
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    total = max(cfg.epochs * steps_per_epoch, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine to 1% of the peak

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "step"


def stages(net: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(stem, body stages) of a torchvision network, head excluded: the top-level children with weights."""
    head_top = head_name(net).split(".")[0]
    children = [(n, m) for n, m in net.named_children() if n != head_top and any(True for _ in m.parameters())]
    stem_names = {"conv1", "bn1"} if hasattr(net, "conv1") else {children[0][0]} if children else set()
    stem = [m for n, m in children if n in stem_names]
    body = [m for n, m in children if n not in stem_names]
    return stem, body


def apply_freeze(cfg: TrainConfig, model: Classifier, epoch: int) -> str:
    """Set requires_grad and BatchNorm mode for this epoch; returns a short description ('all layers' when
    nothing is frozen)."""
    net = model.net
    stem, body = stages(net)
    if cfg.freeze == "none":
        trainable = None
    elif cfg.freeze == "linear-probe":
        trainable = [] if epoch < cfg.probe_epochs else None
    else:  # gradual: head first, then one more stage from the top each epoch; the stem stays frozen
        trainable = body[len(body) - epoch:] if epoch > 0 else []
    if trainable is None:
        for p in net.parameters():
            p.requires_grad_(True)
        return "all layers"
    for p in net.parameters():
        p.requires_grad_(False)
    for m in [*trainable, net.get_submodule(head_name(net))]:
        for p in m.parameters():
            p.requires_grad_(True)
    for m in [*stem, *(b for b in body if b not in trainable)]:
        m.eval()  # frozen layers keep their BatchNorm statistics
    return f"head + {len(trainable)} of {len(body)} stages"


# ----------------------------------------------------------------------------- evaluation


# ----------------------------------------------------------------------------- run folder


def environment(cfg: TrainConfig, dataset: Dataset, device: torch.device, parameters: int) -> dict:
    import albumentations
    import cv2
    import torchvision

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "dogkit": __version__, "git_commit": commit, "python": platform.python_version(),
        "platform": platform.platform(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "albumentations": albumentations.__version__, "opencv": cv2.__version__, "numpy": np.__version__,
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpus": available_cpus(), "torch_threads": torch.get_num_threads(),
        "dataset": str(dataset.root.resolve()), "manifest_sha256": dataset.info.get("manifest_sha256"),
        "parameters": parameters,
    }


def new_run_dir(cfg: TrainConfig) -> Path:
    """artifacts/runs/<name>, or <name>-2, -3 … when taken (a finished or different run is never overwritten)."""
    base = cfg.name or (f"exp{cfg.exp}-{cfg.arch}" if cfg.exp else cfg.arch)
    runs = Path(cfg.runs_dir)
    candidate, k = runs / base, 2
    while candidate.exists():
        candidate, k = runs / f"{base}-{k}", k + 1
    return candidate


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    cells = ([f"{v:.6g}" if isinstance(v, float) else v for v in (row.get(k, "") for k in keys)] for row in history)
    atomic_write_csv(path, keys, cells)


def rng_state() -> dict:
    """Every random stream the run draws from, in a form ``torch.load(weights_only=True)`` accepts.

    All of each generator's state is kept, position and cached Gaussian included: without them a
    resumed run draws different numbers from the uninterrupted one.
    """
    _, mt, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(mt), "python_gauss": gauss_next,
             "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
             "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    # Checkpoints from before the position was kept restore the keys with a fresh position, as they did.
    random.setstate((3, tuple(int(v) for v in state["python"]), state.get("python_gauss")))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state.get("numpy_pos", 624)),
                         int(state.get("numpy_has_gauss", 0)), float(state.get("numpy_gauss", 0.0))))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_better(value: float, best: float | None, monitor: str) -> bool:
    if best is None:
        return True
    return value < best if monitor == "loss" else value > best


# ----------------------------------------------------------------------------- the run


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path, *, init_weights: bool = True):
        """``init_weights=False`` skips loading pretrained weights: a resumed run takes them from last.pt."""
        self.cfg = cfg
        self.run_dir = run_dir
        self.dataset = load_dataset(cfg.data)
        self.crop = cfg.crop or self.dataset.crop
        self.spec = PreprocessSpec.for_size(cfg.image_size, box_crop=self.crop)
        self.device = resolve_device(cfg.device)
        self.dist: Dist = init_distributed(self.device.type == "cuda")
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.amp_dtype = autocast_dtype(cfg.amp, self.device)
        torch.manual_seed(cfg.seed + self.dist.rank)  # per-rank streams (dropout); the weights come from rank 0
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        classes = self.dataset.class_names
        self.model = build_model(cfg.arch, len(classes), spec=self.spec,
                                 pretrained=init_weights and cfg.pretrained and not cfg.weights,
                                 weights=cfg.weights if init_weights else None,
                                 dropout=cfg.dropout).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.step_model: nn.Module = self.model
        if self.dist.enabled:
            if cfg.sync_bn:
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            # DDP broadcasts rank 0's weights and all-reduces gradients; the averages and checkpoints keep
            # using the plain module, which is identical on every rank.
            self.step_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        mode, capturable = compile_settings(cfg, self.device)
        self.cuda_graphs = capturable  # each step then starts a new CUDA-graph generation
        if cfg.compile:
            if mode != cfg.compile_mode:
                self.log(f"compile_mode={cfg.compile_mode} captures CUDA graphs, which need a GPU; "
                         f"compiling in {mode} mode on {self.device}")
            self.step_model = torch.compile(self.step_model, mode=mode)
        self.optimizer = build_optimizer(cfg, self.model, capturable=capturable)
        self.use_scaler = self.amp_dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_scaler)
        self.workers = cfg.workers if cfg.workers is not None else (1 if self.device.type == "cpu" else None)
        train_records = self.dataset.split("train")
        if not train_records or not self.dataset.split("val"):
            raise DogkitError(f"{self.dataset.root} has no train or val images; run `dogkit prepare` again")
        cache = find_cache(self.dataset, self.crop, cfg.image_size) if cfg.cache else None
        augment = AugmentFn(train_augment(self.spec, cfg.augment))
        self.train_images = ManifestImages(self.dataset, train_records, augment, self.crop, cache)
        self.train_loader = None  # made at the first epoch; its workers then serve every epoch
        # Optimizer steps per epoch: each takes `accumulate` micro-batches on every process.
        self.steps_per_epoch = len(train_records) // (cfg.batch_size * cfg.accumulate * self.dist.world) or 1
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        self.scheduler, self.schedule_when = build_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        # Averages are built from the uncompiled module and updated after every optimizer step; knowing the
        # run's length, the last P window ends on its last step.
        self.averager = (Averager(self.model, cfg.avg_window, cfg.avg_ema, total_steps=self.steps_per_epoch
                                  * cfg.epochs) if cfg.optimizer == "averaged-adam" else None)
        self.epoch = 0  # epochs completed
        self.global_step = 0
        self.history: list[dict] = []
        self.best: dict = {}
        self.bad_epochs = 0
        self.finished = False
        self.tensorboard = None

    # -- loaders
    def eval_loader(self, split: str):
        """This process's share of a split: every image exactly once across processes, no padding."""
        records = self.dataset.split(split)[self.dist.rank:: self.dist.world]
        images = ManifestImages(self.dataset, records, EvalFn(self.spec), self.crop)
        return make_loader(images, self.cfg.batch_size, shuffle=False, workers=self.workers,
                           pin_memory=self.device.type == "cuda")

    def eval_logits(self, net: nn.Module, loader, amp_dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and labels of the whole split, in manifest order, on every process."""
        logits, labels = predict_logits(net, loader, self.device, amp_dtype, self.cfg.channels_last)
        if not self.dist.enabled:
            return logits, labels
        parts = all_gather_objects(self.dist, (logits.numpy(), labels.numpy()))
        n = sum(len(p[1]) for p in parts)
        all_logits = np.empty((n, logits.shape[1]), np.float32)
        all_labels = np.empty(n, np.int64)
        for rank, (lg, lb) in enumerate(parts):  # rank r holds records r, r + world, r + 2·world, …
            all_logits[rank:: self.dist.world] = lg
            all_labels[rank:: self.dist.world] = lb
        return torch.from_numpy(all_logits), torch.from_numpy(all_labels)

    def evaluate(self, net: nn.Module, loader, amp_dtype) -> dict[str, float]:
        logits, labels = self.eval_logits(net, loader, amp_dtype)
        return {"loss": float(F.cross_entropy(logits, labels)),
                **classification_metrics(labels.numpy(), logits.numpy())}

    def log(self, message: str) -> None:
        if self.dist.is_main:
            console.print(message)

    def bn_loader(self):
        """Training images through the eval transform, a fixed subset: the averages' BatchNorm statistics."""
        records = self.dataset.split("train")
        order = np.random.default_rng(self.cfg.seed).permutation(len(records))[: self.cfg.avg_bn_images]
        # Every process uses the same images, so the averages' statistics stay identical on every rank.
        images = ManifestImages(self.dataset, [records[i] for i in sorted(order)], EvalFn(self.spec), self.crop)
        return make_loader(images, self.cfg.batch_size, shuffle=False, workers=self.workers)

    # -- checkpoints
    def header(self) -> dict:
        """What every checkpoint says about itself: enough to rebuild, check and deploy the network."""
        return {"format": 1, "arch": self.cfg.arch, "num_classes": len(self.dataset.classes),
                "class_names": self.dataset.class_names, "preprocess": json.loads(self.spec.to_json()),
                "config": self.cfg.to_dict(), "epoch": self.epoch}

    def state(self) -> dict:
        return {
            **self.header(), "global_step": self.global_step, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "averager": self.averager.state_dict() if self.averager else None,
            "history": self.history, "best": self.best, "bad_epochs": self.bad_epochs,
            "finished": self.finished, "rng": all_gather_objects(self.dist, rng_state()),
        }

    def restore(self, ckpt: dict, path: Path) -> None:
        check_compatible(ckpt, self.cfg.arch, len(self.dataset.classes), path)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.averager is not None:
            try:
                self.averager.load_state_dict(ckpt["averager"])
            except (ValueError, KeyError) as e:
                raise DogkitError(f"cannot resume the averages in {path}: {e}; start a new run") from e
        self.epoch, self.global_step = ckpt["epoch"], ckpt["global_step"]
        self.history, self.best, self.bad_epochs = ckpt["history"], ckpt["best"], ckpt["bad_epochs"]
        self.finished = ckpt["finished"]
        states = ckpt["rng"]
        if len(states) == self.dist.world:  # the same number of processes: each resumes its own streams
            set_rng_state(states[self.dist.rank])

    def save_best(self, variant: str, net: nn.Module, metrics: dict) -> None:
        if not self.dist.is_main:
            return
        state = {**self.header(), "variant": variant, "val_metrics": metrics,
                 "model": {k: v.detach().cpu() for k, v in net.state_dict().items()}}
        save_checkpoint(state, self.run_dir / "best.pt")

    # -- one epoch
    def train_epoch(self) -> dict:
        cfg, device = self.cfg, self.device
        epoch = self.epoch
        self.model.train()
        frozen = apply_freeze(cfg, self.model, epoch)
        if self.train_loader is None:
            sampler = None
            if self.dist.enabled:
                sampler = DistributedSampler(self.train_images, self.dist.world, self.dist.rank, shuffle=True,
                                             seed=cfg.seed, drop_last=True)
            # Each rank's augmentation streams get their own seed; all follow from (seed, epoch, rank, batch),
            # so the workers can persist across epochs without changing a pixel.
            self.train_loader = make_loader(
                self.train_images, cfg.batch_size, shuffle=sampler is None, workers=self.workers,
                seed=cfg.seed + 1000 * self.dist.rank, epoch=epoch, pin_memory=device.type == "cuda",
                drop_last=len(self.train_images) > cfg.batch_size, sampler=sampler, persistent=True)
        loader = self.train_loader
        loader.batch_sampler.set_epoch(epoch)
        # Loss sum, correct count and the first non-finite micro-step stay on the device: reading any of
        # them makes the host wait for the GPU, so that happens once every `sync_every` optimizer steps.
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        no_bad = torch.iinfo(torch.int64).max
        first_bad = torch.full((), no_bad, dtype=torch.int64, device=device)  # micro-step index, or no_bad
        bad_loss = torch.zeros((), dtype=torch.float32, device=device)
        seen, wait, start_step, unsynced = 0, 0.0, self.global_step, 0
        micro_steps = self.steps_per_epoch * cfg.accumulate
        start = time.perf_counter()
        bar_cm = progress_bar(f"epoch {epoch + 1}/{cfg.epochs}", self.steps_per_epoch) if self.dist.is_main \
            else nullcontext(None)

        def synchronise() -> None:
            """Stop every rank together if any saw a non-finite loss, naming the first one; update the bar."""
            nonlocal unsynced
            unsynced = 0
            bad = all_reduce_tensor(self.dist, first_bad, op="min") if self.dist.enabled else first_bad
            bad_micro = int(bad)  # the one wait for the device
            if bad_micro != no_bad:
                value = f"{float(bad_loss)}" if int(first_bad) == bad_micro else "non-finite (on another process)"
                step = bad_micro // cfg.accumulate
                raise DogkitError(
                    f"loss became {value} at epoch {epoch + 1}, step {step + 1} (global step "
                    f"{start_step + step + 1}); training stopped. The last good checkpoint is kept in "
                    f"{self.run_dir / 'last.pt'}. Lower the learning rate (--lr) or check the data."
                )
            if bar is not None:
                bar.set_text(f"loss {float(loss_sum) / max(seen, 1):.3f}  "
                             f"{seen / (time.perf_counter() - start):.1f} img/s")

        with bar_cm as bar:
            tick = time.perf_counter()
            for micro, (x, y) in enumerate(loader):
                if micro >= micro_steps:
                    break
                wait += time.perf_counter() - tick
                boundary = (micro + 1) % cfg.accumulate == 0
                x, y = to_input(x, device, cfg.channels_last), y.to(device, non_blocking=True)
                if self.cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                # Between optimizer steps DDP need not all-reduce gradients: no_sync saves the traffic.
                sync = nullcontext() if boundary or not self.dist.enabled else self.step_model.no_sync()
                with sync:
                    with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                        logits = self.step_model(x)
                        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                    if micro % cfg.accumulate == 0:
                        self.optimizer.zero_grad(set_to_none=True)
                    self.scaler.scale(loss / cfg.accumulate).backward()
                loss = loss.detach()
                newly_bad = ~torch.isfinite(loss) & (first_bad == no_bad)
                first_bad = torch.where(newly_bad, micro, first_bad)
                bad_loss = torch.where(newly_bad, loss, bad_loss)
                loss_sum += loss.double() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(y)
                unsynced += 1
                if boundary:
                    # The fp16 GradScaler skips steps with inf/nan gradients; only there is the scale read
                    # (a synchronisation), since a skipped step is no iterate for the averages. bf16 needs none.
                    check_skip = self.use_scaler and self.averager is not None
                    scale_before = self.scaler.get_scale() if check_skip else None
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    stepped = not check_skip or self.scaler.get_scale() >= scale_before
                    if self.averager is not None and stepped:
                        self.averager.update(self.model)
                    if self.schedule_when == "step":
                        self.scheduler.step()
                    self.global_step += 1
                    if bar is not None:
                        bar.advance()
                    if (self.global_step - start_step) % cfg.sync_every == 0:
                        synchronise()
                tick = time.perf_counter()
            if unsynced:
                synchronise()
        elapsed = time.perf_counter() - start
        # Training metrics over every process's images; throughput counts them all.
        total_loss, correct, seen = all_reduce(self.dist, [float(loss_sum), float(correct), float(seen)])
        return {"epoch": epoch + 1, "train_loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1),
                "lr": self.optimizer.param_groups[0]["lr"], "epoch_time_s": elapsed,
                "img_per_s": seen / elapsed if elapsed else 0.0, "data_wait_share": wait / elapsed if elapsed else 0.0,
                "trainable": frozen}

    def variants(self):
        """(name, network ready for evaluation): the raw iterate, and each average with fresh BN statistics.

        P is left out until its first block of M steps completes. Under a freeze schedule the BatchNorm
        layers still frozen keep their (never changed) statistics; every other one is recomputed.
        """
        yield "raw", self.model
        if self.averager is None:
            return
        bn_loader = self.bn_loader()
        frozen = frozen_batchnorm(self.model)
        for name in self.averager.ready():
            net = self.averager.model(name)
            prepare_for_eval(net, bn_batches(bn_loader, self.device, self.cfg.channels_last), self.device,
                             frozen=frozen)
            yield name, net

    def validate(self, row: dict) -> dict:
        val_loader = self.eval_loader("val")
        broadcast_buffers(self.dist, self.model)  # every rank evaluates (and rank 0 saves) the same network
        candidates = {}
        for name, net in self.variants():
            metrics = self.evaluate(net, val_loader, self.amp_dtype)
            prefix = "val" if name == "raw" else f"{name}_val"
            row.update({f"{prefix}_{k}": metrics[k] for k in METRIC_KEYS})
            candidates[name] = (net, metrics)
        if self.averager is not None:
            # Which iterates the evaluated P averages; blank (and P's metrics NaN) before its first block.
            first, last = self.averager.p_range or ("", "")
            row.update({"P_first_step": first, "P_last_step": last})
            if self.averager.p_range is None:
                row.update({f"P_val_{k}": float("nan") for k in METRIC_KEYS})
        return candidates

    def run(self) -> RunResult:
        cfg = self.cfg
        if self.finished:
            self.log(f"[green]{escape(str(self.run_dir))} is finished[/] ({self.epoch} epochs); nothing to do.")
            return self.result()
        while self.epoch < cfg.epochs:
            row = self.train_epoch()
            candidates = self.validate(row)
            if self.schedule_when == "epoch":
                self.scheduler.step()
            elif self.schedule_when == "plateau":
                self.scheduler.step(row["val_loss"])
            self.epoch += 1
            name, (net, metrics) = min(candidates.items(), key=lambda kv: kv[1][1]["loss"] if cfg.monitor == "loss"
                                       else -kv[1][1]["accuracy"])
            value = metrics[cfg.monitor]
            if is_better(value, self.best.get("value"), cfg.monitor):
                self.best = {"value": value, "epoch": self.epoch, "variant": name, "monitor": cfg.monitor}
                self.bad_epochs = 0
                self.save_best(name, net, metrics)
            else:
                self.bad_epochs += 1
            row["best_variant"] = name
            self.history.append(row)
            stop = cfg.early_stopping and self.bad_epochs >= cfg.early_stopping
            self.finished = self.epoch >= cfg.epochs or bool(stop)
            state = self.state()  # collective (gathers every rank's RNG state): all ranks take part
            if self.dist.is_main:
                write_metrics_csv(self.run_dir / "metrics.csv", self.history)
                self.log_tensorboard(row)
                save_checkpoint(state, self.run_dir / "last.pt")
            barrier(self.dist)
            self.log(
                f"epoch {self.epoch}/{cfg.epochs}: train loss {row['train_loss']:.3f}, val loss {row['val_loss']:.3f}, "
                f"val top-1 {row['val_accuracy']:.3f}, {row['img_per_s']:.1f} img/s, data wait "
                f"{row['data_wait_share']:.0%}; best so far: {self.best['variant']} @ epoch {self.best['epoch']}"
            )
            if stop:
                self.log(f"early stopping: no better {cfg.monitor} for {cfg.early_stopping} epochs")
                break
        self.test()
        return self.result()

    def log_tensorboard(self, row: dict) -> None:
        if not self.cfg.tensorboard:
            return
        if self.tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise DogkitError("tensorboard=true needs the tensorboard package: pip install tensorboard") from e
            self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
        for key, value in row.items():
            if isinstance(value, float | int) and key != "epoch":
                self.tensorboard.add_scalar(key.replace("_val_", "/val_"), value, row["epoch"])
        self.tensorboard.flush()

    def test(self) -> None:
        """Test-split metrics of the best model (and, with averaging, of the final raw iterate and averages)."""
        test_loader = self.eval_loader("test")
        barrier(self.dist)  # best.pt is written by rank 0
        best = load_checkpoint(self.run_dir / "best.pt", map_location=self.device)
        report = {"best": {"variant": best["variant"], "epoch": best["epoch"], "val": best["val_metrics"]}}
        net = build_model(self.cfg.arch, len(self.dataset.classes), spec=self.spec, dropout=self.cfg.dropout)
        net.load_state_dict(best["model"])
        net = net.to(self.device)
        # fp32 here: the test metrics are the reference that `dogkit eval` and the ONNX model are compared with.
        logits, labels = self.eval_logits(net, test_loader, None)
        report["best"]["test"] = {"loss": float(F.cross_entropy(logits, labels)),
                                  **classification_metrics(labels.numpy(), logits.numpy())}
        if self.averager is not None:
            report["final"] = {name: self.evaluate(v, test_loader, None) for name, v in self.variants()}
            report["averages"] = {name: self.averager.describe(name) for name in self.averager.names}
            if self.averager.p_range:
                report["final"]["P"]["steps"] = list(self.averager.p_range)
        if not self.dist.is_main:
            return
        # Per-image predictions: what the report needs for paired tests, intervals and calibration.
        buf = io.BytesIO()
        np.savez(buf, logits=logits.numpy(), labels=labels.numpy(),
                 paths=np.array([r.path for r in self.dataset.split("test")]))
        atomic_write_bytes(self.run_dir / "test_predictions.npz", buf.getvalue())
        atomic_write_text(self.run_dir / "test_metrics.json", json.dumps(report, indent=2) + "\n")
        t = report["best"]["test"]
        console.print(f"test ({best['variant']} from epoch {best['epoch']}): top-1 {t['accuracy']:.3f}, top-5 "
                      f"{t['top5']:.3f}, macro precision {t['precision_macro']:.3f}, recall {t['recall_macro']:.3f}")

    def result(self) -> RunResult:
        test = {}
        if (self.run_dir / "test_metrics.json").is_file():
            test = json.loads((self.run_dir / "test_metrics.json").read_text())
        return RunResult(self.run_dir, self.finished, self.epoch, self.best, test)


def train(cfg: TrainConfig | None = None, *, resume: Path | None = None) -> RunResult:
    """Start a run from ``cfg``, or continue the one in ``resume`` (its saved config wins).

    Under torchrun every process calls this; rank 0 alone names the run, writes files and prints.
    """
    if resume is not None:
        resume = Path(resume)
        if not (resume / "config.json").is_file():
            raise DogkitError(f"{resume} is not a dogkit run folder (no config.json)")
        cfg = load_config(resume / "config.json")
        with run_lock(resume):
            last = resume / "last.pt"
            trainer = Trainer(cfg, resume, init_weights=not last.is_file())
            if last.is_file():
                trainer.restore(load_checkpoint(last, map_location=trainer.device), last)
                trainer.log(f"resuming {escape(str(resume))} after epoch {trainer.epoch}")
            return _run(trainer)
    if cfg is None:
        raise DogkitError("train needs a config or --resume")
    trainer = Trainer(cfg, Path())  # builds everything before the folder exists: bad options leave nothing behind
    trainer.run_dir = run_dir = broadcast_object(trainer.dist, new_run_dir(cfg) if trainer.dist.is_main else None)
    if trainer.dist.is_main:
        run_dir.mkdir(parents=True)
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        env = environment(cfg, trainer.dataset, trainer.device, sum(p.numel() for p in trainer.model.parameters()))
        env["processes"] = trainer.dist.world
        atomic_write_text(run_dir / "environment.json", json.dumps(env, indent=2) + "\n")
    barrier(trainer.dist)
    trainer.log(f"run folder: {escape(str(run_dir))}  (device {trainer.device}, autocast {trainer.amp_dtype}, "
                f"{len(trainer.train_images)} training images, {trainer.dist.world} process(es), "
                f"{trainer.steps_per_epoch} steps/epoch)")
    with run_lock(run_dir):
        return _run(trainer)


def _run(trainer: Trainer) -> RunResult:
    try:
        return trainer.run()
    finally:
        shutdown(trainer.dist)
