"""``dogkit predict``: top-k breeds for image files, folders and globs with ONNX Runtime alone.

Decoding and preprocessing run in a thread pool (OpenCV releases the GIL) while ONNX Runtime works
on the previous batch, so the model is never waiting on JPEG decoding. Unreadable files are listed
with the reason and skipped.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np

from .atomic import atomic_write_csv, atomic_write_text
from .errors import DogkitError
from .images import ImageError, is_candidate, read_rgb
from .progress import console, progress_bar
from .runtime import OnnxClassifier, softmax
from .scan import available_cpus

T = TypeVar("T")


@dataclass
class Prediction:
    path: str
    labels: list[str]
    probs: list[float]


def collect_paths(inputs: list[str]) -> list[Path]:
    """Files, folders (recursively) and glob patterns → unique files in a stable order."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and is_candidate(p)
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(item):
            found += sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        else:
            raise DogkitError(f"{item} does not exist")
    seen, unique = set(), []
    for p in found:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def load_for(model: OnnxClassifier) -> Callable[[Path], np.ndarray]:
    """Decode (with truncation checks: these files were never scanned) and preprocess one file."""
    return lambda path: model.preprocess(read_rgb(path, check=True))


def iter_batches(items: list[T], load: Callable[[T], np.ndarray], batch_size: int, workers: int | None = None
                 ) -> Iterator[tuple[list[T], np.ndarray, list[tuple[T, str]]]]:
    """(items, uint8 batch, failures) per batch; the next batch decodes while the caller runs this one."""
    chunks = [items[i: i + batch_size] for i in range(0, len(items), batch_size)]

    def safe(item: T) -> np.ndarray | str:
        try:
            return load(item)
        except ImageError as e:
            return e.reason

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
            workers: int | None = None) -> tuple[list[Prediction], list[tuple[Path, str]]]:
    top_k = min(top_k, len(model.class_names))
    if model.spec.box_crop == "boxes":
        console.print("[yellow]warning:[/] this model was trained on the dogs' box crops (--crop boxes) and is given "
                      "whole photos here; crop each photo to the dog for the accuracy it was measured at")
    predictions, failures = [], []
    with progress_bar("Predicting", len(paths)) as bar:
        for good, batch, failed in iter_batches(paths, load_for(model), batch_size, workers):
            failures += failed
            if batch is not None:
                probs = softmax(model.run(batch))
                order = np.argsort(-probs, axis=1)[:, :top_k]
                for path, idx, row in zip(good, order, probs):
                    predictions.append(Prediction(str(path), [model.class_names[i] for i in idx],
                                                  [float(row[i]) for i in idx]))
            bar.advance(len(good) + len(failed))
    if not predictions:
        raise DogkitError(f"none of the {len(paths)} files could be read as an image"
                          + (f" (first: {failures[0][0]}: {failures[0][1]})" if failures else ""))
    return predictions, failures


def write_predictions(predictions: list[Prediction], out: Path) -> None:
    if out.suffix.lower() == ".json":
        rows = [{"path": p.path, "top": [{"label": lab, "prob": prob} for lab, prob in zip(p.labels, p.probs)]}
                for p in predictions]
        atomic_write_text(out, json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
        return
    k = max(len(p.labels) for p in predictions)
    atomic_write_csv(out, ["path", *[f"{kind}{i + 1}" for i in range(k) for kind in ("label", "prob")]],
                     ([p.path, *[v for lab, prob in zip(p.labels, p.probs) for v in (lab, f"{prob:.6f}")]]
                      for p in predictions))
