"""Averaged Adam (Dereich, Jentzen, Riekert, arXiv:2501.06081): averaged side copies of the Adam iterate.

Adam optimises the raw weights θ_n at a constant learning rate and is never touched; after every
optimizer step the raw weights are folded into copies used only for evaluation and export:

- ``P`` (window mean of the last M iterates, published per block): a running mean over each block of
  M steps becomes the published average at every multiple of M; before the first block ends it is θ_0.
- ``G<γ>`` (geometric / EMA): θ̃_0 = θ_0, θ̃_n = γ θ̃_{n−1} + (1−γ) θ_n, no bias correction.

Built from ``torch.optim.swa_utils.AveragedModel``. Buffers are not averaged (``use_buffers=False``
keeps each copy's BatchNorm buffers equal to the raw model's); ``prepare_for_eval`` recomputes the
BatchNorm statistics of an averaged copy with ``swa_utils.update_bn`` before it is evaluated.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn


def ema_name(decay: float) -> str:
    return f"G{decay:g}"


class Averager:
    """All averages of one training trajectory. Call ``update(model)`` after every optimizer step."""

    def __init__(self, model: nn.Module, window: int = 1000, ema_decays: Sequence[float] = (0.99, 0.999)):
        if window < 1:
            raise ValueError(f"the averaging window M must be >= 1, got {window}")
        self.window = window
        self.steps = 0  # optimizer steps folded in so far
        self.emas = {ema_name(d): AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(d)) for d in ema_decays}
        # P: block accumulator (AveragedModel's running mean) plus the published copy of the last full block.
        self.block = AveragedModel(model)
        self.published = copy.deepcopy(model)
        for m in (self.published, *self.emas.values()):
            for p in m.parameters():
                p.requires_grad_(False)
        # θ̃_0 = θ_0 for every EMA; the block accumulator starts empty (its next update copies).
        for ema in self.emas.values():
            ema.update_parameters(model)

    @property
    def names(self) -> list[str]:
        return ["P", *self.emas]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.steps += 1
        for ema in self.emas.values():
            ema.update_parameters(model)
        self.block.update_parameters(model)
        if self.steps % self.window == 0:
            for dst, src in zip(self.published.parameters(), self.block.module.parameters(), strict=True):
                dst.copy_(src)
            self.block.n_averaged.zero_()  # the next update starts a new block by copying
        # Keep the published copy's buffers in step with the raw model, as use_buffers=False does for the others.
        for dst, src in zip(self.published.buffers(), model.buffers(), strict=True):
            dst.copy_(src)

    def model(self, name: str) -> nn.Module:
        """The averaged network ``name`` ('P' or 'G0.99', …) — a plain module, sharing no storage with the raw one."""
        if name == "P":
            return self.published
        return self.emas[name].module

    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "window": self.window,
            "published": self.published.state_dict(),
            "block": self.block.state_dict(),
            "emas": {k: v.state_dict() for k, v in self.emas.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state["window"] != self.window or set(state["emas"]) != set(self.emas):
            raise ValueError(f"checkpoint averages (M={state['window']}, {sorted(state['emas'])}) differ from this "
                             f"run's (M={self.window}, {sorted(self.emas)})")
        self.steps = int(state["steps"])
        self.published.load_state_dict(state["published"])
        self.block.load_state_dict(state["block"])
        for k, v in self.emas.items():
            v.load_state_dict(state["emas"][k])


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def prepare_for_eval(model: nn.Module, loader: Iterable | None, device: torch.device | str | None = None,
                     recompute_bn: bool = True) -> nn.Module:
    """Recompute BatchNorm running statistics over ``loader`` (training images, eval transform), then eval mode.

    Skipped when BatchNorm is frozen during fine-tuning (its buffers never change) or the model has none.
    """
    if recompute_bn and loader is not None and has_batchnorm(model):
        update_bn(loader, model, device=device)
    return model.eval()
