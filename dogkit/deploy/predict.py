"""``dogkit predict``: top-k breeds for image files, folders and globs with ONNX Runtime alone.

Decoding and preprocessing run in a thread pool (OpenCV releases the GIL) while ONNX Runtime works
on the previous batch, so the model is never waiting on JPEG decoding. Unreadable files are listed
with the reason and skipped.

Probabilities are calibrated (the temperature export fitted on validation) unless asked raw; an answer whose
calibrated top-1 confidence is below the model's stored threshold (or ``min_confidence``) is "unsure". With
``explain``, each image also gets an overlay PNG of the top breed's activation map (``overlay_names`` says where).
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import os
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import cv2
import numpy as np
from rich.markup import escape

from ..atomic import atomic_write_text, file_mode, pid_tag, remove_stale, write_problem
from ..data.budget import file_cost
from ..data.images import is_candidate, read_rgb
from ..errors import DogkitError
from ..log import log
from ..progress import progress_bar
from ..runs import DEFAULT_RUNS_DIR, exported_model
from ..settings import SettingError, at_least, one_of, within, writable
from ..text import json_text, shown
from .decode import iter_batches
from .explain import MAX_SIDE, caption_text, fitted, overlay, png_bytes
from .runtime import OnnxClassifier

UNSURE = "unsure"
Skipped = list[tuple[Path, str]]


@dataclass
class Prediction:
    path: str
    labels: list[str]
    probs: list[float]
    unsure: bool = False
    explain: list[str] = field(default_factory=list)  # overlay files, the top breed's first
    error: str = ""  # an overlay that could not be written: the prediction stands, the reason is kept

    @property
    def answer(self) -> str:
        return UNSURE if self.unsure else self.labels[0]


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


def load_for(model: OnnxClassifier, photos: dict[Path, list[np.ndarray]] | None = None) -> Callable[[Path], np.ndarray]:
    """Decode (with truncation checks: these files were never scanned) and preprocess one file. With ``photos``,
    the photo is also kept there, shrunk to the overlay's size: an overlay needs it after inference, and at most
    two batches' worth (this one and the one decoding ahead) of ≤ MAX_SIDE pictures are held at once."""
    def load(path: Path) -> np.ndarray:
        rgb = read_rgb(path, check=True, orientation=model.spec.orients)
        pixels = model.preprocess(rgb)
        if photos is not None:  # a list: a caller may name one file twice
            photos.setdefault(path, []).append(fitted(rgb, MAX_SIDE))
        return pixels
    return load


def ranked(class_names: list[str], probs: np.ndarray, top_k: int) -> list[tuple[list[str], list[float]]]:
    """(labels, probabilities) of the ``top_k`` most likely classes of each row of ``probs``."""
    order = np.argsort(-probs, axis=1)[:, :top_k]
    return [([class_names[i] for i in idx], [float(row[i]) for i in idx]) for idx, row in zip(order, probs)]


def answer_threshold(model: OnnxClassifier, min_confidence: float | None = None) -> float | None:
    """The calibrated confidence below which an answer is unsure: ``min_confidence`` if given, else the model's
    stored threshold (None: every answer stands; inf: the stored target was unreachable, none does)."""
    if min_confidence is None:
        return model.threshold
    if not 0 <= min_confidence <= 1:
        raise DogkitError(f"--min-confidence must be from 0 to 1, got {min_confidence}")
    return float(min_confidence)


def safe_part(label: str) -> str:
    """A breed name as part of a file name: letters, digits, '.', '-' and '_' kept, anything else '_'."""
    return re.sub(r"[^\w.-]+", "_", label).strip("._") or "class"


def _clashes(names: list[str]) -> list[bool]:
    """Which names another one equals, case-folded: the folder may be on a case-insensitive file system."""
    counts: dict[str, int] = {}
    for n in names:
        counts[n.casefold()] = counts.get(n.casefold(), 0) + 1
    return [counts[n.casefold()] > 1 for n in names]


