"""Accuracy against training minutes: regime 1 of `dogkit study --budget lite0` at several image sizes.

For each size, the untrained ImageNet head restricted to the dataset's synsets (the zero-shot baseline) and one
regime-1 run with the lite0 budget's recipe (``dogkit train`` through the CLI, so the run is an ordinary run
folder), both on the test split. Writes ``tradeoff.csv`` and ``tradeoff.png`` (test top-1 against minutes of
training, one point per size, the zero-shot line beside it) into ``--out``. Finished runs are reused, so an
interrupted sweep picks up where it stopped.

    python scripts/lite0_tradeoff.py --data artifacts/data/dogs51 --sizes 128 160 192 224 \\
        --out docs/results/lite0-tradeoff
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

from dogkit.analysis.plots import percent_axis, pyplot, save
from dogkit.analysis.zeroshot import zero_shot_split
from dogkit.study import BUDGETS


def train_args(size: int, data: Path, runs: Path) -> list[str]:
    """`dogkit train` for regime 1 as the lite0 budget sets it, at ``size`` px."""
    cfg = BUDGETS["lite0"].config(1, {})
    sets = [f"head_init={cfg.head_init}", f"batchnorm={cfg.batchnorm}"]
    return [sys.executable, "-m", "dogkit", "train", "--exp", "1", "--arch", cfg.arch, "--data", str(data),
            "--runs-dir", str(runs), "--name", f"tradeoff-{size}", "--image-size", str(size),
            "--epochs", str(cfg.epochs), "--batch-size", str(cfg.batch_size), "--lr", str(cfg.lr),
            "--warmup-epochs", str(cfg.warmup_epochs), "--amp", cfg.amp, "--freeze", cfg.freeze,
            *(arg for s in sets for arg in ("--set", s))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset (ImageNet-synset folders)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 160, 192, 224])
    parser.add_argument("--runs-dir", type=Path, default=Path("artifacts/runs/lite0-tradeoff"))
    parser.add_argument("--out", type=Path, default=Path("artifacts/lite0-tradeoff"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        run = args.runs_dir / f"tradeoff-{size}"
        if not (run / "test_metrics.json").is_file():
            if run.exists():
                subprocess.run([sys.executable, "-m", "dogkit", "train", "--resume", str(run)], check=True)
            else:
                subprocess.run(train_args(size, args.data, args.runs_dir), check=True)
        best = json.loads((run / "test_metrics.json").read_text())["best"]
        with open(run / "metrics.csv", newline="", encoding="utf-8") as f:
            minutes = sum(float(r["epoch_time_s"]) + float(r.get("val_time_s") or 0) for r in csv.DictReader(f)) / 60
        zero = zero_shot_split(BUDGETS["lite0"].config(1, {}).arch, args.data, "test", size=size)
        rows.append({"size": size, "train_minutes": round(minutes, 2), "best_epoch": best["epoch"],
                     "test_top1": round(best["test"]["accuracy"], 4),
                     "test_recall_macro": round(best["test"]["recall_macro"], 4),
                     "zero_shot_top1": round(zero.accuracy, 4)})
        print(json.dumps(rows[-1]), flush=True)
    with open(args.out / "tradeoff.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    minutes = [r["train_minutes"] for r in rows]
    ax.plot(minutes, [r["test_top1"] for r in rows], "o-", label="regime 1, fine-tuned (3 epochs)")
    ax.plot(minutes, [r["zero_shot_top1"] for r in rows], "s--", label="zero-shot ImageNet head (no training)")
    for r in rows:
        ax.annotate(f"{r['size']} px", (r["train_minutes"], r["test_top1"]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("training minutes (with validation), this machine")
    ax.set_ylabel("test top-1")
    percent_axis(ax.yaxis)
    ax.legend()
    ax.grid(alpha=0.3)
    print(save(fig, args.out / "tradeoff.png"))


if __name__ == "__main__":
    main()
