"""Averaged Adam (Dereich, Jentzen, Riekert, arXiv:2501.06081): averaged side copies of the Adam iterate.

Adam optimises the raw weights θ_n at a constant learning rate and is never touched; after every
optimizer step the raw weights are folded into copies used only for evaluation and export:

- ``P`` (window mean of M iterates, published per block): a running mean over each block of M steps
  becomes the published average when the block completes. When the run's length N is known, the
  blocks are aligned to end at N, so the final P is exactly the mean of θ_{N−M+1}..θ_N whatever
  N mod M is; the first N mod M steps belong to no block. Between blocks P is the last completed
  block (``p_range`` names its steps); before the first block completes there is no P at all
  (never θ_0 passed off as an average). A run shorter than M averages all its N iterates. A run
  extended on resume (more epochs) re-aligns its blocks to the new last step; only when it is extended
  by less than M steps after a completed block can the final P not be its last M iterates (they were
  never kept), and ``p_range`` says which it is.
- ``G<γ>`` (geometric / EMA): θ̃_0 = θ_0, θ̃_n = γ θ̃_{n−1} + (1−γ) θ_n, no bias correction.

The copies are plain modules updated with multi-tensor ``torch._foreach_*`` kernels: one launch per
average per step, instead of one per tensor (``swa_utils.AveragedModel`` also copies every buffer
and synchronises with the device on each call, which halved training throughput on a GPU).
Buffers are not averaged: a copy's BatchNorm buffers are the raw model's (copied when the copy is
handed out, integer ``num_batches_tracked`` included), and ``prepare_for_eval`` recomputes its
BatchNorm statistics (as ``swa_utils.update_bn`` does) before it is evaluated.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from torch import nn

STATE_FORMAT = 2


def ema_name(decay: float) -> str:
    return f"G{decay:g}"


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach() for p in module.parameters()]


class Averager:
    """All averages of one training trajectory. Call ``update(model)`` after every optimizer step.

    ``total_steps``: the number of updates the run will make (N). With it the last P block ends at
    step N; without it blocks end at multiples of M.
    """

    def __init__(self, model: nn.Module, window: int = 1000, ema_decays: Sequence[float] = (0.99, 0.999),
                 total_steps: int | None = None):
        if window < 1:
            raise ValueError(f"the averaging window M must be >= 1, got {window}")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.source = model
        self.window = window  # M as asked for
        self.total_steps = total_steps
        self.block_size, self.offset = self._plan(window, total_steps)
        self.skip_until = 0  # after a change of plan: the steps up to here belong to no block
        self.steps = 0  # optimizer steps folded in so far
        self.p_range: tuple[int, int] | None = None  # steps (first, last) the published P averages
        self.decays = {ema_name(d): float(d) for d in ema_decays}
        self.copies: dict[str, nn.Module] = {}
        for name in ["P", *self.decays]:
            self.copies[name] = self._copy(model)
        self.block = self._copy(model)  # the running mean of the current block
        self._lists = {name: _params(m) for name, m in self.copies.items()}
        self._block_list = _params(self.block)

    @staticmethod
    def _plan(window: int, total_steps: int | None) -> tuple[int, int]:
        """(block size, offset): blocks run over steps offset+1 … offset+size, … and the last ends on total_steps.

        A run shorter than M has no full window: P then averages every iterate of the run."""
        size = min(window, total_steps) if total_steps else window
        return size, (total_steps % size if total_steps else 0)

    def _filled(self, block_size: int, offset: int) -> int:
        """Iterates in the block in progress after ``self.steps`` steps under a plan (0: none in progress)."""
        return 0 if self.steps <= offset else (self.steps - offset) % block_size

    @staticmethod
    def _copy(model: nn.Module) -> nn.Module:
        # deepcopy of the module gives θ̃_0 = θ_0 for every EMA; P and the block are overwritten before use.
        m = copy.deepcopy(model)
        for p in m.parameters():
            p.requires_grad_(False)
        return m

    @property
    def names(self) -> list[str]:
        """Every average this run keeps (P first)."""
        return ["P", *self.decays]

    def ready(self) -> list[str]:
        """The averages that average something now: P only once a block has completed."""
        return [n for n in self.names if n != "P" or self.p_range is not None]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.steps += 1
        theta = _params(model)
        for name, decay in self.decays.items():
            torch._foreach_lerp_(self._lists[name], theta, 1.0 - decay)  # γ·θ̃ + (1−γ)·θ in one launch
        if self.steps <= max(self.offset, self.skip_until):
            return
        k = (self.steps - self.offset - 1) % self.block_size + 1  # position in the current block, 1..M
        if k == 1:
            torch._foreach_copy_(self._block_list, theta)
        else:
            torch._foreach_lerp_(self._block_list, theta, 1.0 / k)  # running mean: μ_k = μ_{k−1} + (θ − μ_{k−1})/k
        if k == self.block_size:
            torch._foreach_copy_(self._lists["P"], self._block_list)
            self.p_range = (self.steps - self.block_size + 1, self.steps)

    def model(self, name: str) -> nn.Module:
        """The averaged network ``name`` ('P' or 'G0.99', …) — a plain module, sharing no storage with the raw one.

        Its buffers (BatchNorm statistics) are set to the raw model's; ``prepare_for_eval`` recomputes them.
        """
        if name == "P" and self.p_range is None:
            raise ValueError("P averages nothing yet: no block of M steps has completed")
        net = self.copies[name]
        with torch.no_grad():
            for dst, src in zip(net.buffers(), self.source.buffers(), strict=True):
                dst.copy_(src)
        return net

    def describe(self, name: str) -> str:
        """What an average is, in words, for logs and reports."""
        if name == "P":
            if self.p_range is None:
                return "P: no complete block yet"
            first, last = self.p_range
            return f"P: mean of the iterates of steps {first}–{last}"
        return f"{name}: EMA with γ = {self.decays[name]:g} over steps 0–{self.steps}"

    def state_dict(self) -> dict:
        def params(m: nn.Module) -> dict:  # buffers are the raw model's, saved with it
            return {k: p.detach() for k, p in m.named_parameters()}

        return {
            "format": STATE_FORMAT, "steps": self.steps, "window": self.window, "total_steps": self.total_steps,
            "skip_until": self.skip_until,
            "p_range": list(self.p_range) if self.p_range else None,
            "published": params(self.copies["P"]), "block": params(self.block),
            "emas": {k: params(self.copies[k]) for k in self.decays},
        }

    def load_state_dict(self, state: dict) -> None:
        emas = set(state["emas"])
        if state["window"] != self.window or emas != set(self.decays):
            raise ValueError(f"checkpoint averages (M={state['window']}, {sorted(emas)}) differ from this "
                             f"run's (M={self.window}, {sorted(self.decays)})")
        if state.get("format") != STATE_FORMAT:
            raise ValueError("these averages were saved by an older dogkit (P published at multiples of M); "
                             "they cannot be continued exactly")
        self.steps = int(state["steps"])
        self.skip_until = int(state["skip_until"])
        if state["total_steps"] != self.total_steps:
            # A longer run than planned (more epochs on resume): the new last window ends on the new last step.
            # The block in progress carries on only if the new plan puts the same iterates in it; otherwise the
            # steps up to the end of the new plan's current block belong to no block.
            saved = self._filled(*self._plan(self.window, state["total_steps"]))
            if self.steps <= self.skip_until:
                saved = -1  # nothing usable in progress
            filled = self._filled(self.block_size, self.offset)
            if filled and filled != saved:
                self.skip_until = self.steps + self.block_size - filled
        self.p_range = tuple(state["p_range"]) if state["p_range"] else None
        with torch.no_grad():
            for module, saved in ((self.copies["P"], state["published"]), (self.block, state["block"]),
                                  *((self.copies[k], state["emas"][k]) for k in self.decays)):
                for name, p in module.named_parameters():
                    p.copy_(saved[name])


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def frozen_batchnorm(model: nn.Module) -> list[str]:
    """Names of the BatchNorm layers a freeze schedule holds fixed now (weights that take no gradient).

    Freeze schedules only ever unfreeze, so such a layer was fixed for the whole run so far: its weights
    and statistics (training keeps it in eval mode) are the same in the raw model and in every average.
    """
    return [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.affine and not any(p.requires_grad for p in m.parameters())]


@torch.no_grad()
def prepare_for_eval(model: nn.Module, loader: Iterable | None, device: torch.device | str | None = None,
                     recompute_bn: bool = True, frozen: Iterable[str] = ()) -> nn.Module:
    """Recompute BatchNorm running statistics over ``loader`` (training images, eval transform), then eval mode.

    As ``swa_utils.update_bn`` does (a plain average over batches), except that the BatchNorm layers
    named in ``frozen`` keep their buffers and normalise with them during the pass, as they did in
    training, so the layers after them see the activations they were trained on. Skipped when the
    model has no BatchNorm to recompute.
    """
    return prepare_all_for_eval([model], loader, device, recompute_bn, frozen)[0]


@torch.no_grad()
def prepare_all_for_eval(models: Sequence[nn.Module], loader: Iterable | None,
                         device: torch.device | str | None = None, recompute_bn: bool = True,
                         frozen: Iterable[str] = ()) -> list[nn.Module]:
    """``prepare_for_eval`` for several networks in one pass over ``loader``: each batch is loaded once and
    fed to every network (every average of a run), instead of decoding the same images once per network."""
    frozen = set(frozen)
    momenta = {}
    for model in models:
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and name not in frozen:
                momenta[m] = m.momentum
    todo = [model for model in models if any(m in momenta for m in model.modules())]
    if recompute_bn and loader is not None and todo:
        for m in momenta:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
        for model in todo:
            model.train()
            for name in frozen:
                model.get_submodule(name).eval()
        for batch in loader:
            x = batch[0] if isinstance(batch, list | tuple) else batch
            x = x.to(device) if device is not None else x
            for model in todo:
                model(x)
        for m, momentum in momenta.items():
            m.momentum = momentum
    return [model.eval() for model in models]
