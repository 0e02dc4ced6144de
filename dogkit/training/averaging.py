"""Averaged Adam (Dereich, Jentzen, Riekert, arXiv:2501.06081): averaged side copies of the Adam iterate.

Adam optimises the raw weights θ_n at a constant learning rate and is never touched; after every
optimizer step the raw weights are folded into copies used only for evaluation and export:

- ``P``, made at the end of every epoch (every ``period`` steps), so at the run's last step however it ends
  (planned, early-stopped, extended on resume): **the mean of the last M iterates taken** (all of them while
  fewer were taken), exactly so whenever they were all taken within the last M + R steps. A step the
  optimizer skips (the fp16 GradScaler found inf/nan gradients) is no iterate and moves the window one step
  back; R (``reserve``) is how many such skips a window absorbs, and without a GradScaler no step is skipped.
  Beyond R skips P is the mean of fewer, M′ < M, of the latest iterates; ``p_range`` and ``p_count`` always
  say which. The iterates are kept as running means of *chunks* cut at every epoch end's window start (and
  the R steps before it): one fold per step, and at an end P is the count-weighted mean of its window's
  chunks. The cuts are a pure function of (M, period, R) — not of the planned length, so stopping early or
  training on changes nothing — at most ``chunk_bound`` copies, refused beyond ``max_chunks``.
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

STATE_FORMAT = 5
RESERVE = 2  # skipped steps a window absorbs under the fp16 GradScaler (fewer when the copies would not fit)
MAX_CHUNKS = 64  # copies of the weights P's windows may hold at once (besides P and the EMAs)


def ema_name(decay: float) -> str:
    return f"G{decay:g}"


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach() for p in module.parameters()]


def chunk_bound(window: int, period: int, reserve: int) -> int:
    """The most chunks alive at once: the cuts in a span of M + R steps (R + 1 of them an epoch), and one more."""
    return math.ceil((window + reserve) / period) * min(reserve + 1, period) + 1


def plan(window: int, period: int, reserve: int, max_chunks: int = MAX_CHUNKS) -> int:
    """The largest skip reserve R ≤ ``reserve`` whose chunks fit in ``max_chunks``; ValueError when not even R = 0
    fits (a window spanning more epochs than there may be copies of the weights)."""
    for r in range(reserve, -1, -1):
        if chunk_bound(window, period, r) <= max_chunks:
            return r
    raise ValueError(f"avg_window (M = {window}) spans {math.ceil(window / period)} epochs of {period} steps: P would "
                     f"keep {chunk_bound(window, period, 0)} copies of the weights, more than {max_chunks}; set "
                     f"avg_window to at most {(max_chunks - 1) * period}, or train with more steps an epoch")


def is_cut(step: int, window: int, period: int, reserve: int) -> bool:
    """Does the iterate of global step ``step`` start a chunk: is step + M − 1 + j an epoch's end for a j in 0..R?"""
    return (step + window - 1 + reserve) % period <= reserve


@dataclass
class Chunk:
    """The running mean of consecutive iterates ``first`` .. ``first + count − 1`` (counted in steps taken),
    taken at global steps ``g_first`` .. ``g_last``."""
    first: int
    count: int
    g_first: int
    g_last: int
    mean: list[torch.Tensor]


