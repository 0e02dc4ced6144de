"""Finding runs: the best finished run under a runs folder, by validation accuracy. No torch here."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import DogkitError

DEFAULT_RUNS_DIR = Path("artifacts/runs")


def run_score(run_dir: Path) -> float | None:
    """Validation top-1 of the run's best model, from test_metrics.json (written when a run finishes)."""
    try:
        report = json.loads((run_dir / "test_metrics.json").read_text(encoding="utf-8"))
        return float(report["best"]["val"]["accuracy"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def best_run(runs_dir: Path = DEFAULT_RUNS_DIR, need: str = "best.pt") -> Path:
    """The finished run with the highest validation accuracy that holds ``need`` (e.g. model.onnx)."""
    runs_dir = Path(runs_dir)
    scored = []
    for run in sorted(p for p in runs_dir.glob("*") if p.is_dir()):
        score = run_score(run)
        if score is not None and (run / need).is_file():
            scored.append((score, run.name, run))
    if not scored:
        what = "trained runs" if need == "best.pt" else f"runs with {need}"
        hint = "dogkit train --exp 1" if need == "best.pt" else "dogkit export"
        raise DogkitError(f"no finished {what} in {runs_dir}; run `{hint}` first, or name one explicitly")
    return max(scored)[2]


LOCK_NAME = ".lock"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``<run>/.lock`` while training, so a second process (say, a ``--resume`` started while the
    first still runs) stops with a clear error instead of writing the same checkpoints.

    An OS lock (flock), not a marker file: it is released when the process ends, however it ends,
    so a killed run never leaves its folder locked. Under torchrun only process 0 takes it."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        yield
        return
    run_dir = Path(run_dir)
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            raise DogkitError(f"{run_dir} is being trained by process {holder} right now; wait for it to finish "
                              "or stop it before resuming (two processes would overwrite each other's "
                              "checkpoints)") from e
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
