"""A PyTorch network on a split: logits and labels in manifest order, and the metrics dogkit reports."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .device import to_input


@torch.no_grad()
def predict_logits(model: nn.Module, loader, device: torch.device, amp_dtype, channels_last: bool):
    model.eval()
    logits, labels = [], []
    for x, y in loader:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(to_input(x, device, channels_last))
        logits.append(out.float().cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def bn_batches(loader, device, channels_last):
    for x, _ in loader:
        yield to_input(x, device, channels_last)


def torch_logits(run_dir: Path, data: Path, split: str, batch_size: int, device: str = "auto"):
    """``dogkit eval --backend torch``: a run's best.pt on a split or a class-folder tree, in fp32 with no
    autocast (the reference the ONNX model is compared with); logits, labels and class names as numpy."""
    from ..deploy.evaluate import load_eval_data
    from ..deploy.preprocess import PreprocessSpec
    from .checkpoint import load_best
    from .device import resolve_device
    from .loaders import EvalFn, ManifestImages, make_loader

    model, ckpt, _ = load_best(run_dir)
    spec = PreprocessSpec.from_dict(ckpt["preprocess"])
    dataset, records = load_eval_data(data, split, ckpt["class_names"], spec.box_crop)
    torch_device = resolve_device(device)
    images = ManifestImages(dataset, records, EvalFn(spec), spec.box_crop)
    loader = make_loader(images, batch_size, shuffle=False, workers=0)
    logits, labels = predict_logits(model.to(torch_device), loader, torch_device, None, channels_last=True)
    return logits.numpy(), labels.numpy(), ckpt["class_names"]
