"""A PyTorch network on a split: logits and labels in manifest order, and the metrics dogkit reports."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..analysis.metrics import classification_metrics
from .device import to_input
from .distributed import all_gather_objects


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
