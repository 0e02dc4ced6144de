"""Checkpoints: written atomically (temp file, fsync, rename), loaded with ``weights_only=True``."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_path, write_problem
from ..deploy.preprocess import PreprocessSpec
from ..errors import DogkitError
from ..text import shown
from .config import TrainConfig
from .models import build_model, head_name
from .torchload import safe_load


def save_checkpoint(state: dict, path: Path) -> None:
    """A crash while saving leaves the previous file intact: the new one appears whole or not at all."""
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except (OSError, RuntimeError) as e:  # torch's writer reports a full disk as one of several RuntimeErrors
        raise DogkitError(f"{write_problem(path, e)}; the previous checkpoint is kept") from None


# What every dogkit checkpoint carries (Trainer.header plus the weights); a plain state dict has none.
HEADER_KEYS = ("arch", "num_classes", "class_names", "preprocess", "config", "model")


def load_checkpoint(path: Path, map_location="cpu", *, header: bool = True) -> dict:
    """A dogkit checkpoint (best.pt, last.pt), or one clear error: missing, unreadable, a foreign pickle,
    or (with ``header``) something else saved with torch: a plain torchvision state dict has no dogkit header."""
    if not Path(path).is_file():
        raise DogkitError(f"no checkpoint at {shown(path)}")
    try:
        ckpt = safe_load(path, map_location, "a checkpoint")
    except DogkitError as e:
        raise DogkitError(f"cannot load checkpoint {str(e).removeprefix('cannot load ')}") from e.__cause__
    if not header:
        return ckpt
    missing = [k for k in HEADER_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(HEADER_KEYS)
    if missing:
        hint = (" (it looks like a plain state dict of weights: pass it to `dogkit train --weights`)"
                if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()) else "")
        raise DogkitError(f"{shown(path)} is not a dogkit checkpoint: it lacks {', '.join(missing)}{hint}")
    return ckpt


def check_compatible(ckpt: dict, arch: str, num_classes: int, path: Path) -> None:
    got_arch, got_classes = ckpt.get("arch"), ckpt.get("num_classes")
    if got_arch != arch or got_classes != num_classes:
        raise DogkitError(
            f"checkpoint {shown(path)} holds a {got_arch} with {got_classes} classes, but this run needs a {arch} with "
            f"{num_classes} classes; point --resume at the right run or start a new one"
        )


def load_best(run_dir: Path) -> tuple[nn.Module, dict, TrainConfig]:
    """The run's best model on the CPU in fp32 eval mode, its checkpoint and config."""
    ckpt = load_checkpoint(run_dir / "best.pt")
    cfg = TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in TrainConfig.__dataclass_fields__})
    spec = PreprocessSpec.from_dict(ckpt["preprocess"])
    model = build_model(ckpt["arch"], ckpt["num_classes"], spec=spec, dropout=cfg.dropout)
    load_weights(model, ckpt["model"], run_dir / "best.pt", f"{ckpt['arch']} with {ckpt['num_classes']} classes")
    return model.eval(), ckpt, cfg


def load_weights(module: nn.Module, state, path: Path, what: str) -> None:
    """``module.load_state_dict(state)``, or one line naming the file: a checkpoint whose weights do not fit the
    network its own metadata describes (an edited head, another architecture's weights) was edited or damaged."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError, AttributeError, KeyError) as e:
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e).strip())
        raise DogkitError(f"{shown(path)}: its weights do not fit the {what} its metadata describes ({first[:200]}); "
                          "the file was edited or damaged") from None


def torchvision_model(path: str | Path) -> nn.Module:
    """A dogkit checkpoint (best.pt) as the plain torchvision (or timm) network it wraps, in eval mode: it takes
    float NCHW images normalised with the checkpoint's ``preprocess`` mean and std, as torchvision's own weights do, and
    returns logits over ``class_names``. (dogkit's model is the same network behind its normalisation layer:
    the weights are under ``net.``, and a head with dropout is ``Sequential(Dropout, Linear)``.)"""
    import torchvision

    from .timm_models import timm_name

    ckpt = load_checkpoint(Path(path))
    if name := timm_name(ckpt["arch"]):  # timm/<name>: timm's network, the same way
        import timm

        net = timm.create_model(name, pretrained=False, num_classes=ckpt["num_classes"])
    else:
        net = torchvision.models.get_model(ckpt["arch"], weights=None, num_classes=ckpt["num_classes"])
    head = head_name(net) + "."
    state = {}
    for key, value in ckpt["model"].items():
        if key.startswith("net."):
            key = key.removeprefix("net.")
            state[head + key.removeprefix(head + "1.") if key.startswith(head + "1.") else key] = value
    net.load_state_dict(state)
    return net.eval()


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
