"""Checkpoints: written atomically (temp file, fsync, rename), loaded with ``weights_only=True``."""

from __future__ import annotations

from pathlib import Path

import torch

from ..atomic import atomic_path
from ..errors import DogkitError


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
