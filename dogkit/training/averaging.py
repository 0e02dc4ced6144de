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
  never kept), and ``p_range`` says which it is. A step the optimizer skips (the fp16 GradScaler
  found inf/nan gradients) is no iterate, so the run is one iterate shorter and the last block moves
  one step earlier; the ``reserve`` iterates just before the last block are kept so that it still
  holds the last M iterates taken (exactly, up to ``reserve`` skips in the last M + ``reserve`` steps).
  ``p_range`` counts the run's global steps, skipped ones included.
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

STATE_FORMAT = 3
RESERVE = 4  # iterates kept just before the last block, for the skipped steps that move it earlier


def ema_name(decay: float) -> str:
    return f"G{decay:g}"


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach() for p in module.parameters()]


class Averager:
    """All averages of one training trajectory. Call ``update(model)`` after every optimizer step taken and
    ``skip(model)`` after one the optimizer skipped.

    ``total_steps``: the number of updates the run will make (N). With it the last P block ends at
    step N; without it blocks end at multiples of M.
    """

    def __init__(self, model: nn.Module, window: int = 1000, ema_decays: Sequence[float] = (0.99, 0.999),
                 total_steps: int | None = None, reserve: int = RESERVE):
        if window < 1:
            raise ValueError(f"the averaging window M must be >= 1, got {window}")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.source = model
        self.window = window  # M as asked for
        self.total_steps = total_steps  # iterates the run will have: planned steps less the skipped ones
        self.block_size, self.offset = self._plan(window, total_steps)
        self.skip_until = 0  # after a change of plan: the steps up to here belong to no block
        self.steps = 0  # optimizer steps taken (iterates folded in) so far
        self.attempts = 0  # optimizer steps so far, skipped ones included: the run's global step
        self.latest = 0  # the global step of the last step taken
        # The running block: `filled` iterates, the last `filled` steps taken. It stays complete (filled == block
        # size) until the next step starts a new one.
        self.filled = 0
        self.first = self.last = 0  # global steps of the running block's first and last iterates
        self.reserve = reserve
        self.kept: list[tuple[int, int, list[torch.Tensor]]] = []  # (step, global step, θ) before the last block
        self.p_range: tuple[int, int] | None = None  # global steps (first, last) the published P averages
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

    def _wanted(self) -> int:
        """Iterates the plan's block holding the current step has so far (1..size), 0 when the step is in none."""
        if self.steps <= max(self.offset, self.skip_until):
            return 0
        return (self.steps - self.offset - 1) % self.block_size + 1

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

    def _fold(self, theta: list[torch.Tensor], global_step: int) -> None:
        """Add one iterate to the running block (starting a new block after a complete one)."""
        if self.filled in (0, self.block_size):
            torch._foreach_copy_(self._block_list, theta)
            self.filled, self.first = 1, global_step
        else:
            self.filled += 1  # running mean: μ_k = μ_{k−1} + (θ − μ_{k−1})/k
            torch._foreach_lerp_(self._block_list, theta, 1.0 / self.filled)
        self.last = global_step

    def _publish_if_complete(self) -> None:
        if self.filled == self.block_size:
            torch._foreach_copy_(self._lists["P"], self._block_list)
            self.p_range = (self.first, self.last)

    def _keep(self, theta: list[torch.Tensor]) -> None:
        """Keep θ if it is one of the ``reserve`` iterates just before the last block (as planned now)."""
        if not self.reserve or self.total_steps is None:
            return
        last_start = self.total_steps - self.block_size + 1
        if last_start - self.reserve <= self.steps < last_start:
            self.kept = [k for k in self.kept if k[0] >= self.steps - self.reserve + 1]
            self.kept.append((self.steps, self.attempts, [t.clone() for t in theta]))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.steps += 1
        self.attempts += 1
        self.latest = self.attempts
        theta = _params(model)
        for name, decay in self.decays.items():
            torch._foreach_lerp_(self._lists[name], theta, 1.0 - decay)  # γ·θ̃ + (1−γ)·θ in one launch
        self._keep(theta)
        if self._wanted() == 0:
            return
        self._fold(theta, self.attempts)
        self._publish_if_complete()

    @torch.no_grad()
    def skip(self, model: nn.Module) -> None:
        """A step the optimizer did not take: no iterate, so the planned run is one iterate shorter and its last
        block ends one step earlier. The model still holds the last iterate taken."""
        self.attempts += 1
        if self.total_steps is None or self.total_steps <= self.steps:
            return  # blocks at multiples of M count the steps taken; or the plan has no step left to lose
        self.total_steps -= 1
        self._replan(current=_params(model))

    def _replan(self, current: list[torch.Tensor] | None = None) -> None:
        """Make the running block the one the plan (changed: a skipped step, a longer run on resume) has in
        progress: extended back with kept iterates (and ``current``, the latest) where the new block starts
        earlier, or dropped when it no longer lines up; then the rest of the new block belongs to no block."""
        old_size = self.block_size
        self.block_size, self.offset = self._plan(self.window, self.total_steps)
        # A stretch that belonged to no block was the rest of the old plan's block: it is re-decided below.
        self.skip_until = min(self.skip_until, self.steps - 1)
        want = self._wanted()
        open_ = 0 if self.filled == old_size else self.filled  # iterates of a block still in progress
        if want == open_ or (want == self.filled == self.block_size):
            return  # the same block as before (or the same completed one)
        have = {step: (g, theta) for step, g, theta in self.kept}
        if current is not None:
            have.setdefault(self.steps, (self.latest, current))  # the last step taken, still in the model
        missing = range(self.steps - want + 1, self.steps - open_ + 1)
        if want > open_ and all(step in have for step in missing):
            self.filled = open_
            for step in reversed(missing):  # back in time: the order of the terms of a mean does not matter
                g, theta = have[step]
                if self.filled == 0:
                    torch._foreach_copy_(self._block_list, theta)
                    self.last = g
                else:
                    torch._foreach_lerp_(self._block_list, theta, 1.0 / (self.filled + 1))
                self.filled += 1
                self.first = g
            self._publish_if_complete()
            return
        self.filled = 0
        if want:
            self.skip_until = self.steps + self.block_size - want

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
        return f"{name}: EMA with γ = {self.decays[name]:g} over steps 0–{self.attempts}"

    def state_dict(self) -> dict:
        def params(m: nn.Module) -> dict:  # buffers are the raw model's, saved with it
            return {k: p.detach() for k, p in m.named_parameters()}

        return {
            "format": STATE_FORMAT, "steps": self.steps, "attempts": self.attempts, "latest": self.latest,
            "window": self.window,
            "total_steps": self.total_steps, "skip_until": self.skip_until, "filled": self.filled,
            "first": self.first, "last": self.last, "p_range": list(self.p_range) if self.p_range else None,
            "kept": [[step, g, theta] for step, g, theta in self.kept],
            "published": params(self.copies["P"]), "block": params(self.block),
            "emas": {k: params(self.copies[k]) for k in self.decays},
        }

    def load_state_dict(self, state: dict) -> None:
        emas = set(state["emas"])
        if state["window"] != self.window or emas != set(self.decays):
            raise ValueError(f"checkpoint averages (M={state['window']}, {sorted(emas)}) differ from this "
                             f"run's (M={self.window}, {sorted(self.decays)})")
        if state.get("format") not in (2, STATE_FORMAT):
            raise ValueError("these averages were saved by an older dogkit (P published at multiples of M); "
                             "they cannot be continued exactly")
        planned = self.total_steps  # this run's length; the saved plan may be shorter (more epochs on resume)
        self.steps = int(state["steps"])
        self.skip_until = int(state["skip_until"])
        self.total_steps = state["total_steps"]
        self.block_size, self.offset = self._plan(self.window, self.total_steps)
        if state["format"] == 2:  # no skipped steps then; the running block followed from the plan
            self.attempts = self.latest = self.steps
            self.filled = self._wanted()
            self.first, self.last = self.steps - self.filled + 1, self.steps
            self.kept = []
        else:
            self.attempts, self.latest = int(state["attempts"]), int(state["latest"])
            self.filled = int(state["filled"])
            self.first, self.last = int(state["first"]), int(state["last"])
            self.kept = [(int(step), int(g), list(theta)) for step, g, theta in state["kept"]]
        self.p_range = tuple(state["p_range"]) if state["p_range"] else None
        with torch.no_grad():
            for module, saved in ((self.copies["P"], state["published"]), (self.block, state["block"]),
                                  *((self.copies[k], state["emas"][k]) for k in self.decays)):
                for name, p in module.named_parameters():
                    p.copy_(saved[name])
        if planned is not None and state["total_steps"] is not None and planned != state["total_steps"]:
            # A longer run than planned: the new last window ends on the new last step, less the steps it skipped.
            self.total_steps = planned - (self.attempts - self.steps)
            self._replan()


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
