"""A PyTorch network on a split: logits and labels in manifest order, and the metrics dogkit reports."""

from __future__ import annotations

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
