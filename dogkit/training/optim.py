"""How the weights move: the optimizer, the learning-rate schedule and which layers train in each epoch."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig
from .models import Classifier, head_name


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
    """Returns (scheduler, when): when is 'step' (every optimizer step) or 'plateau' (each epoch, by
    ``step_plateau``). Every schedule but plateau (which config refuses a warm-up) starts with the warm-up."""
    if cfg.schedule == "plateau":
        mode = "min" if cfg.monitor == "loss" else "max"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=cfg.gamma,
                                                          patience=cfg.plateau_patience), "plateau"
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    total = max(cfg.epochs * steps_per_epoch, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "step":  # StepLR's values: × gamma every step_size epochs, counted from the start
            return cfg.gamma ** (step // (cfg.step_size * steps_per_epoch))
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine to 1% of the peak

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "step"


def step_plateau(scheduler, cfg: TrainConfig, row: dict) -> None:
    """The plateau schedule after an epoch: fed the raw model's validation metric that ``monitor`` names (the
    iterate the optimizer moves; the averages do not feed back into it)."""
    scheduler.step(row[f"val_{cfg.monitor}"])


def stages(net: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(stem, body stages) of a torchvision network, head excluded: the top-level children with weights. A timm
    EfficientNet / MobileNet (``conv_stem``, ``bn1``, ``blocks``, ``conv_head``, ``bn2``): the stem and its norm,
    then each stage of ``blocks``, then the head convolution with its norm."""
    head_top = head_name(net).split(".")[0]
    if all(isinstance(getattr(net, n, None), nn.Module) for n in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")):
        return [net.conv_stem, net.bn1], [*net.blocks, nn.ModuleList([net.conv_head, net.bn2])]
    children = [(n, m) for n, m in net.named_children() if n != head_top and any(True for _ in m.parameters())]
    stem_names = {"conv1", "bn1"} if hasattr(net, "conv1") else {children[0][0]} if children else set()
    stem = [m for n, m in children if n in stem_names]
    body = [m for n, m in children if n not in stem_names]
    return stem, body


def frozen_and_trainable(cfg: TrainConfig, net: nn.Module, epoch: int
                         ) -> tuple[list[nn.Module], list[nn.Module] | None]:
    """(the stem and stages held fixed, the body stages that train beside the head) in epoch ``epoch`` (0-based); the
    second is None when every layer trains. A function of the schedule and the epoch alone, so a resumed run derives
    it as the uninterrupted one did. One call to ``stages``: a timm network's top stage is a ModuleList made there,
    so stages from two calls are different objects."""
    if cfg.freeze == "none" or (cfg.freeze == "linear-probe" and epoch >= cfg.probe_epochs):
        return [], None
    stem, body = stages(net)
    # gradual: head first, then one more stage from the top each epoch; the stem stays frozen
    trainable = body[len(body) - epoch:] if cfg.freeze == "gradual" and epoch > 0 else []
    return [*stem, *body[:len(body) - len(trainable)]], trainable


def is_batchnorm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def frozen_batchnorm(cfg: TrainConfig, model: Classifier, epoch: int) -> list[str]:
    """Names (in ``model``) of the BatchNorm layers frozen in epoch ``epoch``: every one with batchnorm=frozen, else
    those of the frozen stages. Schedules only ever unfreeze, so such a layer was fixed for the whole run so far: its
    statistics are the same in the raw model and in every average, and the averages' BatchNorm recompute keeps them.
    Derived from the settings and the epoch, never read back from the model."""
    if cfg.batchnorm == "frozen":
        return [name for name, m in model.named_modules() if is_batchnorm(m)]
    inside = {id(m) for part in frozen_and_trainable(cfg, model.net, epoch)[0] for m in part.modules()}
    return [name for name, m in model.named_modules() if id(m) in inside and is_batchnorm(m)]


def apply_freeze(cfg: TrainConfig, model: Classifier, epoch: int) -> str:
    """Set requires_grad and BatchNorm mode for this epoch; returns a short description ('all layers' when
    nothing is frozen)."""
    net = model.net
    frozen, trainable = frozen_and_trainable(cfg, net, epoch)
    if cfg.batchnorm == "frozen":
        for m in net.modules():
            if is_batchnorm(m):
                m.eval()
    for p in net.parameters():
        p.requires_grad_(trainable is None)
    if trainable is None:
        return "all layers"
    for m in [*trainable, net.get_submodule(head_name(net))]:
        for p in m.parameters():
            p.requires_grad_(True)
    for m in frozen:
        m.eval()  # frozen layers keep their BatchNorm statistics
    return f"head + {len(trainable)} of {len(stages(net)[1])} stages"