class Averager:
    """All averages of one training trajectory. Call ``update(model)`` after every optimizer step taken and
    ``skip()`` after one the optimizer skipped.

    ``period``: the steps of an epoch, at whose end P is made (default M). ``reserve``: the skipped steps a window
    absorbs (R; fewer when the chunks would not fit in ``max_chunks``: ``self.reserve`` says how many).
    """

    def __init__(self, model: nn.Module, window: int = 1000, ema_decays: Sequence[float] = (0.99, 0.999),
                 period: int | None = None, reserve: int = 0, max_chunks: int = MAX_CHUNKS):
        if window < 1:
            raise ValueError(f"the averaging window M must be >= 1, got {window}")
        if period is not None and period < 1:
            raise ValueError(f"the steps of an epoch must be >= 1, got {period}")
        self.source = model
        self.window = window  # M
        self.period = period or window
        self.reserve = plan(window, self.period, reserve, max_chunks)
        self.steps = 0  # optimizer steps taken (iterates folded in) so far
        self.attempts = 0  # optimizer steps so far, skipped ones included: the run's global step
        self.chunks: list[Chunk] = []
        self.pending_cut = False  # the next iterate starts a chunk (a skipped step was to start one)
        self.p_range: tuple[int, int] | None = None  # global steps (first, last) of the iterates P averages
        self.p_count = 0  # how many iterates that is (fewer than last − first + 1 when steps were skipped)
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
        """The averages that average something now: P only once it has been made at an epoch's end."""
        return [n for n in self.names if n != "P" or self.p_range is not None]

    # -- steps
    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.steps += 1
        self.attempts += 1
        theta = _params(model)
        for name, decay in self.decays.items():
            torch._foreach_lerp_(self._lists[name], theta, 1.0 - decay)  # γ·θ̃ + (1−γ)·θ in one launch
        if not self.chunks or self.pending_cut or is_cut(self.attempts, self.window, self.period, self.reserve):
            self.pending_cut = False
            self.chunks.append(Chunk(self.steps, 1, self.attempts, self.attempts, [t.clone() for t in theta]))
        else:
            c = self.chunks[-1]
            c.count += 1  # running mean: μ_k = μ_{k−1} + (θ − μ_{k−1})/k
            torch._foreach_lerp_(c.mean, theta, 1.0 / c.count)
            c.g_last = self.attempts
        self._after_step()

    def skip(self) -> None:
        """A step the optimizer did not take: no iterate. A chunk it was to start starts with the next iterate."""
        self.attempts += 1
        self.pending_cut = self.pending_cut or is_cut(self.attempts, self.window, self.period, self.reserve)
        self._after_step()

    def _after_step(self) -> None:
        if self.attempts % self.period == 0:
            self.publish()
        self._prune()

    def _prune(self) -> None:
        """Drop the chunks that end before the next end's window and its reserve: no coming window reaches them."""
        first = (self.attempts // self.period + 1) * self.period - self.window + 1 - self.reserve
        self.chunks = [c for c in self.chunks if c.g_last >= first]

    @torch.no_grad()
    def publish(self) -> None:
        """Make P the mean of the last M iterates taken (every one while fewer were taken): the chunks from the one
        that starts there — or, after more skips than the reserve, the first after it — to the latest. With no
        iterate taken in the window's M steps, P stays as it was."""
        want = max(1, self.steps - self.window + 1)
        start = next((i for i, c in enumerate(self.chunks) if c.first >= want), None)
        if start is None:
            return
        total = 0
        for c in self.chunks[start:]:
            total += c.count
            if total == c.count:
                torch._foreach_copy_(self._lists["P"], c.mean)
            else:  # count-weighted mean of chunk means, folded in one at a time
                torch._foreach_lerp_(self._lists["P"], c.mean, c.count / total)
        self.p_range = (self.chunks[start].g_first, self.chunks[-1].g_last)
        self.p_count = total

    # -- the averages
    def model(self, name: str) -> nn.Module:
        """The averaged network ``name`` ('P' or 'G0.99', …) — a plain module, sharing no storage with the raw one.

        Its buffers (BatchNorm statistics) are set to the raw model's; ``prepare_for_eval`` recomputes them.
        """
        if name == "P" and self.p_range is None:
            raise ValueError("P averages nothing yet: it is made at the first epoch's end after a step taken")
        net = self.copies[name]
        with torch.no_grad():
            for dst, src in zip(net.buffers(), self.source.buffers(), strict=True):
                dst.copy_(src)
        return net

    def describe(self, name: str) -> str:
        """What an average is, in words, for logs and reports."""
        if name == "P":
            if self.p_range is None:
                return "P: not made yet (no epoch ended after a step taken)"
            first, last = self.p_range
            return f"P: mean of the {self.p_count} iterates of steps {first}–{last}"
        return f"{name}: EMA with γ = {self.decays[name]:g} over steps 0–{self.attempts}"

    def state_dict(self) -> dict:
        def params(m: nn.Module) -> dict:  # buffers are the raw model's, saved with it
            return {k: p.detach() for k, p in m.named_parameters()}

        names = [k for k, _ in self.copies["P"].named_parameters()]
        return {
            "format": STATE_FORMAT, "window": self.window, "steps": self.steps, "attempts": self.attempts,
            "pending_cut": self.pending_cut, "p_range": list(self.p_range) if self.p_range else None,
            "p_count": self.p_count,
            "chunks": [{"first": c.first, "count": c.count, "g_first": c.g_first, "g_last": c.g_last,
                        "mean": dict(zip(names, c.mean, strict=True))} for c in self.chunks],
            "published": params(self.copies["P"]), "emas": {k: params(self.copies[k]) for k in self.decays},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue saved averages. The cuts to come are this Averager's (the same plan unless the steps of an epoch
        changed: another number of processes); averages saved by an older dogkit are refused."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"they were saved by an older dogkit (averages format {state.get('format')}; this one "
                             f"reads {STATE_FORMAT}) and cannot be continued")
        emas = set(state["emas"])
        if state["window"] != self.window or emas != set(self.decays):
            raise ValueError(f"checkpoint averages (M={state['window']}, {sorted(emas)}) differ from this "
                             f"run's (M={self.window}, {sorted(self.decays)})")
        self.steps, self.attempts = int(state["steps"]), int(state["attempts"])
        self.pending_cut = bool(state["pending_cut"])
        self.p_range = tuple(state["p_range"]) if state["p_range"] else None
        self.p_count = int(state["p_count"])
        like = list(zip([k for k, _ in self.copies["P"].named_parameters()], self._lists["P"], strict=True))
        self.chunks = [Chunk(int(c["first"]), int(c["count"]), int(c["g_first"]), int(c["g_last"]),
                             [c["mean"][n].to(t.device, t.dtype).clone() for n, t in like]) for c in state["chunks"]]
        with torch.no_grad():
            for module, params in ((self.copies["P"], state["published"]),
                                   *((self.copies[k], state["emas"][k]) for k in self.decays)):
                for name, p in module.named_parameters():
                    p.copy_(params[name])
        self._prune()


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