def overlay_names(paths: list[Path]) -> list[str]:
    """Each input's overlay name in the ``--explain`` folder, without '.png': its path below the folder all the
    inputs share, extension dropped (``photos/a/rex.jpg``, ``photos/b/rex.jpg`` → ``a/rex``, ``b/rex``), so the
    same stem in two folders never collides. Files that would still share a name (``rex.jpg`` and ``rex.png`` in
    one folder, or names differing only in case) keep their extension (``rex.jpg``, ``rex.png``), and if even
    that clashes (``Rex.jpg``, ``rex.jpg``) a number in input order (``rex.jpg-1``, ``rex.jpg-2``). A name depends
    only on the input's path and those beside it, so a rerun writes the same files."""
    absolute = [Path(os.path.abspath(p)) for p in paths]
    try:
        root = Path(os.path.commonpath([str(a.parent) for a in absolute])) if absolute else None
    except ValueError:  # different drives (Windows): the paths below each drive
        root = None
    below = [a.relative_to(root) if root else Path(*a.parts[1:]) for a in absolute]
    names = [str(r.with_name(r.stem)) for r in below]
    names = [str(r) if clash else n for n, r, clash in zip(names, below, _clashes(names))]
    numbered: dict[str, int] = {}
    for i, (n, clash) in enumerate(zip(list(names), _clashes(names))):
        if clash:
            numbered[n.casefold()] = numbered.get(n.casefold(), 0) + 1
            names[i] = f"{n}-{numbered[n.casefold()]}"
    # A number can land on another input's own name (``rex.jpg``, ``REX.jpg`` and ``rex.jpg-1.png``): a later
    # one that is taken gets the next free number.
    taken, seen = {n.casefold() for n in names}, set()
    for i, n in enumerate(names):
        if n.casefold() in seen:
            k = 2
            while f"{n}-{k}".casefold() in taken:
                k += 1
            names[i] = f"{n}-{k}"
            taken.add(names[i].casefold())
        seen.add(names[i].casefold())
    return names


def overlay_file(folder: Path, name: str, rank: int, label: str, ranked_names: bool) -> Path:
    """``<name>.png`` for the top breed alone, ``<name>.<rank>-<breed>.png`` with ``--explain-top-k`` above 1."""
    return folder / (f"{name}.{rank}-{safe_part(label)}.png" if ranked_names else f"{name}.png")


def _overlay_targets(paths: list[Path], folder: Path) -> dict[Path, str]:
    """Each input's overlay name. Inputs inside the folder are refused before any work: their overlays could
    replace them (a folder predicted again with its earlier overlays in it)."""
    inside = os.path.realpath(folder) + os.sep
    for path in paths:
        if os.path.realpath(path).startswith(inside):
            raise DogkitError(f"--explain {shown(folder)} holds an input ({shown(path)}); its overlays could "
                              "replace the photos: choose a folder outside the inputs")
    return dict(zip(paths, overlay_names(paths)))


def _own_folder(folder: Path, target: Path) -> Path:
    """``target``'s folder, made where missing, every part of it below ``folder`` a real folder: a link there
    (``OUTDIR/a -> photos/a``) would put overlays among the inputs, so it is refused."""
    here = folder
    for part in target.parent.relative_to(folder).parts:
        here = here / part
        with contextlib.suppress(FileExistsError):
            os.mkdir(here)
        if here.is_symlink() or not here.is_dir():
            raise DogkitError(f"{shown(here)} is {'a link' if here.is_symlink() else 'not a folder'}; overlays are "
                              "written only into real folders below --explain")
    return here


