"""``dogkit eval``: a model on a split of the prepared dataset, or on a class-folder tree.

Two backends on the same images and the same preprocessing: ``onnx`` (ONNX Runtime, from
``dogkit.deploy.evaluate``; never imports torch) and ``torch`` (a run's ``best.pt``, from
``dogkit.training.evaluation``, imported only for that backend). Writes ``metrics.json`` (accuracy, top-5, macro and
weighted precision/recall/F1, calibration and, on the onnx backend, localisation), ``per_class.csv``,
``confusion.csv`` and, when matplotlib is installed, ``confusion.png``.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.markup import escape

from ..atomic import atomic_write_csv, atomic_write_text, write_problem
from ..calibration import summary as calibration_summary
from ..data.split import SPLITS
from ..deploy.evaluate import onnx_evaluation
from ..errors import DogkitError
from ..log import log
from ..metrics import MACRO_RULE, classification_metrics, confusion, per_class_report
from ..runs import DEFAULT_RUNS_DIR, best_run, exported_model, model_run, run_data
from ..settings import SettingError, at_least, one_of, writable
from ..text import json_text, shown
from ..variants import base
from .plots import have_matplotlib, plot_confusion

BACKENDS = ("onnx", "torch")


@dataclass
class EvalResult:
    out_dir: Path
    metrics: dict
    labels: np.ndarray
    logits: np.ndarray


def write_report(out_dir: Path, labels: np.ndarray, logits: np.ndarray, class_names: list[str], info: dict,
                 after: dict | None = None) -> dict:
    """The report files; metrics.json holds ``info``, the metrics, then ``after`` (calibration, localisation)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = classification_metrics(labels, logits)
    preds = logits.argmax(1)
    summary = {**info, "images": int(len(labels)), "macro_average": MACRO_RULE, "metrics": metrics, **(after or {})}
    atomic_write_text(out_dir / "metrics.json", json_text(summary, indent=2) + "\n")
    columns = ["class", "precision", "recall", "f1", "support"]
    atomic_write_csv(out_dir / "per_class.csv", columns,
                     ([row[c] for c in columns] for row in per_class_report(labels, preds, class_names)))
    cm = confusion(labels, preds, len(class_names))
    atomic_write_csv(out_dir / "confusion.csv", ["true \\ predicted", *class_names],
                     ([name, *row.tolist()] for name, row in zip(class_names, cm)))
    if have_matplotlib():  # it comes with the [train] extra; without it the CSV says it all
        plot_confusion(cm, class_names, out_dir / "confusion.png")
    return metrics


def stored_calibration_for(run_dir: Path | None) -> tuple[float, float | None, str]:
    """The torch backend's temperature and threshold: those export stored in the run's model.onnx (fitted on the
    same best.pt), else 1 and none, with where they came from."""
    from ..deploy.runtime import read_metadata, stored_calibration, stored_temperature, stored_threshold

    onnx = run_dir / base().file if run_dir else None
    if onnx is None or not onnx.is_file():
        return 1.0, None, f"no exported {base().file} beside best.pt: temperature 1, no unsure threshold"
    best = run_dir / "best.pt"
    if best.is_file() and onnx.stat().st_mtime < best.stat().st_mtime:  # fitted on an older best.pt
        return 1.0, None, f"{shown(onnx)} is older than best.pt: temperature 1, no unsure threshold"
    try:
        stored = stored_calibration(read_metadata(onnx))
    except DogkitError as e:
        raise DogkitError(f"{shown(onnx)}: {e}; export the model again with `dogkit export`") from None
    if not stored:
        return 1.0, None, f"{shown(onnx)} predates calibration: temperature 1, no unsure threshold"
    return stored_temperature(stored), stored_threshold(stored), f"stored in {shown(onnx)}"


def calibration_summary_line(cal: dict, split: str) -> str:
    """ECE raw → calibrated, and what the unsure threshold gives on these images."""
    fitted = " (the split it was fitted on)" if split == "val" and cal["temperature"] != 1.0 else ""
    line = f"calibration: ECE {cal['ece_raw']:.4f} raw → {cal['ece']:.4f} at T={cal['temperature']:.3f}{fitted}"
    sel = cal.get("selective")
    if sel is None:
        return line + "; no unsure threshold stored"
    if sel["threshold"] is None:
        return line + "; the stored target precision is unreachable: every answer unsure"
    precision = "n/a" if sel["precision"] is None else f"{sel['precision']:.1%}"
    return (line + f"; unsure below {sel['threshold']:.4g}: answers {sel['coverage']:.1%} of the images at "
            f"precision {precision}")


