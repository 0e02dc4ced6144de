"""Checkpoints: written atomically (temp file, fsync, rename), loaded with ``weights_only=True``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_path
from ..deploy.preprocess import PreprocessSpec
from ..errors import DogkitError
from .config import TrainConfig
from .models import build_model


def save_checkpoint(state: dict, path: Path) -> None:
    """A crash while saving leaves the previous file intact: the new one appears whole or not at all."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


# What every dogkit checkpoint carries (Trainer.header plus the weights); a plain state dict has none.
HEADER_KEYS = ("arch", "num_classes", "class_names", "preprocess", "config", "model")


def load_checkpoint(path: Path, map_location="cpu", *, header: bool = True) -> dict:
    """A dogkit checkpoint (best.pt, last.pt), or one clear error: missing, unreadable, a foreign pickle,
    or (with ``header``) something else saved with torch: a plain torchvision state dict has no dogkit header."""
    if not Path(path).is_file():
        raise DogkitError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle: the message says which file
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise DogkitError(f"cannot load checkpoint {path}: {first}") from e
    if not header:
        return ckpt
    missing = [k for k in HEADER_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(HEADER_KEYS)
    if missing:
        hint = (" (it looks like a plain state dict of weights: pass it to `dogkit train --weights`)"
                if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()) else "")
        raise DogkitError(f"{path} is not a dogkit checkpoint: it lacks {', '.join(missing)}{hint}")
    return ckpt


def check_compatible(ckpt: dict, arch: str, num_classes: int, path: Path) -> None:
    got_arch, got_classes = ckpt.get("arch"), ckpt.get("num_classes")
    if got_arch != arch or got_classes != num_classes:
        raise DogkitError(
            f"checkpoint {path} holds a {got_arch} with {got_classes} classes, but this run needs a {arch} with "
            f"{num_classes} classes; point --resume at the right run or start a new one"
        )


def load_best(run_dir: Path) -> tuple[nn.Module, dict, TrainConfig]:
    """The run's best model on the CPU in fp32 eval mode, its checkpoint and config."""
    ckpt = load_checkpoint(run_dir / "best.pt")
    cfg = TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in TrainConfig.__dataclass_fields__})
    spec = PreprocessSpec.from_dict(ckpt["preprocess"])
    model = build_model(ckpt["arch"], ckpt["num_classes"], spec=spec, dropout=cfg.dropout)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt, cfg
