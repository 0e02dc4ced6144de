"""Checkpoints: written atomically (temp file, fsync, rename), loaded with ``weights_only=True``."""

from __future__ import annotations

from pathlib import Path

import torch

from .atomic import atomic_path
from .errors import DogkitError


def save_checkpoint(state: dict, path: Path) -> None:
    """A crash while saving leaves the previous file intact: the new one appears whole or not at all."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    if not Path(path).is_file():
        raise DogkitError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle: the message says which file
        raise DogkitError(f"cannot load checkpoint {path}: {e}") from e


def check_compatible(ckpt: dict, arch: str, num_classes: int, path: Path) -> None:
    got_arch, got_classes = ckpt.get("arch"), ckpt.get("num_classes")
    if got_arch != arch or got_classes != num_classes:
        raise DogkitError(
            f"checkpoint {path} holds a {got_arch} with {got_classes} classes, but this run needs a {arch} with "
            f"{num_classes} classes; point --resume at the right run or start a new one"
        )
