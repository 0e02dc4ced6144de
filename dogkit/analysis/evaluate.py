"""``dogkit eval``: a model on a split of the prepared dataset, or on a class-folder tree.

Two backends on the same images and the same preprocessing: ``onnx`` (ONNX Runtime, from
``dogkit.deploy.evaluate``; never imports torch) and ``torch`` (a run's ``best.pt``, from
``dogkit.training.evaluation``, imported only for that backend). Writes ``metrics.json`` (accuracy, top-5, macro and
weighted precision/recall/F1), ``per_class.csv``, ``confusion.csv`` and, when matplotlib is
installed, ``confusion.png``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.markup import escape

from ..atomic import atomic_write_csv, atomic_write_text
from ..deploy.evaluate import onnx_logits
from ..errors import DogkitError
from ..log import log
from ..metrics import MACRO_RULE, classification_metrics, confusion, per_class_report
from ..runs import DEFAULT_RUNS_DIR, best_run, exported_model, model_run, run_data
from ..text import shown
from .plots import have_matplotlib, plot_confusion

BACKENDS = ("onnx", "torch")


@dataclass
class EvalResult:
    out_dir: Path
    metrics: dict
    labels: np.ndarray
    logits: np.ndarray


def write_report(out_dir: Path, labels: np.ndarray, logits: np.ndarray, class_names: list[str], info: dict) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = classification_metrics(labels, logits)
    preds = logits.argmax(1)
    summary = {**info, "images": int(len(labels)), "macro_average": MACRO_RULE, "metrics": metrics}
    atomic_write_text(out_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
    columns = ["class", "precision", "recall", "f1", "support"]
    atomic_write_csv(out_dir / "per_class.csv", columns,
                     ([row[c] for c in columns] for row in per_class_report(labels, preds, class_names)))
    cm = confusion(labels, preds, len(class_names))
    atomic_write_csv(out_dir / "confusion.csv", ["true \\ predicted", *class_names],
                     ([name, *row.tolist()] for name, row in zip(class_names, cm)))
    if have_matplotlib():  # it comes with the [train] extra; without it the CSV says it all
        plot_confusion(cm, class_names, out_dir / "confusion.png")
    return metrics


def evaluate(backend: str = "onnx", *, model: Path | None = None, run: Path | None = None, data: Path | None = None,
             split: str = "test", out: Path | None = None, batch_size: int = 32, device: str | None = None,
             runs_dir: Path = DEFAULT_RUNS_DIR) -> EvalResult:
    if backend not in BACKENDS:
        raise DogkitError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    start = time.perf_counter()
    if backend == "onnx":
        model = model or exported_model(run, runs_dir)
        run_dir = model_run(model)
    else:
        run_dir = run or (model.parent if model else best_run(runs_dir, need="best.pt"))
    data = data or run_data(run_dir)
    if data is None:
        raise DogkitError("which images? pass --data (a prepared dataset folder or a folder of class folders)")
    if backend == "onnx":
        logits, labels, names, skipped = onnx_logits(model, data, split, batch_size, device or "cpu")
        source = str(model)
    else:
        from ..training.evaluation import torch_logits  # only here: the onnx backend never imports torch

        logits, labels, names, skipped = torch_logits(run_dir, data, split, batch_size, device or "auto")
        source = str(run_dir / "best.pt")
    if out is None:
        stem = f"{backend}-{model.stem if model else 'best'}-{split}"
        out = (run_dir / "eval" / stem) if run_dir else Path("artifacts/eval") / stem
    info = {"backend": backend, "model": source, "data": str(data), "split": split,
            "seconds": time.perf_counter() - start, "skipped": [{"file": f, "reason": r} for f, r in skipped]}
    metrics = write_report(out, labels, logits, names, info)
    np.save(out / "logits.npy", logits)
    np.save(out / "labels.npy", labels)
    aside = f", {len(skipped)} unusable files skipped" if skipped else ""
    log.info(f"{backend} on {split} ({len(labels)} images{aside}): top-1 {metrics['accuracy']:.4f}, top-5 "
             f"{metrics['top5']:.4f}, macro precision {metrics['precision_macro']:.4f}, recall "
             f"{metrics['recall_macro']:.4f}, F1 {metrics['f1_macro']:.4f} (macro over the "
             f"{metrics['macro_classes']:.0f} classes present in the labels or predictions) → {escape(shown(out))}")
    return EvalResult(out, metrics, labels, logits)
