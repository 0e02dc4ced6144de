"""Where and how training runs: the torch device, the autocast precision, the input layout and the
compile mode (CUDA graphs on a GPU)."""

from __future__ import annotations

import torch

from ..errors import DogkitError
from ..system import cpu_supports_bf16
from .config import TrainConfig


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DogkitError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu")
    return device


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else None


def to_input(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 NHWC batch → NCHW view on the device (NHWC memory is channels_last already)."""
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2)
    return x if channels_last else x.contiguous()


def compile_settings(cfg: TrainConfig, device: torch.device) -> tuple[str, bool]:
    """(torch.compile mode, Adam ``capturable``) for ``--compile`` on this device.

    reduce-overhead (and max-autotune, on a GPU) capture the step in CUDA graphs: one launch replays
    hundreds of kernels, which is what a launch-bound step (ResNet50 at batch 64 on an H100) needs. CUDA
    graphs need a GPU, so on the CPU reduce-overhead compiles in the default mode. Captured runs keep
    Adam's step count on the GPU (``capturable=True``), as CUDA-graph capture of the optimizer requires.
    """
    mode = cfg.compile_mode
    if mode == "reduce-overhead" and device.type != "cuda":
        mode = "default"
    return mode, cfg.compile and device.type == "cuda" and mode != "default"
