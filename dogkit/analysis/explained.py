"""What a run's exported model says about itself on the test split: calibration, localisation and its worst
confusions with their maps. ONNX Runtime, numpy and OpenCV; no torch.

``explain_run`` runs ``<run>/model.onnx`` once over the test split with its activation maps (``run_maps``: one
inference per image gives the logits and every class's map) and stores ``<run>/explain.json``:
``calibration.summary`` at the temperature and "unsure" threshold the model carries (fitted on validation at
export), the model's own validation record, and ``Localisation.summary`` of the true class's maps against the
dogs' boxes. ``explain_logits.npz`` keeps the logits it scored (the gallery picks its images from them). The
report reads these files, and makes them for a run that has a model but no current file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.markup import escape

from ..atomic import atomic_path, atomic_write_bytes, atomic_write_text
from ..calibration import probabilities, summary
from ..deploy.explain import fitted
from ..errors import DogkitError
from ..log import log
from ..runs import read_json, run_data
from ..text import json_text, shown
from ..variants import base

EXPLAIN_FILE = "explain.json"
LOGITS_FILE = "explain_logits.npz"
MODEL_FILE = base().file  # the fp32 model: the one every regime has, with the maps and the fitted temperature
TILE = 224  # pixels of one gallery tile's side
GALLERY_IMAGES = 6


def current(run: Path) -> bool:
    """explain.json and its logits are there and newer than the model they describe."""
    try:
        made = min((run / EXPLAIN_FILE).stat().st_mtime, (run / LOGITS_FILE).stat().st_mtime)
        return made >= (run / MODEL_FILE).stat().st_mtime
    except OSError:
        return False


def _run_data(run: Path) -> Path:
    data = run_data(run)
    if data is None:
        raise DogkitError(f"{shown(run)} names no dataset in config.json")
    return data


def explain_run(run: Path, split: str = "test", batch_size: int = 32) -> dict:
    """Score ``<run>/model.onnx`` on ``split`` (calibration always; localisation when it has maps and saw whole
    photos: ``dogkit eval``'s own pass) and store the result in the run folder; returns what explain.json holds."""
    from ..deploy.evaluate import onnx_evaluation

    ev = onnx_evaluation(run / MODEL_FILE, _run_data(run), split, batch_size)
    result = {"model": str(run / MODEL_FILE), "split": split, "images": int(len(ev.labels)),
              "calibration": summary(ev.logits, ev.labels, ev.temperature, ev.threshold),
              "validation": ev.calibration or None, "explains": ev.explains, "localisation": ev.localisation}
    with atomic_path(run / LOGITS_FILE) as tmp, open(tmp, "wb") as f:  # a file object: savez adds no suffix
        np.savez(f, logits=ev.logits, labels=ev.labels, paths=np.asarray(ev.paths))
    atomic_write_text(run / EXPLAIN_FILE, json_text(result, indent=2) + "\n")
    return result


def explained(run: Path) -> tuple[dict | None, str | None]:
    """(explain.json's content, None), computed first when it is missing or older than the model; or (None, why
    there is none) in one line."""
    if not (run / MODEL_FILE).is_file():
        return None, f"no {MODEL_FILE} (not exported: `dogkit export {shown(run)}` makes one)"
    if current(run) and (stored := read_json(run / EXPLAIN_FILE)) is not None:
        return stored, None
    try:
        return explain_run(run), None
    except DogkitError as e:
        log.warning(f"[yellow]{escape(shown(run.name))}: no calibration or maps on test:[/] {escape(str(e))}")
        return None, str(e)


def stored_logits(run: Path) -> dict | None:
    try:
        with np.load(run / LOGITS_FILE) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError):
        return None


def worst_confusions(logits: np.ndarray, labels: np.ndarray, temperature: float, top: int = GALLERY_IMAGES
                     ) -> list[int]:
    """The ``top`` wrong answers given with the most (calibrated) confidence, most confident first: the mistakes a
    user would most believe."""
    probs = probabilities(logits, temperature)
    wrong = np.flatnonzero(probs.argmax(1) != labels)
    return wrong[np.argsort(-probs[wrong].max(1), kind="stable")][:top].tolist()


def _tile(picture: np.ndarray) -> np.ndarray:
    """The picture fitted to a TILE × TILE square, centred on black."""
    small = fitted(picture, TILE)
    out = np.zeros((TILE, TILE, 3), np.uint8)
    top, left = (TILE - small.shape[0]) // 2, (TILE - small.shape[1]) // 2
    out[top: top + small.shape[0], left: left + small.shape[1]] = small
    return out


def gallery(run: Path, path: Path, class_names: list[str], top: int = GALLERY_IMAGES) -> tuple[list[dict], str | None]:
    """A PNG grid at ``path``: one row per worst confusion (``worst_confusions``), the predicted breed's map on the
    left and the true breed's on the right. Returns (one row per image, None), or ([], why there is no grid)."""
    from ..deploy.evaluate import load_eval_data
    from ..deploy.explain import caption_text, overlay, png_bytes
    from ..deploy.runtime import OnnxClassifier

    stored = stored_logits(run)
    if stored is None:
        return [], f"no stored test logits ({LOGITS_FILE})"
    model = OnnxClassifier(run / MODEL_FILE)
    if not model.explains:
        return [], model.why_no_maps()
    picked = worst_confusions(stored["logits"], stored["labels"], model.temperature, top)
    if not picked:
        return [], "the model gets every test image right"
    try:
        dataset, _, _ = load_eval_data(_run_data(run), "test", model.class_names)  # the checks eval makes
    except DogkitError as e:
        return [], str(e)
    by_path = {r.path: r for r in dataset.records}
    probs = probabilities(stored["logits"], model.temperature)
    rows, tiles = [], []
    for i in picked:
        rec = by_path.get(str(stored["paths"][i]))
        if rec is None:
            continue
        rgb = dataset.load_rgb(rec, model.spec.box_crop, model.spec.orients)
        _, cams = model.run_maps(model.preprocess(rgb)[None])
        pred, true = int(probs[i].argmax()), int(stored["labels"][i])
        names = class_names if len(class_names) == probs.shape[1] else model.class_names
        rows.append({"path": rec.path, "true": names[true], "predicted": names[pred],
                     "confidence": float(probs[i, pred]), "true_probability": float(probs[i, true])})
        picture = fitted(rgb, TILE, enlarge=True)  # drawn at tile size: text drawn small, then enlarged, is unreadable
        tiles.append(np.hstack([_tile(overlay(picture, cams[0, k], model.spec,
                                              caption_text(f"{who}: {names[k]}", float(probs[i, k]))))
                                for who, k in (("predicted", pred), ("true", true))]))
    if not tiles:
        return [], "the wrong answers' images are not in the dataset"
    atomic_write_bytes(path, png_bytes(np.vstack(tiles)))
    return rows, None
