"""``dogkit predict``: top-k breeds for image files, folders and globs with ONNX Runtime alone.

Decoding and preprocessing run in a thread pool (OpenCV releases the GIL) while ONNX Runtime works
on the previous batch, so the model is never waiting on JPEG decoding. Unreadable files are listed
with the reason and skipped.
"""

from __future__ import annotations

import csv
import functools
import glob
import io
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np

from ..atomic import atomic_write_csv, atomic_write_text
from ..data.images import ImageError, is_candidate, read_rgb
from ..errors import DogkitError
from ..log import log
from ..progress import progress_bar
from ..runs import DEFAULT_RUNS_DIR, exported_model
from ..system import available_cpus
from .runtime import OnnxClassifier, softmax

T = TypeVar("T")


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


def load_or_reason(load: Callable[[T], np.ndarray], item: T) -> np.ndarray | str:
    """The loaded image, or the reason it cannot be used: an odd image costs that image, not the batch."""
    try:
        return load(item)
    except ImageError as e:
        return e.reason
    except cv2.error as e:
        return f"cannot preprocess ({str(e).strip().splitlines()[-1][:200]})"
    except MemoryError:
        return "not enough memory to decode it"


def ranked(class_names: list[str], probs: np.ndarray, top_k: int) -> list[tuple[list[str], list[float]]]:
    """(labels, probabilities) of the ``top_k`` most likely classes of each row of ``probs``."""
    order = np.argsort(-probs, axis=1)[:, :top_k]
    return [([class_names[i] for i in idx], [float(row[i]) for i in idx]) for idx, row in zip(order, probs)]


def iter_batches(items: list[T], load: Callable[[T], np.ndarray], batch_size: int, workers: int | None = None
                 ) -> Iterator[tuple[list[T], np.ndarray, list[tuple[T, str]]]]:
    """(items, uint8 batch, failures) per batch; the next batch decodes while the caller runs this one."""
    chunks = [items[i: i + batch_size] for i in range(0, len(items), batch_size)]
    safe = functools.partial(load_or_reason, load)
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)  # parallelism comes from the pool
    try:
        with ThreadPoolExecutor(workers or available_cpus()) as pool:
            pending: list[Future] = [pool.submit(safe, x) for x in chunks[0]] if chunks else []
            for k, chunk in enumerate(chunks):
                current = pending
                pending = [pool.submit(safe, x) for x in chunks[k + 1]] if k + 1 < len(chunks) else []
                good, images, failed = [], [], []
                for item, future in zip(chunk, current):
                    result = future.result()
                    if isinstance(result, str):
                        failed.append((item, result))
                    else:
                        good.append(item)
                        images.append(result)
                yield good, np.stack(images) if images else None, failed
    finally:
        cv2.setNumThreads(previous)


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
        for good, batch, failed in iter_batches(paths, load_for(model), batch_size, workers):
            failures += failed
            if batch is not None:
                for path, (labels, probs) in zip(good, ranked(model.class_names, softmax(model.run(batch)), top_k)):
                    predictions.append(Prediction(str(path), labels, probs))
            bar.advance(len(good) + len(failed))
    if not predictions:
        problems = [*skipped, *failures]
        raise DogkitError(f"none of the {len(paths)} files could be read as an image"
                          + (f" (first: {problems[0][0]}: {problems[0][1]})" if problems else ""))
    return predictions, failures


def predict_inputs(inputs: list[str], model: Path | None = None, *, runs_dir: Path = DEFAULT_RUNS_DIR,
                   device: str = "cpu", top_k: int = 5, batch_size: int = 32
                   ) -> tuple[OnnxClassifier, list[Prediction], list[tuple[Path, str]]]:
    """``dogkit predict``: ``model`` (default: the best exported run's) on every file the inputs name.
    Returns the classifier, the predictions, and every input or file set aside with its reason."""
    classifier = OnnxClassifier(model or exported_model(None, runs_dir), device=device)
    files, skipped = collect_inputs(inputs)
    if not files:
        why = "; ".join(f"{p}: {reason}" for p, reason in skipped[:5])
        raise DogkitError(f"no files to predict in {', '.join(inputs)}" + (f" ({why})" if why else ""))
    predictions, failures = predict(classifier, files, top_k=top_k, batch_size=batch_size, skipped=skipped)
    return classifier, predictions, skipped + failures


def _prediction_rows(predictions: list[Prediction]) -> tuple[list[str], list[list[str]]]:
    k = max((len(p.labels) for p in predictions), default=0)
    header = ["path", *[f"{kind}{i + 1}" for i in range(k) for kind in ("label", "prob")]]
    return header, [[p.path, *[v for lab, prob in zip(p.labels, p.probs) for v in (lab, f"{prob:.6f}")]]
                    for p in predictions]


def _prediction_json(predictions: list[Prediction]) -> str:
    rows = [{"path": p.path, "top": [{"label": lab, "prob": prob} for lab, prob in zip(p.labels, p.probs)]}
            for p in predictions]
    return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"


def format_predictions(predictions: list[Prediction], kind: str) -> str:
    """The predictions as the text of a .csv or .json file (for stdout)."""
    if kind == "json":
        return _prediction_json(predictions)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header, rows = _prediction_rows(predictions)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_predictions(predictions: list[Prediction], out: Path) -> None:
    if out.suffix.lower() == ".json":
        atomic_write_text(out, _prediction_json(predictions))
        return
    header, rows = _prediction_rows(predictions)
    atomic_write_csv(out, header, rows)
