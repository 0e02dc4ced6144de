"""Finding runs: the best finished run under a runs folder, by validation accuracy. No torch here."""

from __future__ import annotations

import json
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
