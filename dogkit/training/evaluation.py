"""A PyTorch network on a split: logits and labels in manifest order, and the metrics dogkit reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..metrics import classification_metrics
from .device import to_input
from .distributed import all_gather_objects


@torch.no_grad()
def predict_logits(model: nn.Module, loader, device: torch.device, amp_dtype, channels_last: bool):
    return predict_all_logits({"model": model}, loader, device, amp_dtype, channels_last)["model"]


@torch.no_grad()
def predict_all_logits(models: dict[str, nn.Module], loader, device: torch.device, amp_dtype,
                       channels_last: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Logits and labels of every network in ``models`` from one pass over ``loader``: each batch is decoded
    once for all of them (a run's raw iterate and its averages)."""
    for model in models.values():
        model.eval()
    logits: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    labels = []
    for x, y in loader:
        x = to_input(x, device, channels_last)
        for name, model in models.items():
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits[name].append(model(x).float().cpu())
        labels.append(y)
    all_labels = torch.cat(labels)
    return {name: (torch.cat(out), all_labels) for name, out in logits.items()}


def bn_batches(loader, device, channels_last):
    for x, _ in loader:
        yield to_input(x, device, channels_last)


def gather_logits(dist, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every process's share of a split (rank r holds records r, r + world, …) back in manifest order, on
    every process; a single process returns its own."""
    if not dist.enabled:
        return logits, labels
    parts = all_gather_objects(dist, (logits.numpy(), labels.numpy()))
    n = sum(len(p[1]) for p in parts)
    all_logits = np.empty((n, logits.shape[1]), np.float32)
    all_labels = np.empty(n, np.int64)
    for rank, (lg, lb) in enumerate(parts):
        all_logits[rank:: dist.world] = lg
        all_labels[rank:: dist.world] = lb
    return torch.from_numpy(all_logits), torch.from_numpy(all_labels)


def split_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Cross-entropy plus the classification metrics (accuracy, top-5, macro precision/recall/F1)."""
    return {"loss": float(F.cross_entropy(logits, labels)), **classification_metrics(labels.numpy(), logits.numpy())}


def torch_logits(run_dir: Path, data: Path, split: str, batch_size: int, device: str = "auto"):
    """``dogkit eval --backend torch``: a run's best.pt on a split or a class-folder tree, in fp32 with no
    autocast (the reference the ONNX model is compared with); logits, labels and class names as numpy, and the
    files set aside (a class-folder tree's unusable images, with their reasons)."""
    from ..deploy.evaluate import load_eval_data
    from ..deploy.preprocess import PreprocessSpec
    from .checkpoint import load_best
    from .device import resolve_device
    from .loaders import ManifestImages, make_loader
    from .transforms import make_transform

    model, ckpt, _ = load_best(run_dir)
    spec = PreprocessSpec.from_dict(ckpt["preprocess"])
    dataset, records, skipped = load_eval_data(data, split, ckpt["class_names"], spec.box_crop)
    torch_device = resolve_device(device)
    images = ManifestImages(dataset, records, make_transform(spec), spec.box_crop, orientation=spec.orients)
    loader = make_loader(images, batch_size, shuffle=False, workers=0)
    logits, labels = predict_logits(model.to(torch_device), loader, torch_device, None, channels_last=True)
    return logits.numpy(), labels.numpy(), ckpt["class_names"], skipped