def _write_overlay(folder: Path, target: Path, data: bytes) -> None:
    """``data`` at ``target`` atomically, through a short temporary name (an input's own name may be as long as
    the file system allows) in a folder that ``_own_folder`` checked. The rename replaces a link at ``target``
    itself, never what it points to."""
    parent = _own_folder(folder, target)
    remove_stale(parent, ".overlay.p*.tmp")
    fd, tmp = tempfile.mkstemp(prefix=f".overlay.{pid_tag()}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp makes 0600 files
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_overlays(model: OnnxClassifier, photo: np.ndarray, cams: np.ndarray, order: np.ndarray,
                    probs: np.ndarray, unsure: bool, folder: Path, name: str, count: int,
                    used: set[str]) -> tuple[list[str], str]:
    """The overlays of one image: the map of each of its ``count`` top breeds on the photo, the breed and its
    probability in the corner (an unsure top answer says so); with why one could not be written (the others and
    the prediction stand). ``used``: the overlays written so far (case-folded), never written twice."""
    written = []
    for rank, k in enumerate(order[:count], start=1):
        label = model.class_names[k]
        caption = caption_text(f"{UNSURE}: {label}" if unsure and rank == 1 else label, float(probs[k]))
        target = overlay_file(folder, name, rank, label, count > 1)
        if str(target).casefold() in used:  # two breeds whose names differ only in characters safe_part drops
            target = target.with_name(f"{target.stem}-{rank}.png")
        try:
            if str(target).casefold() in used:
                raise DogkitError("its overlay name is taken by another image's")
            _write_overlay(folder, target, png_bytes(overlay(photo, cams[k], model.spec, caption=caption)))
        except (OSError, DogkitError, ValueError, cv2.error) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            return written, f"overlay not written ({shown(target)}: {why})"
        used.add(str(target).casefold())
        written.append(shown(target))
    return written, ""


def predict(model: OnnxClassifier, paths: list[Path], *, top_k: int = 5, batch_size: int = 32,
            workers: int | None = None, skipped: list[tuple[Path, str]] = (), raw: bool = False,
            min_confidence: float | None = None, explain: Path | None = None, explain_top_k: int = 1,
            on_prediction: Callable[[Prediction], None] | None = None
            ) -> tuple[list[Prediction], list[tuple[Path, str]]]:
    """Top-k predictions of the files that decode, and (file, reason) for those that do not.
    ``skipped``: inputs already set aside (e.g. by ``collect_inputs``), named if nothing is left.
    ``raw``: the plain softmax instead of calibrated probabilities (the unsure rule still reads calibrated
    confidence, as the threshold was fitted on it). ``min_confidence``: the unsure threshold instead of the stored
    one (0: never unsure). ``explain``: a folder for ``explain_top_k`` overlays per image. ``on_prediction``: called
    with each prediction as soon as it is made (``PredictionWriter.add`` streams it)."""
    if top_k < 1 or batch_size < 1 or explain_top_k < 1:
        raise DogkitError(f"top_k, batch_size and explain_top_k must be at least 1, got {top_k}, {batch_size} and "
                          f"{explain_top_k}")
    if explain is not None and not model.explains:
        raise DogkitError(model.why_no_maps())
    threshold = answer_threshold(model, min_confidence)
    top_k = min(top_k, len(model.class_names))
    explain_top_k = min(explain_top_k, len(model.class_names))
    if model.spec.box_crop == "boxes":
        log.warning("[yellow]warning:[/] this model was trained on the dogs' box crops (--crop boxes) and is given "
                    "whole photos here; crop each photo to the dog for the accuracy it was measured at")
    if threshold == float("inf"):
        log.warning("[yellow]warning:[/] this model's target precision was reached by no confidence threshold on "
                    "validation, so every answer is unsure; --min-confidence sets one")
    names = _overlay_targets(paths, explain) if explain is not None else {}
    if explain is not None:
        explain.mkdir(parents=True, exist_ok=True)
    photos: dict[Path, list[np.ndarray]] | None = {} if explain is not None else None
    predictions, failures, no_answer, overlay_errors, used = [], [], 0, 0, set()
    with progress_bar("Predicting", len(paths)) as bar:
        for good, batch, failed in iter_batches(paths, load_for(model, photos), batch_size, workers, cost=file_cost):
            failures += failed
            if batch is not None:
                logits, cams = model.run_maps(batch) if explain is not None else (model.run(batch), None)
                calibrated = model.probabilities(logits)
                probs = model.probabilities(logits, calibrated=False) if raw else calibrated
                unsure = (calibrated.max(1) < threshold if threshold is not None
                          else np.zeros(len(good), bool))
                # NaN or infinite logits (a broken head) give no confidence: such an answer is unsure, whatever
                # argmax makes of it
                lost = ~np.isfinite(calibrated).all(1) | ~np.isfinite(probs).all(1)
                unsure |= lost
                no_answer += int(lost.sum())
                order = np.argsort(-probs, axis=1)
                for i, (path, (labels, top)) in enumerate(zip(good, ranked(model.class_names, probs, top_k))):
                    written, error = [], ""
                    if explain is not None:
                        kept = photos[path]
                        photo = kept.pop()
                        if not kept:
                            del photos[path]
                        written, error = _write_overlays(model, photo, cams[i], order[i], probs[i], bool(unsure[i]),
                                                         explain, names[path], explain_top_k, used)
                        overlay_errors += bool(error)
                    predictions.append(Prediction(shown(path), labels, top, bool(unsure[i]), written, error))
                    if on_prediction is not None:
                        on_prediction(predictions[-1])
            bar.advance(len(good) + len(failed))
    if overlay_errors:
        first = next(p for p in predictions if p.error)
        log.warning(f"[yellow]warning:[/] {overlay_errors} overlays could not be written (first: "
                    f"{escape(first.path)}: {escape(first.error)}); their predictions are kept, with the reason")
    if no_answer:
        log.warning(f"[yellow]warning:[/] the model's output was NaN or infinite for {no_answer} of the images: "
                    "no confidence, so each of those answers is unsure (its probabilities are left empty)")
    if not model.calibration and predictions:  # said after the work: a failure stays one line
        log.warning("[yellow]warning:[/] this model predates calibration (no temperature or unsure threshold fitted "
                    "on its own outputs in its metadata): probabilities are the plain softmax and no answer is unsure "
                    "unless --min-confidence says; export it again to calibrate")
    if not predictions:
        problems = [*skipped, *failures]
        raise DogkitError(f"none of the {len(paths)} files could be read as an image"
                          + (f" (first: {shown(problems[0][0])}: {problems[0][1]})" if problems else ""))
    return predictions, failures


DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class PredictSettings:
    """The settings of ``predict_inputs``, checked where they are made: before the model or any image is read."""

    device: str = "cpu"  # cuda: with onnxruntime-gpu and a GPU
    top_k: int = 5  # breeds per image
    batch_size: int = 32  # images per ONNX Runtime call
    min_confidence: float | None = None  # "unsure" below it, instead of the model's stored threshold
    explain: Path | None = None  # a folder for overlays of where the model looked
    explain_top_k: int = 1  # overlays for each of the top N breeds
    out: Path | None = None  # a .csv or .json file for the predictions (- : stdout, written by the caller)

    def __post_init__(self) -> None:
        one_of(self, "device", DEVICES)
        at_least(self, 1, "top_k", "batch_size", "explain_top_k")
        within(self, "min_confidence", 0, 1)
        writable(self, "explain", folder=True)
        if self.explain_top_k > 1 and self.explain is None:
            raise SettingError("explain_top_k", "needs explain, the folder the overlays go to")
        if self.out is not None and str(self.out) != "-":
            if Path(self.out).suffix.lower() not in (".csv", ".json"):
                raise SettingError("out", f"must end in .csv or .json, got {shown(self.out)!r}")
            writable(self, "out", folder=False)


def predict_inputs(inputs: list[str], model: Path | None = None, *, runs_dir: Path = DEFAULT_RUNS_DIR,
                   device: str = PredictSettings.device, top_k: int = PredictSettings.top_k,
                   batch_size: int = PredictSettings.batch_size, raw: bool = False,
                   min_confidence: float | None = None, explain: Path | None = None,
                   explain_top_k: int = PredictSettings.explain_top_k, out: Path | None = None,
                   on_prediction: Callable[[Prediction], None] | None = None
                   ) -> tuple[OnnxClassifier, list[Prediction], list[tuple[Path, str]]]:
    """``dogkit predict``: ``model`` (default: the best exported run's) on every file the inputs name, written to
    ``out`` (.csv or .json) when given. Returns the classifier, the predictions, and every input or file set
    aside with its reason."""
    PredictSettings(device, top_k, batch_size, min_confidence, explain, explain_top_k, out)
    classifier = OnnxClassifier(model or exported_model(None, runs_dir), device=device)
    if explain is not None and not classifier.explains:
        raise DogkitError(classifier.why_no_maps())  # before reading any input
    files, skipped = collect_inputs(inputs)
    if not files:
        why = "; ".join(f"{shown(p)}: {reason}" for p, reason in skipped[:5])
        raise DogkitError(f"no files to predict in {', '.join(map(shown, inputs))}" + (f" ({why})" if why else ""))
    predictions, failures = predict(classifier, files, top_k=top_k, batch_size=batch_size, skipped=skipped, raw=raw,
                                    min_confidence=min_confidence, explain=explain, explain_top_k=explain_top_k,
                                    on_prediction=on_prediction)
    if out is not None and str(out) != "-":
        write_predictions(predictions, Path(out), skipped + failures)
    return classifier, predictions, skipped + failures


class PredictionWriter:
    """Predictions as CSV or one JSON array, written row by row as they come, so that ``dogkit predict … | head``
    sees its first rows before the last image is read. CSV: one row per prediction, then one per skipped input
    with its reason in the last column; ``answer`` is the top label or ``unsure``; with overlays, ``explain``
    (the top breed's), then ``explain2``… for the others. The header is fixed by the first row (every
    prediction lists the same number of breeds) and ``overlays``, the overlay columns asked for."""

    def __init__(self, out: TextIO, kind: str, overlays: int = 0):
        self.out, self.kind, self.overlays = out, kind, overlays
        self.labels: int | None = None  # breeds per row, from the first prediction
        self.rows = 0
        self.csv = csv.writer(out, lineterminator="\n")

    def _begin(self, labels: int) -> None:
        if self.labels is not None:
            return
        self.labels = labels
        if self.kind == "json":
            self.out.write("[")
            return
        shots = ["explain", *[f"explain{i + 1}" for i in range(1, self.overlays)]] if self.overlays else []
        self.csv.writerow(["path", *[f"{kind}{i + 1}" for i in range(labels) for kind in ("label", "prob")],
                           "answer", *shots, "error"])

    def _json(self, row: dict) -> None:
        text = json_text(row, indent=2, ensure_ascii=False).replace("\n", "\n  ")
        self.out.write(f"{',' if self.rows else ''}\n  {text}")

    def add(self, p: Prediction) -> None:
        self._begin(len(p.labels))
        if self.kind == "json":
            self._json({"path": p.path, "answer": p.answer, "unsure": p.unsure,
                        "top": [{"label": lab, "prob": prob} for lab, prob in zip(p.labels, p.probs)],
                        **({"explain": p.explain} if p.explain else {}), **({"error": p.error} if p.error else {})})
        else:
            self.csv.writerow([p.path, *[v for lab, prob in zip(p.labels, p.probs) for v in (lab, _prob_text(prob))],
                               p.answer, *(p.explain + [""] * (self.overlays - len(p.explain))), p.error])
        self.rows += 1
        self.out.flush()

    def close(self, skipped: Skipped = ()) -> None:
        self._begin(self.labels or 0)
        for path, reason in skipped:
            if self.kind == "json":
                self._json({"path": shown(path), "error": reason})
            else:
                self.csv.writerow([shown(path), *[""] * (2 * self.labels + 1 + self.overlays), reason])
            self.rows += 1
        if self.kind == "json":
            self.out.write("\n]\n" if self.rows else "]\n")
        self.out.flush()


def _prob_text(prob: float) -> str:
    return f"{prob:.6f}" if np.isfinite(prob) else ""  # no number rather than "nan"


def format_predictions(predictions: list[Prediction], kind: str, skipped: Skipped = ()) -> str:
    """The predictions (and the skipped inputs, with their reasons) as the text of a .csv or .json file."""
    buf = io.StringIO()
    writer = PredictionWriter(buf, kind, max((len(p.explain) for p in predictions), default=0))
    for p in predictions:
        writer.add(p)
    writer.close(skipped)
    return buf.getvalue()


def write_predictions(predictions: list[Prediction], out: Path, skipped: Skipped = ()) -> None:
    """The rows in ``out`` (.json or .csv); if it cannot be written (a full disk), they go to stdout instead, so
    that no prediction is lost, and the error says so."""
    text = format_predictions(predictions, "json" if out.suffix.lower() == ".json" else "csv", skipped)
    try:
        atomic_write_text(out, text)
    except OSError as e:
        sys.stdout.write(text)
        sys.stdout.flush()
        raise DogkitError(f"{write_problem(out, e)}; the {len(predictions)} predictions are on stdout instead") \
            from None
