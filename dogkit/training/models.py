"""Networks: any torchvision classifier, or a timm one (``timm/<name>``: ``timm_models``), behind a
normalisation layer, with a new head.

The model takes uint8 RGB NCHW (any memory format) and normalises it itself, so the data loaders
ship uint8 and the exported ONNX file needs nothing but pixels. How images are prepared for it (mean, std,
interpolation, crop ratio) comes from its pretrained weights' own config (``weights_preprocess``).
"""

from __future__ import annotations

import contextlib
import sys
import urllib.error
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision
from rich.markup import escape
from torch import nn

from ..deploy.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec
from ..errors import DogkitError
from ..log import log
from ..text import shown
from . import timm_models
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
        self.weights_source: str | None = None

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

    if name := timm_models.timm_name(arch):
        return timm_models.weights_problem(name)
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


def check_arch(arch: str) -> None:
    """One line for an architecture neither torchvision nor timm (``timm/<name>``) has."""
    if name := timm_models.timm_name(arch):
        timm_models.check_name(name)
        return
    if arch not in available_archs():
        import difflib

        close = difflib.get_close_matches(arch, available_archs(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise DogkitError(f"unknown architecture {shown(arch)!r}{hint} (timm models are spelled "
                          f"{timm_models.PREFIX}<name>, e.g. {timm_models.PREFIX}{timm_models.LITE0})")


# The spec's names for the interpolations that weights' configs name (torchvision's InterpolationMode values and
# timm's strings): the enlarging rule. Shrinking stays INTER_AREA, alias-free as the antialiased resize of both.
UPSCALE = {"bilinear": "linear", "bicubic": "cubic"}


def weights_config(arch: str) -> dict:
    """How ``arch``'s default pretrained weights want images prepared, whether or not they are loaded (a run from
    scratch sees the same inputs as its fine-tuned counterpart): ``size`` and ``resize`` (the crop ratio),
    ``interpolation``, ``mean``, ``std`` and ``source``. From timm's ``resolve_data_config`` on the weights'
    ``pretrained_cfg``, or from torchvision's ``weights.transforms()``; ImageNet's usual values for a
    torchvision network without weights."""
    check_arch(arch)
    if name := timm_models.timm_name(arch):
        cfg = timm_models.data_config(name)
        if cfg.get("crop_mode", "center") != "center":
            log.warning(f"[yellow]{name}'s weights were made with crop_mode {cfg['crop_mode']!r}; dogkit always "
                        "crops the centre square[/]")
        return {"size": cfg["input_size"][-1], "resize": cfg["input_size"][-1] / cfg["crop_pct"],
                "interpolation": cfg["interpolation"], "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]),
                "source": f"timm pretrained_cfg of {name}"}
    try:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError, AttributeError):
        weights = None
    if weights is None:
        return {"size": 224, "resize": 256, "interpolation": "bilinear", "mean": IMAGENET_MEAN,
                "std": IMAGENET_STD, "source": "ImageNet defaults"}
    t = weights.transforms()
    return {"size": t.crop_size[0], "resize": t.resize_size[0], "interpolation": t.interpolation.value,
            "mean": tuple(t.mean), "std": tuple(t.std), "source": f"torchvision {weights}.transforms()"}


def weights_preprocess(arch: str, size: int, **kwargs) -> PreprocessSpec:
    """The spec for ``arch`` at ``size`` px: mean, std, the enlarging interpolation and the crop ratio
    (``size / resize``) of its pretrained weights (``weights_config``); ``kwargs``: the spec's other fields."""
    cfg = weights_config(arch)
    interpolation = UPSCALE.get(str(cfg["interpolation"]).lower())
    if interpolation is None:
        log.warning(f"[yellow]{arch}'s weights resize with {cfg['interpolation']!r}, which dogkit does not have; "
                    "it enlarges with bilinear interpolation[/]")
        interpolation = "linear"
    resize = max(size, int(round(size * cfg["resize"] / cfg["size"])))
    return PreprocessSpec(size=size, resize=resize, interpolation_up=interpolation,
                          mean=tuple(float(m) for m in cfg["mean"]), std=tuple(float(s) for s in cfg["std"]),
                          **kwargs)


def create_network(arch: str) -> nn.Module:
    """``arch`` with random weights and its ImageNet head."""
    check_arch(arch)
    if name := timm_models.timm_name(arch):
        return timm_models.create(name)
    return torchvision.models.get_model(arch, weights=None)


def imagenet_backbone(arch: str, net: nn.Module) -> tuple[dict, str]:
    """The ImageNet weights of ``arch`` (a state dict for ``net``) and where they came from."""
    if name := timm_models.timm_name(arch):
        return timm_models.pretrained_state(name, net.state_dict())
    return imagenet_state_dict(arch), f"torchvision's {arch} ImageNet weights"


def build_model(arch: str, num_classes: int | None, *, spec: PreprocessSpec, pretrained: bool = False,
                weights: str | Path | None = None, dropout: float = 0.0,
                head_rows: Sequence[int] | None = None) -> Classifier:
    """``arch`` from torchvision, or from timm (``timm/<name>``), with ImageNet or local weights, a new
    ``num_classes`` head (``num_classes=None``: the ImageNet head kept, as the weights have it).

    ``weights``: a state dict or a dogkit checkpoint (warm start from one's own run); its head is kept when it
    has the shape of the new one, so a run with the same classes continues from where it ended.
    ``head_rows``: with ``pretrained``, the new head starts as these rows of the ImageNet head (one per class).
    """
    net = create_network(arch)
    state, source = None, None
    if weights is not None:
        state = {k.removeprefix("module."): v for k, v in load_state_file(Path(weights)).items()}
        if name := timm_models.timm_name(arch):
            state = timm_models.fit_state(name, state, net.state_dict(), shown(weights))
        load_backbone(net, state, shown(weights))
    elif pretrained:
        imagenet, source = imagenet_backbone(arch, net)
        log.info(f"ImageNet weights: {escape(source)}")
        if num_classes is None:
            net.load_state_dict(imagenet)
        else:
            load_backbone(net, imagenet, source)
    old_head = head_name(net)
    if num_classes is not None:
        replace_head(net, num_classes, dropout)
    if head_rows is not None:
        if not pretrained or len(head_rows) != num_classes:
            raise DogkitError(f"the head starts from ImageNet's rows only with ImageNet weights, one row per class "
                              f"({len(head_rows)} rows for {num_classes} classes)")
        with torch.no_grad():
            new = net.get_submodule(head_name(net))
            new.weight.copy_(imagenet[f"{old_head}.weight"][list(head_rows)])
            new.bias.copy_(imagenet[f"{old_head}.bias"][list(head_rows)])
    if state is not None:
        load_head_if_it_fits(net, state)
    model = Classifier(net, spec)
    model.weights_source = source  # where its ImageNet weights came from (environment.json; the report says it)
    return model


class NHWCInput(nn.Module):
    """Deployment feeds decoded images as they come (uint8 RGB, NHWC); the graph transposes them.

    ``contiguous()`` matters: on the permuted (channels-last) view, the exporter turns the flatten after
    global pooling into a shape-computing subgraph (Shape → Range → Gather → Mul …) that OpenCV 4.x refuses
    and onnxruntime's symbolic shape inference can trip on; on a contiguous tensor it is one Reshape."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.permute(0, 3, 1, 2).contiguous())
