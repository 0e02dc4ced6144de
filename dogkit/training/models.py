"""Networks: any torchvision classifier behind a normalisation layer, with a new head.

The model takes uint8 RGB NCHW (any memory format) and normalises it itself, so the data loaders
ship uint8 and the exported ONNX file needs nothing but pixels.
"""

from __future__ import annotations

import contextlib
import sys
import urllib.error
from pathlib import Path

import torch
import torchvision
from torch import nn

from ..deploy.preprocess import PreprocessSpec
from ..errors import DogkitError
from ..text import shown
from .torchload import safe_load


class Normalize(nn.Module):
    """uint8 (or 0–255 float) RGB → (x/255 − mean)/std, folded into one multiply-add."""

    def __init__(self, mean, std):
        super().__init__()
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", -mean_t / std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.scale + self.shift


class Classifier(nn.Module):
    def __init__(self, net: nn.Module, spec: PreprocessSpec):
        super().__init__()
        self.normalize = Normalize(spec.mean, spec.std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def head_name(net: nn.Module) -> str:
    """Dotted name of the final Linear layer (resnet: 'fc', efficientnet: 'classifier.1', vit: 'heads.head')."""
    names = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise DogkitError(f"{type(net).__name__} has no Linear classification head to replace")
    return names[-1]


def replace_head(net: nn.Module, num_classes: int, dropout: float = 0.0) -> None:
    name = head_name(net)
    parent_name, _, attr = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    old = getattr(parent, attr)
    new: nn.Module = nn.Linear(old.in_features, num_classes)
    if dropout > 0:
        new = nn.Sequential(nn.Dropout(dropout), new)
    setattr(parent, attr, new)


def available_archs() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def imagenet_state_dict(arch: str) -> dict:
    """The default ImageNet weights of ``arch`` through torchvision's weights API (cached in torch's hub dir)."""
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:  # torch.hub prints "Downloading: …" on stdout, which is for results (`dogkit eval --json | jq`)
        with contextlib.redirect_stdout(sys.stderr):
            return weights.get_state_dict(progress=True, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise DogkitError(
            f"cannot download the ImageNet weights {weights} ({e}). Download {weights.url} by hand and put it at "
            f"{cache}, or pass --weights PATH with a state dict of {arch}, or train from scratch (--exp 3)."
        ) from e


def imagenet_weights_problem(arch: str, timeout: float = 20.0) -> str | None:
    """Why the ImageNet weights of ``arch`` cannot be had (None: they are cached, or downloaded now)."""
    import socket

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    if (Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name).is_file():
        return None
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # torchvision's download has none: a dropped connection would hang
    try:
        imagenet_state_dict(arch)
    except DogkitError as e:
        return str(e.__cause__ or e)
    finally:
        socket.setdefaulttimeout(previous)
    return None


def load_state_file(path: Path) -> dict:
    """A state dict from a file: a plain one, one under "model" or "state_dict", or a dogkit checkpoint
    (``best.pt`` / ``last.pt``: its network's weights, without the ``net.`` prefix and the normalisation layer)."""
    if not path.exists():
        raise DogkitError(f"--weights {shown(path)} does not exist")
    try:
        state = safe_load(path, "cpu", "a state dict or checkpoint")
    except DogkitError as e:
        raise DogkitError(f"cannot load weights from {str(e).removeprefix('cannot load ')}") from e.__cause__
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DogkitError(f"{shown(path)} is not a state dict (a mapping of parameter names to tensors)")
    if any(k.startswith("net.") for k in state):  # a dogkit Classifier: normalisation comes from the spec
        state = {k.removeprefix("net."): v for k, v in state.items() if not k.startswith("normalize.")}
    return state


def load_backbone(net: nn.Module, state: dict, source: str) -> None:
    """Strict load of every weight except the classification head, which is replaced anyway."""
    head = head_name(net) + "."
    own = net.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    body = {k: v for k, v in state.items() if not k.startswith(head)}
    missing = sorted(k for k in own if not k.startswith(head) and k not in body)
    unexpected = sorted(k for k in body if k not in own)
    wrong = sorted(k for k in body if k in own and body[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        details = "; ".join(
            f"{label}: {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys
        )
        raise DogkitError(f"weights from {source} do not fit {type(net).__name__}: {details}")
    net.load_state_dict(body, strict=False)


def load_head_if_it_fits(net: nn.Module, state: dict) -> bool:
    """Warm start: a head of the same shape (a dogkit run with the same classes) is kept, with or without the
    dropout wrapper on either side. Returns whether it was loaded."""
    top = head_name(net).split(".")[0] + "."
    saved = {k.rsplit(".", 1)[-1]: v for k, v in state.items() if k.startswith(top)}
    linear = net.get_submodule(head_name(net))
    if set(saved) != {"weight", "bias"} or saved["weight"].shape != linear.weight.shape:
        return False
    with torch.no_grad():
        linear.weight.copy_(saved["weight"])
        linear.bias.copy_(saved["bias"])
    return True


def build_model(arch: str, num_classes: int, *, spec: PreprocessSpec, pretrained: bool = False,
                weights: str | Path | None = None, dropout: float = 0.0) -> Classifier:
    """``arch`` from torchvision with ImageNet or local weights, a new ``num_classes`` head.

    ``weights``: a state dict or a dogkit checkpoint (warm start from one's own run); its head is kept when it
    has the shape of the new one, so a run with the same classes continues from where it ended.
    """
    if arch not in available_archs():
        import difflib

        close = difflib.get_close_matches(arch, available_archs(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise DogkitError(f"unknown architecture {arch!r}{hint}")
    net = torchvision.models.get_model(arch, weights=None)
    state = None
    if weights is not None:
        state = {k.removeprefix("module."): v for k, v in load_state_file(Path(weights)).items()}
        load_backbone(net, state, shown(weights))
    elif pretrained:
        load_backbone(net, imagenet_state_dict(arch), f"torchvision's {arch} ImageNet weights")
    replace_head(net, num_classes, dropout)
    if state is not None:
        load_head_if_it_fits(net, state)
    return Classifier(net, spec)
