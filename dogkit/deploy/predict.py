"""``dogkit predict``: top-k breeds for image files, folders and globs with ONNX Runtime alone.

Decoding and preprocessing run in a thread pool (OpenCV releases the GIL) while ONNX Runtime works
on the previous batch, so the model is never waiting on JPEG decoding. Unreadable files are listed
with the reason and skipped.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_csv, atomic_write_text
from ..data.budget import file_cost
from ..data.images import is_candidate, read_rgb
from ..errors import DogkitError
from ..log import log
from ..progress import progress_bar
from ..runs import DEFAULT_RUNS_DIR, exported_model
from ..text import shown
from .decode import iter_batches
from .runtime import OnnxClassifier, softmax


@dataclass
class Prediction:
    path: str
    labels: list[str]
    probs: list[float]


def _walk(folder: Path, skipped: list[tuple[Path, str]]) -> list[Path]:
    """Every non-hidden entry under ``folder`` that is not a folder, in a stable order. Special files
    (FIFOs, broken links, link loops) are kept so that reading them reports why they are skipped;
    unreadable folders and links to folders (not followed, to avoid cycles) are reported here."""
    found: list[Path] = []

    def unreadable(e: OSError) -> None:
        skipped.append((Path(e.filename or folder), f"unreadable folder ({e.strerror or e})"))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable):
        here = Path(dirpath)
        for name in sorted(dirnames):
            if not name.startswith(".") and (here / name).is_symlink():
                skipped.append((here / name, "symbolic link to a folder (not followed)"))
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and not (here / n).is_symlink())
        found += [here / n for n in sorted(filenames) if is_candidate(here / n)]
    return found


def collect_paths(inputs: list[str]) -> list[Path]:
    """The files of ``collect_inputs``; an input that does not exist is an error, other skipped inputs
    are dropped (callers that report them use ``collect_inputs``)."""
    files, skipped = collect_inputs(inputs)
    missing = [str(p) for p, why in skipped if why == "does not exist"]
    if missing:
        raise DogkitError(f"{missing[0]} does not exist")
    return files


def collect_inputs(inputs: list[str]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files, folders (recursively) and glob patterns → unique files in a stable order, and the inputs
    that were skipped with the reason (missing, unreadable folder, …). Nothing vanishes unreported."""
    found: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += _walk(path, skipped)
        elif os.path.lexists(path):  # files, and FIFOs, broken links and loops: reading them says why
            found.append(path)
        elif glob.has_magic(item):
            for match in sorted(glob.glob(item, recursive=True)):
                found += _walk(Path(match), skipped) if Path(match).is_dir() else [Path(match)]
        else:
            skipped.append((path, "does not exist"))
    seen, unique = set(), []
    for p in found:
        key = os.path.realpath(p)  # never raises, even on a link loop
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique, skipped


def load_for(model: OnnxClassifier) -> Callable[[Path], np.ndarray]:
    """Decode (with truncation checks: these files were never scanned) and preprocess one file."""
    return lambda path: model.preprocess(read_rgb(path, check=True, orientation=model.spec.orients))


def ranked(class_names: list[str], probs: np.ndarray, top_k: int) -> list[tuple[list[str], list[float]]]:
    """(labels, probabilities) of the ``top_k`` most likely classes of each row of ``probs``."""
    order = np.argsort(-probs, axis=1)[:, :top_k]
    return [([class_names[i] for i in idx], [float(row[i]) for i in idx]) for idx, row in zip(order, probs)]


