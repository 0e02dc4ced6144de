"""A training run that SIGKILLs itself at a chosen point, for the kill-anywhere tests (tests/test_kill.py).

    python tests/killrun.py CONFIG.json [--kill POINT:N] [--skip-step K]    # a new run from a config
    python tests/killrun.py --resume RUN [--kill POINT:N] [--skip-step K] [--epochs E]   # resume it (E epochs)
    python tests/killrun.py --chain SEGMENTS.json    # several of those, each in a process forked from this one

``--chain`` runs a list of segments ({"config": …} or {"resume": …, "epochs": …}, with "kill", "skip_step" and
"ranks"), each in a child forked after dogkit and torch are imported, one after the other, and prints each one's
end as JSON ("killed", or the exit code), stopping after one that ends otherwise than its kill says: the same
processes as separate launches, without importing torch each time. "ranks": N runs the segment as N processes of
one gloo group, with torchrun's environment (RANK, WORLD_SIZE, MASTER_PORT …), each rank killing itself at the
point, and a rank that ends badly ending the others, as torchrun does.

POINT:N kills the process (SIGKILL: no handler, no clean-up, as a preemption or the OOM killer does) at the
N-th time it reaches POINT:
  step      after an optimizer step (inside an epoch)
  eval      inside an evaluation pass (validation or test), before its first network runs
  bn        inside the BatchNorm recompute of the averages
  test      inside the test, before its results are written
  save      halfway through writing a checkpoint (last.pt, best.pt or recovery.pt)
  recovery  just after a recovery checkpoint is written
``--skip-step K`` makes global step K an optimizer step the GradScaler skips: the CPU run gets a real
GradScaler and that step's gradients an inf, as fp16 overflow gives them.
The patches live here, not in dogkit: production code has no test hooks.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import traceback
from pathlib import Path

import torch


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def counter(point: str, target: tuple[str, int] | None):
    """A function that dies on the target's N-th call for its point."""
    seen = {"n": 0}

    def tick() -> None:
        if target is None or target[0] != point:
            return
        seen["n"] += 1
        if seen["n"] == target[1]:
            die()

    return tick


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", nargs="?", type=Path)
    parser.add_argument("--resume", type=Path)
    parser.add_argument("--kill")
    parser.add_argument("--skip-step", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--chain", type=Path)
    args = parser.parse_args()
    if args.chain:
        chain(json.loads(args.chain.read_text()))
    else:
        run(args.config, args.resume, args.kill, args.skip_step, args.epochs)


def chain(segments: list[dict]) -> None:
    import dogkit.training.trainer  # noqa: F401  (imported once, here; each child starts with it)

    for segment in segments:
        end = ranks_end(segment) if segment.get("ranks", 1) > 1 else status_end(os.waitpid(child(segment), 0)[1])
        print(json.dumps({"segment": segment, "end": end}), flush=True)
        if end != ("killed" if segment.get("kill") else 0):
            return  # the next segments would resume from the wrong place


def child(segment: dict, env: dict[str, str] | None = None) -> int:
    """The segment's run in a forked child (with ``env`` added to its environment); its pid."""
    pid = os.fork()
    if pid == 0:
        os.environ.update(env or {})
        code = 0
        try:
            run(segment.get("config"), segment.get("resume"), segment.get("kill"), segment.get("skip_step"),
                segment.get("epochs"))
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def status_end(status: int) -> str | int:
    return "killed" if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL else \
        os.waitstatus_to_exitcode(status)


def ranks_end(segment: dict) -> str | int:
    """The segment as ``segment["ranks"]`` processes of one gloo group, with the environment torchrun gives them;
    as under torchrun, the first rank to end otherwise than with 0 ends the others (SIGKILL), and is the end."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = segment["ranks"]
    common = {"WORLD_SIZE": str(ranks), "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(port)}
    pids = {child(segment, {**common, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(ranks)}
    end: str | int = 0
    while pids:
        pid, status = os.wait()
        pids.discard(pid)
        if end == 0 and status != 0:
            end = status_end(status)
            for other in pids:
                os.kill(other, signal.SIGKILL)
    return end


def run(config: Path | None, resume: Path | None, kill: str | None, skip_step: int | None,
        epochs: int | None) -> None:
    target = None
    if kill:
        point, _, n = kill.partition(":")
        target = (point, int(n))

    import dogkit.training.checkpoint as checkpoint
    import dogkit.training.loop as loop
    import dogkit.training.trainer as trainer_module
    from dogkit.training.config import load_config
    from dogkit.training.trainer import Trainer, train

    def wrap(module, name: str, point: str, after: bool = False):
        real = getattr(module, name)
        tick = counter(point, target)

        def patched(*a, **k):
            if not after:
                tick()
            out = real(*a, **k)
            if after:
                tick()
            return out

        setattr(module, name, patched)

    real_step = loop.optimizer_step
    step_tick = counter("step", target)

    if skip_step is not None:
        real_build = Trainer._build_optimisation

        def build_optimisation(self):
            real_build(self)
            # A real GradScaler, as fp16 on a GPU has; scale 1 (and its halving after the skip) keeps the numbers.
            self.use_scaler = True
            self.scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=10**9)

        Trainer._build_optimisation = build_optimisation

    def optimizer_step(parts, global_step):
        if skip_step is not None and global_step + 1 == skip_step:
            next(p for p in parts.model.parameters() if p.grad is not None).grad.fill_(float("inf"))
        global_step = real_step(parts, global_step)
        step_tick()
        return global_step

    loop.optimizer_step = optimizer_step
    wrap(trainer_module, "predict_all_logits", "eval")
    wrap(trainer_module, "prepare_all_for_eval", "bn")
    wrap(trainer_module, "write_test_outputs", "test")
    wrap(Trainer, "save_recovery", "recovery", after=True)

    real_save = torch.save
    save_tick = counter("save", target)

    def save(obj, f, *a, **k):
        if target is not None and target[0] == "save" and isinstance(f, str | os.PathLike):
            buf = io.BytesIO()
            real_save(obj, buf, *a, **k)
            Path(f).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # half a file, then the kill
            save_tick()
            Path(f).write_bytes(buf.getvalue())
            return None
        return real_save(obj, f, *a, **k)

    checkpoint.torch.save = save
    if resume:
        train(resume=Path(resume), overrides={"epochs": epochs} if epochs else None)
    else:
        train(load_config(Path(config)))


if __name__ == "__main__":
    main()
