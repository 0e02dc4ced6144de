"""Averaged Adam (Dereich, Jentzen, Riekert, arXiv:2501.06081): averaged side copies of the Adam iterate.

Adam optimises the raw weights θ_n at a constant learning rate and is never touched; after every
optimizer step the raw weights are folded into copies used only for evaluation and export:

- ``P`` (window mean of M iterates): at every *end* — every ``period`` steps, the end of each epoch in
  training, and always the run's last planned step — P becomes the mean of the last M iterates taken
  (all of them while fewer than M were taken; never θ_0 passed off as an average). A run can stop at
  any end (early stopping) or go on past its planned length (more epochs on resume) and its final P is
  still its last M iterates. The iterates are kept as running means of *chunks*, cut where some end's
  window will start: one fold per step whatever the overlap of the windows, and at an end P is the
  count-weighted mean of the chunks of its window (one pass over a few copies, once per end). Windows
  longer than many epochs would need many chunks: memory is bounded by ``max_chunks`` copies, and
  beyond it only every k-th epoch end is an end (``conclude`` then averages from the cut nearest to the
  last M iterates; ``p_range`` and ``p_count`` always say what P holds). A step the optimizer skips (the
  fp16 GradScaler found inf/nan gradients) is no iterate, so a window reaches one step further back;
  for the planned last step ``reserve`` single iterates are kept before its window so that it still
  holds exactly the last M iterates taken (up to ``reserve`` skips in its last M + ``reserve`` steps).
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
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

STATE_FORMAT = 4
RESERVE = 4  # single iterates kept before the planned last window, for skipped steps that move it earlier
MAX_CHUNKS = 12  # copies of the weights the P windows may hold at once (besides P and the EMAs)


def ema_name(decay: float) -> str:
    return f"G{decay:g}"


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach() for p in module.parameters()]


@dataclass
class Chunk:
    """The running mean of consecutive iterates ``first`` .. ``first + count − 1`` (counted in steps taken),
    taken at global steps ``g_first`` .. ``g_last``."""
    first: int
    count: int
    g_first: int
    g_last: int
    mean: list[torch.Tensor]


def plan(window: int, period: int, reserve: int, max_chunks: int) -> tuple[int, int]:
    """(epochs between ends k, reserve) so that the chunks alive at once stay within ``max_chunks``.

    A window of M steps meets at most ⌈M/p⌉ + 1 cuts of the ends every p steps, plus the planned last window's
    reserve and the chunk it starts in. The reserve gives way first (it serves fp16 skips only), then ends thin.
    """
    def alive(k: int, r: int) -> int:
        return math.ceil(window / (k * period)) + 2 + r

    reserve = max(0, min(reserve, max_chunks - alive(1, 0)))
    k = max(1, math.ceil(window / (period * max(1, max_chunks - 2 - reserve))))
    while alive(k, reserve) > max_chunks:
        k += 1
    return k, reserve


class Averager:
    """All averages of one training trajectory. Call ``update(model)`` after every optimizer step taken and
    ``skip(model)`` after one the optimizer skipped.

    ``period``: steps between ends (the steps of an epoch; default M). ``total_steps``: the run's planned length
    N, always an end (the ends are aligned on it) and the one end whose window has ``reserve`` kept.
    """

    def __init__(self, model: nn.Module, window: int = 1000, ema_decays: Sequence[float] = (0.99, 0.999),
                 total_steps: int | None = None, period: int | None = None, reserve: int = RESERVE,
                 max_chunks: int = MAX_CHUNKS):
        if window < 1:
            raise ValueError(f"the averaging window M must be >= 1, got {window}")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if period is not None and period < 1:
            raise ValueError(f"the period between ends must be >= 1 step, got {period}")
        if max_chunks < 3:
            raise ValueError(f"max_chunks must be >= 3, got {max_chunks}")
        self.source = model
        self.window = window  # M
        self.period = period or window  # as asked for; ends are every `every` periods
        self.total_steps = total_steps
        self.every, self.reserve = plan(window, self.period, reserve if total_steps else 0, max_chunks)
        self.steps = 0  # optimizer steps taken (iterates folded in) so far
        self.attempts = 0  # optimizer steps so far, skipped ones included: the run's global step
        self.chunks: list[Chunk] = []
        self.pending_cut = False  # the next iterate starts a chunk (a skipped step was to start one)
        self.p_range: tuple[int, int] | None = None  # global steps (first, last) of the iterates P averages
        self.p_count = 0  # how many iterates that is (fewer than last − first + 1 when steps were skipped)
        self.published_at = 0  # the global step P was last made at
        self.decays = {ema_name(d): float(d) for d in ema_decays}
        self.copies: dict[str, nn.Module] = {}
        for name in ["P", *self.decays]:
            self.copies[name] = self._copy(model)
        self._lists = {name: _params(m) for name, m in self.copies.items()}

    @staticmethod
    def _copy(model: nn.Module) -> nn.Module:
        # deepcopy of the module gives θ̃_0 = θ_0 for every EMA; P is overwritten before use.
        m = copy.deepcopy(model)
        for p in m.parameters():
            p.requires_grad_(False)
        return m

    @property
    def names(self) -> list[str]:
        """Every average this run keeps (P first)."""
        return ["P", *self.decays]

    def ready(self) -> list[str]:
        """The averages that average something now: P only once it has been made at an end."""
        return [n for n in self.names if n != "P" or self.p_range is not None]

    # -- where the ends and the cuts are
    def _span_phase(self) -> tuple[int, int]:
        """Steps between ends, and the ends' remainder (aligned on the planned last step)."""
        span = self.period * self.every
        return span, (self.total_steps % span if self.total_steps else 0)

    def is_end(self, step: int) -> bool:
        span, phase = self._span_phase()
        return (step >= 1 and (step - phase) % span == 0) or step == self.total_steps

    def _next_end(self, after: int) -> int:
        span, phase = self._span_phase()
        end = after + 1 + (phase - after - 1) % span
        return min(end, self.total_steps) if self.total_steps and self.total_steps > after else end

    def _is_cut(self, step: int) -> bool:
        """Does the iterate of global step ``step`` start a window? With no more skips, the window of an end E
        starts at the iterate taken at E − M + 1; the planned last one keeps ``reserve`` more before it."""
        start_of = step + self.window - 1  # the end whose window this iterate starts
        n = self.total_steps
        return self.is_end(start_of) or (n is not None and start_of <= n <= start_of + self.reserve)

    # -- steps
    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.steps += 1
        self.attempts += 1
        theta = _params(model)
        for name, decay in self.decays.items():
            torch._foreach_lerp_(self._lists[name], theta, 1.0 - decay)  # γ·θ̃ + (1−γ)·θ in one launch
        if not self.chunks or self.pending_cut or self._is_cut(self.attempts):
            self.pending_cut = False
            self.chunks.append(Chunk(self.steps, 1, self.attempts, self.attempts, [t.clone() for t in theta]))
        else:
            c = self.chunks[-1]
            c.count += 1  # running mean: μ_k = μ_{k−1} + (θ − μ_{k−1})/k
            torch._foreach_lerp_(c.mean, theta, 1.0 / c.count)
            c.g_last = self.attempts
        self._after_step()

    @torch.no_grad()
    def skip(self, model: nn.Module) -> None:
        """A step the optimizer did not take: no iterate. The model still holds the last iterate taken."""
        self.attempts += 1
        # A window was to start with this step's iterate: it starts with the next one taken (one iterate short).
        self.pending_cut = self.pending_cut or self._is_cut(self.attempts)
        self._after_step()

    def _after_step(self) -> None:
        if self.is_end(self.attempts):
            self.publish()
        self._prune()

    def _prune(self) -> None:
        """Drop the chunks no coming window reaches: those ending before the next end's window starts (or the
        planned last one's reserve, when that starts earlier)."""
        def start(end: int) -> int:  # where the window of `end` starts, if no more steps are skipped
            return self.steps + (end - self.attempts) - self.window + 1

        first = start(self._next_end(self.attempts))
        if self.total_steps is not None and self.total_steps > self.attempts:
            first = min(first, start(self.total_steps) - self.reserve)
        while len(self.chunks) > 1 and self.chunks[1].first <= first:
            self.chunks.pop(0)

    @torch.no_grad()
    def publish(self) -> None:
        """Make P the mean of the last M iterates taken (every iterate while there are fewer): from the chunk that
        starts nearest to them (exactly at them unless more steps were skipped than kept), to the latest."""
        if not self.chunks:
            return  # no iterate yet
        want = max(1, self.steps - self.window + 1)
        start = min(range(len(self.chunks)), key=lambda i: (abs(self.chunks[i].first - want), -i))
        total = 0
        for c in self.chunks[start:]:
            total += c.count
            if c is self.chunks[start]:
                torch._foreach_copy_(self._lists["P"], c.mean)
            else:  # count-weighted mean of chunk means, folded in one at a time
                torch._foreach_lerp_(self._lists["P"], c.mean, c.count / total)
        self.p_range = (self.chunks[start].g_first, self.chunks[-1].g_last)
        self.p_count = total
        self.published_at = self.attempts

    def conclude(self) -> None:
        """The run stops here (early stopping): P made now if this step is not an end."""
        if self.published_at != self.attempts:
            self.publish()

    # -- the averages
    def model(self, name: str) -> nn.Module:
        """The averaged network ``name`` ('P' or 'G0.99', …) — a plain module, sharing no storage with the raw one.

        Its buffers (BatchNorm statistics) are set to the raw model's; ``prepare_for_eval`` recomputes them.
        """
        if name == "P" and self.p_range is None:
            raise ValueError("P averages nothing yet: it is made at the first end (epoch) after a step taken")
        net = self.copies[name]
        with torch.no_grad():
            for dst, src in zip(net.buffers(), self.source.buffers(), strict=True):
                dst.copy_(src)
        return net

    def describe(self, name: str) -> str:
        """What an average is, in words, for logs and reports."""
        if name == "P":
            if self.p_range is None:
                return "P: not made yet (no end reached after a step taken)"
            first, last = self.p_range
            return f"P: mean of the {self.p_count} iterates of steps {first}–{last}"
        return f"{name}: EMA with γ = {self.decays[name]:g} over steps 0–{self.attempts}"

    def state_dict(self) -> dict:
        def params(m: nn.Module) -> dict:  # buffers are the raw model's, saved with it
            return {k: p.detach() for k, p in m.named_parameters()}

        names = [k for k, _ in self.copies["P"].named_parameters()]
        return {
            "format": STATE_FORMAT, "steps": self.steps, "attempts": self.attempts, "window": self.window,
            "total_steps": self.total_steps, "p_range": list(self.p_range) if self.p_range else None,
            "p_count": self.p_count, "published_at": self.published_at, "pending_cut": self.pending_cut,
            "chunks": [{"first": c.first, "count": c.count, "g_first": c.g_first, "g_last": c.g_last,
                        "mean": dict(zip(names, c.mean, strict=True))} for c in self.chunks],
            "published": params(self.copies["P"]), "emas": {k: params(self.copies[k]) for k in self.decays},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue saved averages. The run may have been given more epochs: its ends come from this Averager's
        plan. Averages saved by dogkit before chunks (formats 2, 3) continue from their running block."""
        emas = set(state["emas"])
        if state["window"] != self.window or emas != set(self.decays):
            raise ValueError(f"checkpoint averages (M={state['window']}, {sorted(emas)}) differ from this "
                             f"run's (M={self.window}, {sorted(self.decays)})")
        fmt = state.get("format")
        if fmt not in (2, 3, STATE_FORMAT):
            raise ValueError("these averages were saved by an older dogkit (P published at multiples of M); "
                             "they cannot be continued exactly")
        self.steps = int(state["steps"])
        self.attempts = int(state.get("attempts", self.steps))
        self.p_range = tuple(state["p_range"]) if state["p_range"] else None
        reference = self._lists["P"]
        names = [k for k, _ in self.copies["P"].named_parameters()]
        if fmt == STATE_FORMAT:
            self.p_count = int(state["p_count"])
            self.published_at = int(state["published_at"])
            self.pending_cut = bool(state["pending_cut"])
            saved = [(c["first"], c["count"], c["g_first"], c["g_last"], c["mean"]) for c in state["chunks"]]
        else:  # the running block is the last chunk when it holds the latest iterates
            self.p_count = self.p_range[1] - self.p_range[0] + 1 if self.p_range else 0
            self.published_at = self.p_range[1] if self.p_range else 0
            filled = int(state["filled"]) if fmt == 3 else 0
            last = int(state["last"]) if fmt == 3 else 0
            saved = ([(self.steps - filled + 1, filled, int(state["first"]), last, state["block"])]
                     if filled and last == int(state.get("latest", self.steps)) else [])
        self.chunks = [Chunk(int(first), int(count), int(g_first), int(g_last),
                             [mean[n].to(t.device, t.dtype).clone() for n, t in zip(names, reference, strict=True)])
                       for first, count, g_first, g_last, mean in saved]
        with torch.no_grad():
            for module, params in ((self.copies["P"], state["published"]),
                                   *((self.copies[k], state["emas"][k]) for k in self.decays)):
                for name, p in module.named_parameters():
                    p.copy_(params[name])
        self._prune()


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