def predict(model: OnnxClassifier, paths: list[Path], *, top_k: int = 5, batch_size: int = 32,
            workers: int | None = None, skipped: list[tuple[Path, str]] = ()
            ) -> tuple[list[Prediction], list[tuple[Path, str]]]:
    """Top-k predictions of the files that decode, and (file, reason) for those that do not.
    ``skipped``: inputs already set aside (e.g. by ``collect_inputs``), named if nothing is left."""
    if top_k < 1 or batch_size < 1:
        raise DogkitError(f"top_k and batch_size must be at least 1, got {top_k} and {batch_size}")
    top_k = min(top_k, len(model.class_names))
    if model.spec.box_crop == "boxes":
        log.warning("[yellow]warning:[/] this model was trained on the dogs' box crops (--crop boxes) and is given "
                    "whole photos here; crop each photo to the dog for the accuracy it was measured at")
    predictions, failures = [], []
    with progress_bar("Predicting", len(paths)) as bar:
        for good, batch, failed in iter_batches(paths, load_for(model), batch_size, workers, cost=file_cost):
            failures += failed
            if batch is not None:
                for path, (labels, probs) in zip(good, ranked(model.class_names, softmax(model.run(batch)), top_k)):
                    predictions.append(Prediction(shown(path), labels, probs))
            bar.advance(len(good) + len(failed))
    if not predictions:
        problems = [*skipped, *failures]
        raise DogkitError(f"none of the {len(paths)} files could be read as an image"
                          + (f" (first: {shown(problems[0][0])}: {problems[0][1]})" if problems else ""))
    return predictions, failures


def predict_inputs(inputs: list[str], model: Path | None = None, *, runs_dir: Path = DEFAULT_RUNS_DIR,
                   device: str = "cpu", top_k: int = 5, batch_size: int = 32
                   ) -> tuple[OnnxClassifier, list[Prediction], list[tuple[Path, str]]]:
    """``dogkit predict``: ``model`` (default: the best exported run's) on every file the inputs name.
    Returns the classifier, the predictions, and every input or file set aside with its reason."""
    classifier = OnnxClassifier(model or exported_model(None, runs_dir), device=device)
    files, skipped = collect_inputs(inputs)
    if not files:
        why = "; ".join(f"{shown(p)}: {reason}" for p, reason in skipped[:5])
        raise DogkitError(f"no files to predict in {', '.join(map(shown, inputs))}" + (f" ({why})" if why else ""))
    predictions, failures = predict(classifier, files, top_k=top_k, batch_size=batch_size, skipped=skipped)
    return classifier, predictions, skipped + failures


Skipped = list[tuple[Path, str]]


def _prediction_rows(predictions: list[Prediction], skipped: Skipped = ()) -> tuple[list[str], list[list[str]]]:
    """CSV rows: one per prediction, then one per skipped input with its reason in the last column."""
    k = max((len(p.labels) for p in predictions), default=0)
    header = ["path", *[f"{kind}{i + 1}" for i in range(k) for kind in ("label", "prob")], "error"]
    rows = [[p.path, *[v for lab, prob in zip(p.labels, p.probs) for v in (lab, f"{prob:.6f}")], ""]
            for p in predictions]
    return header, rows + [[shown(path), *[""] * (2 * k), reason] for path, reason in skipped]


def _prediction_json(predictions: list[Prediction], skipped: Skipped = ()) -> str:
    rows = [{"path": p.path, "top": [{"label": lab, "prob": prob} for lab, prob in zip(p.labels, p.probs)]}
            for p in predictions]
    rows += [{"path": shown(path), "error": reason} for path, reason in skipped]
    return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"


def format_predictions(predictions: list[Prediction], kind: str, skipped: Skipped = ()) -> str:
    """The predictions (and the skipped inputs, with their reasons) as the text of a .csv or .json file."""
    if kind == "json":
        return _prediction_json(predictions, skipped)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header, rows = _prediction_rows(predictions, skipped)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_predictions(predictions: list[Prediction], out: Path, skipped: Skipped = ()) -> None:
    if out.suffix.lower() == ".json":
        atomic_write_text(out, _prediction_json(predictions, skipped))
        return
    header, rows = _prediction_rows(predictions, skipped)
    atomic_write_csv(out, header, rows)
