"""``dogkit train``: one run of one regime, resumable, observable, with everything in its run folder.

``artifacts/runs/<name>/`` holds ``config.json`` (the resolved config), ``environment.json``,
``metrics.csv`` (one row per epoch), ``run.log`` (what the run printed), ``last.pt`` and ``best.pt``
(atomic), and at the end ``test_metrics.json`` for the best model (regime 2: also the raw iterate and
every average). ``Trainer`` coordinates; the parts are the loop (``loop``), evaluation of the variants
(``evaluation``, ``averaging``), checkpoints (``checkpoint``), the run's state, from which every resume decision is
read (``runstate``), and the run's records (``records``, ``log``);
what happens is told to subscribers (``events``: TensorBoard, and any given as ``callbacks``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.markup import escape
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..atomic import atomic_write_text
from ..data.dataset import load_dataset
from ..deploy.preprocess import PreprocessSpec
from ..errors import DogkitError
from ..log import log, run_log
from ..runs import is_run, new_run_dir, resume_command, run_lock
from ..text import shown
from .averaging import RESERVE, Averager, prepare_all_for_eval
from .checkpoint import check_compatible, load_checkpoint, load_weights, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig, defining_changes, load_config, resume_config
from .device import autocast_dtype, compile_settings, resolve_device
from .distributed import (
    Dist,
    all_gather_objects,
    all_reduce,
    barrier,
    broadcast_buffers,
    broadcast_object,
    init_distributed,
    shutdown,
)
from .evaluation import bn_batches, gather_logits, predict_all_logits, split_metrics
from .events import Callback, Event, Events
from .loaders import ManifestImages, find_cache, make_loader
from .loop import EpochParts, EpochStart, train_epoch
from .models import build_model, weights_preprocess
from .optim import build_optimizer, build_scheduler, frozen_batchnorm, step_plateau
from .records import TensorBoardLog, environment, write_metrics_csv, write_test_outputs
from .runstate import RunState
from .transforms import make_transform

RECOVERY = "recovery.pt"  # a checkpoint inside an epoch; last.pt is the one at the end of each
METRIC_KEYS = ("loss", "accuracy", "top5", "precision_macro", "recall_macro", "f1_macro")


@dataclass
class RunResult:
    run_dir: Path
    finished: bool  # trained and tested: the run's state is done
    epochs_done: int
    best: dict = field(default_factory=dict)
    test: dict = field(default_factory=dict)


def is_better(value: float, best: float | None, monitor: str) -> bool:
    if best is None:
        return True
    return value < best if monitor == "loss" else value > best


class Trainer:
    """One run, coordinated: it owns the parts (model, optimizer, loaders, averages, run state) and calls the
    loop (``loop.train_epoch``), the evaluation of each variant, the checkpoints and the run's records."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, *, init_weights: bool = True,
                 callbacks: Iterable[Callback] = (), spec: PreprocessSpec | None = None):
        """``init_weights=False`` skips loading pretrained weights: a resumed run takes them from last.pt.
        ``callbacks``: subscribers to the run's events (``events``), after TensorBoard's when it is on.
        ``spec``: the preprocessing a resumed run was trained with (its checkpoint's); a new run's comes from the
        architecture's pretrained weights (``models.weights_preprocess``)."""
        self.cfg = cfg
        self.run_dir = run_dir
        self.dataset = load_dataset(cfg.data)
        self.crop = cfg.crop or self.dataset.crop
        self.spec = spec or weights_preprocess(cfg.arch, cfg.image_size, box_crop=self.crop,
                                               exif_orientation="apply" if self.dataset.orients else "ignore")
        self._setup_device()
        self._build_model(init_weights)
        self._build_optimisation()
        self._build_data()
        self.scheduler, self.schedule_when = build_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        self.averager = self._build_averager() if cfg.optimizer == "averaged-adam" else None
        self.state = RunState(cfg.epochs)  # where the run stands: restored whole on resume
        self.divergence: str | None = None  # why the epochs of this invocation look diverging
        self.last_save = time.perf_counter()
        self.events = Events([TensorBoardLog()] if cfg.tensorboard else [])
        for callback in callbacks:
            self.events.subscribe(callback)

    # -- set-up
    def _setup_device(self) -> None:
        cfg = self.cfg
        self.device = resolve_device(cfg.device)
        self.dist: Dist = init_distributed(self.device.type == "cuda")
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.amp_dtype = autocast_dtype(cfg.amp, self.device)
        torch.manual_seed(cfg.seed + self.dist.rank)  # per-rank streams (dropout); the weights come from rank 0
        if cfg.deterministic:
            if self.device.type == "cuda":
                # cuBLAS is deterministic only with a fixed workspace, set before its first use.
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                self.log("deterministic=true on CUDA is best effort: kernels with no deterministic version "
                         "(torch warns which) still vary from run to run, and results differ between GPU models")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def _build_model(self, init_weights: bool) -> None:
        """``model``: the plain module (averages, checkpoints); ``step_model``: what the loop calls (DDP, compiled)."""
        cfg = self.cfg
        rows = None
        if init_weights and cfg.head_init == "imagenet":
            from .synsets import head_columns

            rows = head_columns([c.folder for c in self.dataset.classes])  # one line when they are no synsets
        self.model = build_model(cfg.arch, len(self.dataset.class_names), spec=self.spec,
                                 pretrained=init_weights and cfg.pretrained and not cfg.weights,
                                 weights=cfg.weights if init_weights else None,
                                 dropout=cfg.dropout, head_rows=rows).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.step_model: nn.Module = self.model
        if self.dist.enabled:
            if cfg.sync_bn:
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            # DDP broadcasts rank 0's weights and all-reduces gradients; the averages and checkpoints keep
            # using the plain module, which is identical on every rank.
            # A freeze schedule turns gradients off for whole stages after DDP has registered every parameter;
            # DDP then has to look for the ones a step did not use, or it waits for their gradients forever.
            self.step_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.freeze != "none")
        mode, self.capturable = compile_settings(cfg, self.device)
        self.cuda_graphs = self.capturable  # each step then starts a new CUDA-graph generation
        if cfg.compile:
            if mode != cfg.compile_mode:
                self.log(f"compile_mode={cfg.compile_mode} captures CUDA graphs, which need a GPU; "
                         f"compiling in {mode} mode on {self.device}")
            self.step_model = torch.compile(self.step_model, mode=mode)

    def _build_optimisation(self) -> None:
        self.optimizer = build_optimizer(self.cfg, self.model, capturable=self.capturable)
        self.use_scaler = self.amp_dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_scaler)

    def _build_averager(self) -> Averager:
        """Averages of the uncompiled module, updated after every optimizer step, P made at every epoch's end; only
        the fp16 GradScaler skips steps, so only it needs windows that absorb skips."""
        try:
            return Averager(self.model, self.cfg.avg_window, self.cfg.avg_ema, period=self.steps_per_epoch,
                            reserve=RESERVE if self.use_scaler else 0)
        except ValueError as e:
            raise DogkitError(str(e)) from None

    def _build_data(self) -> None:
        cfg = self.cfg
        self.workers = cfg.workers if cfg.workers is not None else (1 if self.device.type == "cpu" else None)
        train_records = self.dataset.split("train")
        if not train_records or not self.dataset.split("val"):
            raise DogkitError(f"{self.dataset.root} has no train or val images; run `dogkit prepare` again")
        cache = find_cache(self.dataset, self.crop, cfg.image_size) if cfg.cache else None
        augment = make_transform(self.spec, cfg.augment)
        self.train_images = ManifestImages(self.dataset, train_records, augment, self.crop, cache)
        self.train_loader = None  # made at the first epoch; its workers then serve every epoch
        # Optimizer steps per epoch: each takes `accumulate` micro-batches on every process.
        self.steps_per_epoch = len(train_records) // (cfg.batch_size * cfg.accumulate * self.dist.world) or 1
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)

    # -- loaders
    def eval_loader(self, split: str):
        """This process's share of a split: every image exactly once across processes, no padding."""
        records = self.dataset.split(split)[self.dist.rank:: self.dist.world]
        images = ManifestImages(self.dataset, records, make_transform(self.spec), self.crop)
        return make_loader(images, self.cfg.batch_size, shuffle=False, workers=self.workers,
                           pin_memory=self.device.type == "cuda")

    def bn_loader(self):
        """Training images through the eval transform, a fixed subset: the averages' BatchNorm statistics."""
        records = self.dataset.split("train")
        order = np.random.default_rng(self.cfg.seed).permutation(len(records))[: self.cfg.avg_bn_images]
        # Every process uses the same images, so the averages' statistics stay identical on every rank.
        images = ManifestImages(self.dataset, [records[i] for i in sorted(order)], make_transform(self.spec),
                                self.crop)
        return make_loader(images, self.cfg.batch_size, shuffle=False, workers=self.workers)

    # -- evaluation
    def eval_logits(self, nets: dict[str, nn.Module], loader,
                    amp_dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Logits and labels of the whole split for each network, in manifest order, on every process; one pass
        over the images serves every network."""
        out = predict_all_logits(nets, loader, self.device, amp_dtype, self.cfg.channels_last)
        return {name: gather_logits(self.dist, *pair) for name, pair in out.items()}

    def evaluate(self, nets: dict[str, nn.Module], loader, amp_dtype) -> dict[str, dict[str, float]]:
        return {name: split_metrics(*pair) for name, pair in self.eval_logits(nets, loader, amp_dtype).items()}

    def variants(self) -> dict[str, nn.Module]:
        """{name: network ready for evaluation}: the raw iterate, and each average with fresh BN statistics.

        P is left out until it is first made (an epoch's end). Under a freeze schedule the BatchNorm
        layers frozen in the epoch last trained keep their (never changed) statistics; every other one is
        recomputed. All the averages' statistics come from one pass over the BatchNorm images.
        """
        nets = {"raw": self.model}
        if self.averager is None:
            return nets
        averages = {name: self.averager.model(name) for name in self.averager.ready()}
        batches = bn_batches(self.bn_loader(), self.device, self.cfg.channels_last)
        frozen = frozen_batchnorm(self.cfg, self.model, max(self.state.epoch - 1, 0))
        prepare_all_for_eval(list(averages.values()), batches, self.device, frozen=frozen)
        return {**nets, **averages}

    def validate(self, row: dict) -> dict:
        """Validation metrics of every variant into ``row``; returns {variant: (network, metrics)}."""
        val_loader = self.eval_loader("val")
        broadcast_buffers(self.dist, self.model)  # every rank evaluates (and rank 0 saves) the same network
        nets = self.variants()
        candidates = {}
        for name, metrics in self.evaluate(nets, val_loader, self.amp_dtype).items():
            prefix = "val" if name == "raw" else f"{name}_val"
            row.update({f"{prefix}_{k}": metrics[k] for k in METRIC_KEYS})
            candidates[name] = (nets[name], metrics)
        if self.averager is not None:
            # Which iterates the evaluated P averages (M′ of them); blank (and P's metrics NaN) before it is first made.
            first, last = self.averager.p_range or ("", "")
            row.update({"P_first_step": first, "P_last_step": last, "P_iterates": self.averager.p_count or ""})
            if self.averager.p_range is None:
                row.update({f"P_val_{k}": float("nan") for k in METRIC_KEYS})
        return candidates

    def test(self) -> None:
        """Test-split metrics of the best model (and, with averaging, of the final raw iterate and averages)."""
        test_loader = self.eval_loader("test")
        barrier(self.dist)  # best.pt is written by rank 0
        best = load_checkpoint(self.run_dir / "best.pt", map_location=self.device)
        report = {"best": {"variant": best["variant"], "epoch": best["epoch"], "val": best["val_metrics"]}}
        net = build_model(self.cfg.arch, len(self.dataset.classes), spec=self.spec, dropout=self.cfg.dropout)
        net.load_state_dict(best["model"])
        # fp32 here: the test metrics are the reference that `dogkit eval` and the ONNX model are compared with.
        nets = {"best": net.to(self.device), **(self.variants() if self.averager is not None else {})}
        outputs = self.eval_logits(nets, test_loader, None)
        logits, labels = outputs.pop("best")
        report["best"]["test"] = split_metrics(logits, labels)
        if self.averager is not None:
            report["final"] = {name: split_metrics(*pair) for name, pair in outputs.items()}
            report["averages"] = {name: self.averager.describe(name) for name in self.averager.names}
            if self.averager.p_range:
                report["final"]["P"]["steps"] = list(self.averager.p_range)
                report["final"]["P"]["iterates"] = self.averager.p_count
        if not self.dist.is_main:
            return
        write_test_outputs(self.run_dir, report, logits.numpy(), labels.numpy(),
                           [r.path for r in self.dataset.split("test")])
        t = report["best"]["test"]
        log.info(f"test ({best['variant']} from epoch {best['epoch']}): top-1 {t['accuracy']:.3f}, top-5 "
                 f"{t['top5']:.3f}, macro precision {t['precision_macro']:.3f}, recall {t['recall_macro']:.3f}")

    # -- the run
    def epoch_parts(self) -> EpochParts:
        """What the loop works with, taken from the trainer as it is now (cheap: made once an epoch)."""
        return EpochParts(
            cfg=self.cfg, model=self.model, step_model=self.step_model, optimizer=self.optimizer,
            scaler=self.scaler, use_scaler=self.use_scaler, scheduler=self.scheduler,
            schedule_when=self.schedule_when, averager=self.averager, train_images=self.train_images,
            workers=self.workers, device=self.device, amp_dtype=self.amp_dtype, dist=self.dist,
            cuda_graphs=self.cuda_graphs, steps_per_epoch=self.steps_per_epoch, run_dir=self.run_dir,
            recovery_due=self.recovery_due, save_recovery=self.save_recovery)

    def train_epoch(self) -> dict:
        """One epoch of the loop; keeps what it changed (epochs and steps done, the loader) and returns its row."""
        state = self.state
        position, state.position = state.position, None  # a recovery position serves one epoch
        result = train_epoch(self.epoch_parts(), EpochStart(state.epoch, state.global_step, self.train_loader,
                                                            position))
        state.epoch, state.global_step, self.train_loader = state.epoch + 1, result.global_step, result.loader
        return result.row

    def emit(self, event: Event, **payload) -> None:
        """Tell the subscribers, from the main process only: one call per event whatever the processes."""
        if self.dist.is_main:
            self.events.emit(event, run_dir=self.run_dir, **payload)

    def run(self) -> RunResult:
        """The run between its RUN_START and its RUN_END (or RUN_FAILED, the error raised again)."""
        self.emit(Event.RUN_START, epoch=self.state.epoch, global_step=self.state.global_step, epochs=self.cfg.epochs)
        try:
            result = self.train_and_test()
        except BaseException as e:  # Ctrl-C too: a subscriber may close what it opened
            self.emit(Event.RUN_FAILED, error=e)
            raise
        self.emit(Event.RUN_END, result=result)
        return result

    def train_and_test(self) -> RunResult:
        """Train the epochs still to do, then test, as the run's state says: a run is done once its test results are
        written; one stopped inside the test (after its last epoch was saved) is tested on resume, not trained."""
        cfg, state = self.cfg, self.state
        if state.done:
            self.log(f"[green]{escape(shown(self.run_dir))} is finished[/] ({state.epoch} epochs); nothing to do.")
            return self.result()
        if state.finished:
            self.log(f"training ended after epoch {state.epoch}, but the test did not complete; testing now")
        while not state.finished:
            row = self.train_epoch()
            tick = time.perf_counter()
            candidates = self.validate(row)  # with averaging: every average's BatchNorm pass and evaluation
            row["val_time_s"] = time.perf_counter() - tick
            if self.schedule_when == "plateau":
                step_plateau(self.scheduler, cfg, row)
            self.end_epoch(row, candidates)
        if self.divergence and self.dist.is_main:
            log.warning(f"[yellow]warning:[/] the training diverged ({self.divergence}); the test uses the model of "
                        f"epoch {state.best.get('epoch', '–')} (the best validation {cfg.monitor}): lower --lr, or see "
                        "whether the data changed")
        streams = rng_state()
        self.test()
        set_rng_state(streams)  # as at the epoch's end: a run given more epochs goes on as one planned that long
        state.tested = True
        self.save_last()  # a later resume finds the run done
        return self.result()

    def end_epoch(self, row: dict, candidates: dict) -> None:
        """Keep the best variant, record the epoch and save last.pt; early stopping may end the run here."""
        cfg, state = self.cfg, self.state
        name, (net, metrics) = min(candidates.items(), key=lambda kv: kv[1][1]["loss"] if cfg.monitor == "loss"
                                   else -kv[1][1]["accuracy"])
        if is_better(metrics[cfg.monitor], state.best.get("value"), cfg.monitor):
            state.best = {"value": metrics[cfg.monitor], "epoch": state.epoch, "variant": name, "monitor": cfg.monitor}
            state.bad_epochs = 0
            self.save_best(name, net, metrics)
        else:
            state.bad_epochs += 1
        row["best_variant"] = name
        state.history.append(row)
        if self.divergence is None:
            self.divergence = diverging(state.history, len(self.dataset.classes))  # said once, before the test
        state.stopped = bool(cfg.early_stopping and state.bad_epochs >= cfg.early_stopping)
        if self.dist.is_main:
            write_metrics_csv(self.run_dir / "metrics.csv", state.history)
            self.emit(Event.EPOCH_END, epoch=state.epoch, row=dict(row), best=dict(state.best))
        self.save_last()
        self.log(
            f"epoch {state.epoch}/{cfg.epochs}: train loss {row['train_loss']:.3f}, val loss {row['val_loss']:.3f}, "
            f"val top-1 {row['val_accuracy']:.3f}, {row['img_per_s']:.1f} img/s, data wait "
            f"{row['data_wait_share']:.0%}; best so far: {state.best['variant']} @ epoch {state.best['epoch']}"
        )
        if state.stopped:
            self.log(f"early stopping: no better {cfg.monitor} for {cfg.early_stopping} epochs")

    def log(self, message: str) -> None:
        if self.dist.is_main:
            log.info(message)

    # -- checkpoints
    def header(self) -> dict:
        """What every checkpoint says about itself: enough to rebuild, check and deploy the network."""
        return {"format": 1, "arch": self.cfg.arch, "num_classes": len(self.dataset.classes),
                "class_names": self.dataset.class_names, "preprocess": json.loads(self.spec.to_json()),
                "config": self.cfg.to_dict(), "epoch": self.state.epoch}

    def checkpoint(self, **changes) -> dict:
        """Everything to resume: the header, the weights, the optimisation, every process's random streams and the
        run's state whole (with ``changes``: a recovery checkpoint's step and position inside the epoch)."""
        averages = self.averager.state_dict() if self.averager else None
        return {
            **self.header(), **self.state.to_checkpoint(averages=averages, **changes),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": all_gather_objects(self.dist, rng_state()),
        }

    def save_last(self) -> None:
        """last.pt: the run at an epoch's end (or done), superseding recovery.pt."""
        ckpt = self.checkpoint()  # collective (gathers every rank's RNG state): all ranks take part
        if self.dist.is_main:
            save_checkpoint(ckpt, self.run_dir / "last.pt")
            (self.run_dir / RECOVERY).unlink(missing_ok=True)  # older than last.pt now
            self.emit(Event.CHECKPOINT_SAVED, path=self.run_dir / "last.pt", epoch=self.state.epoch,
                      global_step=self.state.global_step)
        self.last_save = time.perf_counter()
        barrier(self.dist)

    def recovery_due(self) -> bool:
        """Whether to write a recovery checkpoint now: ``recovery_minutes`` since the last save, on any process
        (all of them then take part, since saving gathers every process's RNG state)."""
        minutes = self.cfg.recovery_minutes
        due = bool(minutes) and time.perf_counter() - self.last_save >= 60 * minutes
        return bool(all_reduce(self.dist, [float(due)])[0]) if self.dist.enabled and minutes else due

    def save_recovery(self, position: dict, global_step: int) -> None:
        """``recovery.pt``: the run inside the epoch it is training (``position``: micro-batches done, the
        epoch's sums so far; ``global_step``: the loop's, ahead of the trainer's until the epoch ends);
        ``--resume`` continues from it when it is newer than last.pt."""
        ckpt = self.checkpoint(global_step=global_step, position=position)
        if self.dist.is_main:
            save_checkpoint(ckpt, self.run_dir / RECOVERY)
            self.emit(Event.CHECKPOINT_SAVED, path=self.run_dir / RECOVERY, epoch=self.state.epoch,
                      global_step=global_step)
        self.last_save = time.perf_counter()
        barrier(self.dist)

    def restore(self, ckpt: dict, path: Path) -> None:
        check_compatible(ckpt, self.cfg.arch, len(self.dataset.classes), path)
        what = f"{self.cfg.arch} with {len(self.dataset.classes)} classes"
        load_weights(self.model, ckpt.get("model"), path, what)
        for name in ("optimizer", "scheduler", "scaler"):
            load_weights(getattr(self, name), ckpt.get(name), path, f"{name} of a {what}")
        for group in self.optimizer.param_groups:  # load_state_dict takes moments of any shape; the step would not
            for param in group["params"]:
                for key, value in self.optimizer.state.get(param, {}).items():
                    if torch.is_tensor(value) and value.ndim and value.shape != param.shape:
                        raise DogkitError(f"{shown(path)}: the optimizer's {key} of a {tuple(param.shape)} weight is "
                                          f"{tuple(value.shape)}; the run folder was edited or damaged: start a new "
                                          "run")
        self.state = RunState.from_checkpoint(ckpt, path)
        if self.averager is not None:
            try:
                self.averager.load_state_dict(self.state.averages)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise DogkitError(f"cannot resume the averages in {shown(path)}: {e}; start a new run") from e
        self.state.averages = None  # loaded: the checkpoint's tensors are not kept
        states = ckpt["rng"]
        if len(states) == self.dist.world:  # the same number of processes: each resumes its own streams
            try:
                set_rng_state(states[self.dist.rank])
            except (TypeError, ValueError, KeyError, RuntimeError) as e:
                raise DogkitError(f"{shown(path)}: rng is not the random generators' state ({shown(e)}); the run "
                                  "folder was edited or damaged: start a new run") from e

    def change_settings(self, saved: TrainConfig) -> None:
        """The run as configured now: config.json rewritten when the resume changed settings, and the run's state
        planned for the epochs it has now. A finished run given more trains on, and its earlier test results are
        kept beside the new ones, renamed."""
        if self.cfg != saved:
            changes = ", ".join(f"{k} {v} → {getattr(self.cfg, k)}" for k, v in saved.to_dict().items()
                                if getattr(self.cfg, k) != v)
            if self.dist.is_main:
                atomic_write_text(self.run_dir / "config.json", json.dumps(self.cfg.to_dict(), indent=2) + "\n")
            self.log(f"settings changed on resume: {changes}")
        if self.state.replan(self.cfg.epochs) and self.dist.is_main:
            for name in ("test_metrics.json", "test_predictions.npz"):
                if (self.run_dir / name).is_file():
                    stem, _, ext = name.partition(".")
                    (self.run_dir / name).replace(self.run_dir / f"{stem}.{self.state.epoch}-epochs.{ext}")
        barrier(self.dist)

    def save_best(self, variant: str, net: nn.Module, metrics: dict) -> None:
        if not self.dist.is_main:
            return
        state = {**self.header(), "variant": variant, "val_metrics": metrics,
                 "model": {k: v.detach().cpu() for k, v in net.state_dict().items()}}
        save_checkpoint(state, self.run_dir / "best.pt")
        self.emit(Event.BEST_SAVED, path=self.run_dir / "best.pt", epoch=self.state.epoch, variant=variant,
                  metrics=dict(metrics))

    def result(self) -> RunResult:
        test = {}
        if (self.run_dir / "test_metrics.json").is_file():
            test = json.loads((self.run_dir / "test_metrics.json").read_text())
        return RunResult(self.run_dir, self.state.done, self.state.epoch, self.state.best, test)


def train(cfg: TrainConfig | None = None, *, resume: Path | None = None, overrides: dict | None = None,
          callbacks: Iterable[Callback] = ()) -> RunResult:
    """Start a run from ``cfg``, or continue the one in ``resume`` with its saved config; ``overrides`` may
    change what a resumed run accepts (``config.RESUME_SETTINGS``: more epochs, the device, workers …);
    ``callbacks``: subscribers to the run's events (``events``).

    Under torchrun every process calls this; rank 0 alone names the run, writes files and prints.
    """
    if resume is not None:
        resume = Path(resume)
        if not is_run(resume):
            raise DogkitError(f"{resume} is not a dogkit run folder (no config.json)")
        saved = load_config(resume / "config.json")
        with run_lock(resume):
            last, ckpt = newest_checkpoint(resume, resume_config(saved, overrides or {}, 0).epochs)
            if ckpt is not None:
                _check_against(ckpt, last, saved, resume / "config.json")
            cfg = resume_config(saved, overrides or {}, ckpt["epoch"] if ckpt else 0)
            trainer = Trainer(cfg, resume, init_weights=ckpt is None, callbacks=callbacks,
                              spec=PreprocessSpec.from_dict(ckpt["preprocess"]) if ckpt else None)
            with _run_log(trainer):
                if ckpt is not None:
                    trainer.restore(ckpt, last)
                    del ckpt
                    state = trainer.state
                    where = (f"inside epoch {state.epoch + 1}, at step {state.global_step} ({last.name})"
                             if state.position else f"after epoch {state.epoch}")
                    trainer.log(f"resuming {escape(shown(resume))} {where}")
                trainer.change_settings(saved)
                return _run(trainer)
    if cfg is None:
        raise DogkitError("train needs a config or --resume")
    # Everything is built before the folder exists: bad options leave nothing behind.
    trainer = Trainer(cfg, Path(), callbacks=callbacks)
    name = new_run_dir(cfg.runs_dir, name=cfg.name, exp=cfg.exp, arch=cfg.arch) if trainer.dist.is_main else None
    trainer.run_dir = run_dir = broadcast_object(trainer.dist, name)
    if trainer.dist.is_main:
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        env = environment(cfg, trainer.dataset, trainer.device, sum(p.numel() for p in trainer.model.parameters()))
        env["processes"] = trainer.dist.world
        env["imagenet_weights"] = trainer.model.weights_source
        atomic_write_text(run_dir / "environment.json", json.dumps(env, indent=2) + "\n")
    barrier(trainer.dist)
    with run_lock(run_dir), _run_log(trainer):
        trainer.log(f"run folder: {escape(shown(run_dir))}  (device {trainer.device}, autocast {trainer.amp_dtype}, "
                    f"{len(trainer.train_images)} training images, {trainer.dist.world} process(es), "
                    f"{trainer.steps_per_epoch} steps/epoch)")
        return _run(trainer)


DIVERGENCE = 100  # a training loss this many times its lowest so far is no longer learning


def diverging(history: list[dict], classes: int) -> str | None:
    """Why the epochs so far look diverging (validation loss not finite, or the training loss grown by orders of
    magnitude from its lowest or from a uniform guess's, log(classes)), or None. The training stops by itself only
    when its loss is not finite."""
    last = history[-1]
    if not math.isfinite(last.get("val_loss", 0.0)):
        return f"validation loss {last['val_loss']} at epoch {len(history)}"
    losses = [r["train_loss"] for r in history if math.isfinite(r.get("train_loss", math.nan))]
    if len(losses) >= 2 and min(losses[:-1]) > 0 and losses[-1] > DIVERGENCE * min(losses[:-1]):
        return f"training loss {losses[-1]:.3g} at epoch {len(history)}, from {min(losses[:-1]):.3g}"
    if losses and classes > 1 and losses[-1] > DIVERGENCE * math.log(classes):
        return f"training loss {losses[-1]:.3g} at epoch {len(history)}; a uniform guess scores {math.log(classes):.3g}"
    return None


def newest_checkpoint(run_dir: Path, epochs: int) -> tuple[Path, dict | None]:
    """The checkpoint a resumed run of ``epochs`` continues from: last.pt, or recovery.pt when it is further on (an
    epoch interrupted after its recovery checkpoint) inside an epoch still planned. Loaded once, on the CPU:
    load_state_dict puts every tensor on the device of the one it replaces. (path, None) when the run never saved
    one."""
    last, recovery = run_dir / "last.pt", run_dir / RECOVERY
    ckpt = _resumable(load_checkpoint(last), last) if last.is_file() else None
    if recovery.is_file():
        try:
            newer = _resumable(load_checkpoint(recovery), recovery)
        except DogkitError as e:  # written atomically, so only damage from outside; last.pt still holds
            log.warning(f"[yellow]warning:[/] {escape(shown(e))}; resuming from {last.name} instead")
        else:
            if (ckpt is None or newer["global_step"] > ckpt["global_step"]) and newer["epoch"] < epochs:
                return recovery, newer
    return last, ckpt


def _resumable(ckpt: dict, path: Path) -> dict:
    """A checkpoint a run can continue from: its run state whole (``RunState.from_checkpoint``), its config and spec
    objects, checked here so that an edited file is one line naming it and the field."""
    for key, kind, what in (("config", dict, "an object"), ("preprocess", dict, "an object"), ("rng", list, "a list")):
        if not isinstance(ckpt.get(key), kind):
            raise DogkitError(f"{shown(path)}: {key} is not {what}; the run folder was edited or damaged: start a new "
                              "run")
    RunState.from_checkpoint(ckpt, path)
    try:
        PreprocessSpec.from_dict(ckpt["preprocess"])
    except (DogkitError, ValueError, TypeError, KeyError) as e:
        raise DogkitError(f"{shown(path)}: preprocess is not a preprocessing spec ({shown(e)}); the run folder was "
                          "edited or damaged: start a new run") from e
    return ckpt


def _check_against(ckpt: dict, path: Path, saved: TrainConfig, config: Path) -> None:
    """config.json and the checkpoint describe the same run: a setting that defines the run (the image size, the
    optimizer …) edited into config.json would otherwise be trained with, against weights made for another."""
    # where things are (a dataset moved, a run folder copied) may change; what is trained may not
    differ = [k for k in defining_changes(ckpt["config"], saved.to_dict())
              if k not in ("data", "runs_dir", "name", "weights", "pretrained", "cache")]
    if differ:
        said = ", ".join(f"{k} {shown(repr(saved.to_dict()[k]))[:30]} (the checkpoint: "
                         f"{shown(repr(ckpt['config'][k]))[:30]})" for k in differ[:3])
        raise DogkitError(f"{shown(config)} does not match {shown(path)}: {said}; --resume cannot change what "
                          "defines the run: restore config.json, or start a new run")


def _run_log(trainer: Trainer):
    """``run.log`` in the run folder, written by process 0 alone; an interruption names the command that resumes."""
    return run_log(trainer.run_dir, _resume_command(trainer)) if trainer.dist.is_main else nullcontext()


def _resume_command(trainer: Trainer) -> str:
    """Under torchrun, with as many processes: the global batch is batch_size × processes."""
    command, world = resume_command(trainer.run_dir), trainer.dist.world
    if world == 1:
        return command
    if int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world:  # one node
        return f"{command} --devices {world}"
    return f"torchrun (as before) -m {command}"


def _run(trainer: Trainer) -> RunResult:
    try:
        return trainer.run()
    finally:
        shutdown(trainer.dist)