def localisation_line(loc: dict) -> str:
    if "unavailable" in loc:
        return f"localisation: not measured ({loc['unavailable']})"
    prior = loc["baseline"]
    verdict = "beats" if loc["beats_baseline"] else "does not beat"
    return (f"localisation ({loc['images']} images with boxes): energy in boxes {loc['energy_in_boxes']:.2f} "
            f"(centred baseline {prior['energy_in_boxes']:.2f}), box IoU≥{loc['iou_hit']:g} "
            f"{loc['gt_known_loc']:.0%} (baseline {prior['gt_known_loc']:.0%}) — {verdict} the centred baseline")


@dataclass(frozen=True)
class EvalSettings:
    """The settings of ``evaluate``, checked where they are made: before any model or image is read."""

    backend: str = "onnx"
    split: str = "test"
    batch_size: int = 32
    device: str | None = None  # onnx: cpu or cuda; torch also auto and cuda:N (default: cpu for onnx, auto for torch)
    out: Path | None = None  # the report folder

    def __post_init__(self) -> None:
        one_of(self, "backend", BACKENDS)
        one_of(self, "split", SPLITS)
        at_least(self, 1, "batch_size")
        allowed, pattern = (("cpu or cuda", r"cpu|cuda") if self.backend == "onnx"
                            else ("cpu, cuda, cuda:N or auto", r"auto|cpu|cuda(:\d+)?"))
        if self.device is not None and not re.fullmatch(pattern, self.device):
            raise SettingError("device", f"must be {allowed} with the {self.backend} backend, got {self.device!r}")
        writable(self, "out", folder=True)


def evaluate(backend: str = EvalSettings.backend, *, model: Path | None = None, run: Path | None = None,
             data: Path | None = None, split: str = EvalSettings.split, out: Path | None = None,
             batch_size: int = EvalSettings.batch_size, device: str | None = None, runs_dir: Path = DEFAULT_RUNS_DIR,
             localise: bool = True) -> EvalResult:
    EvalSettings(backend, split, batch_size, device, out)
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
        result = onnx_evaluation(model, data, split, batch_size, device or "cpu", localise)
        logits, labels, names, skipped = result.logits, result.labels, result.class_names, result.skipped
        temperature, threshold = result.temperature, result.threshold
        source = ("stored in the model" if result.calibration else
                  "the model predates calibration (none fitted on its own outputs): temperature 1")
        localisation = result.localisation
        model_source = str(model)
    else:
        from ..training.evaluation import torch_logits  # only here: the onnx backend never imports torch

        logits, labels, names, skipped = torch_logits(run_dir, data, split, batch_size, device or "auto")
        temperature, threshold, source = stored_calibration_for(run_dir)
        localisation = {"unavailable": "measured by the onnx backend"}
        model_source = str(run_dir / "best.pt")
    broken = int((~np.isfinite(logits).all(1)).sum())
    if broken:  # a NaN head bias, an overflow: such a row has no answer, and its numbers are written as null
        log.warning(f"[yellow]warning:[/] the model's output is NaN or infinite for {broken} of the {len(labels)} "
                    "images: the metrics below count those as whatever argmax makes of NaN, and calibration "
                    "figures that need them are null in metrics.json")
    if out is None:
        stem = f"{backend}-{model.stem if model else 'best'}-{split}"
        out = (run_dir / "eval" / stem) if run_dir else Path("artifacts/eval") / stem
    calibration = {**calibration_summary(logits, labels, temperature, threshold), "source": source}
    info = {"backend": backend, "model": model_source, "data": str(data), "split": split,
            "seconds": time.perf_counter() - start, "skipped": [{"file": f, "reason": r} for f, r in skipped]}
    after = {"calibration": calibration, "localisation": localisation}
    try:
        metrics = write_report(out, labels, logits, names, info, after)
        np.save(out / "logits.npy", logits)
        np.save(out / "labels.npy", labels)
    except OSError as e:  # a full disk: what was measured goes to stdout rather than nowhere
        measured = {**info, "images": int(len(labels)), "metrics": classification_metrics(labels, logits), **after}
        sys.stdout.write(json_text(measured, indent=2) + "\n")
        sys.stdout.flush()
        raise DogkitError(f"{write_problem(out / 'metrics.json', e)}; the metrics are on stdout instead") from None
    aside = f", {len(skipped)} unusable files skipped" if skipped else ""
    log.info(f"{backend} on {split} ({len(labels)} images{aside}): top-1 {metrics['accuracy']:.4f}, top-5 "
             f"{metrics['top5']:.4f}, macro precision {metrics['precision_macro']:.4f}, recall "
             f"{metrics['recall_macro']:.4f}, F1 {metrics['f1_macro']:.4f} (macro over the "
             f"{metrics['macro_classes']:.0f} classes present in the labels or predictions) → {escape(shown(out))}")
    said = "" if backend == "onnx" or threshold is not None else f" ({source})"  # why the torch backend has none
    log.info(escape(calibration_summary_line(calibration, split) + said))
    log.info(escape(localisation_line(localisation)))
    return EvalResult(out, metrics, labels, logits)
