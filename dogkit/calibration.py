"""Calibrated confidence and selective prediction, from logits and labels; numpy and SciPy, no torch.

- Temperature scaling (Guo et al., ICML 2017): one scalar ``T`` that minimises the negative log-likelihood of
  ``softmax(logits / T)`` on the validation split. Dividing by a positive scalar never changes a top-1.
- Expected calibration error: the gap between confidence (the top-1 probability) and accuracy, averaged over
  equal-width confidence bins weighted by their share of images; the reliability diagram draws the bins.
- Selective prediction: answer only at a confidence of at least a threshold, chosen on validation as the lowest
  one whose answered images reach a target precision (the share of answers that are right); below it the
  answer is "unsure". The risk–coverage curve is precision against the share of images answered.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

BINS = 15  # Guo et al.'s count
T_RANGE = (0.05, 20.0)  # the search interval; a fit at either end says the logits are degenerate
TARGET_PRECISION = 0.95


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return softmax(np.asarray(logits, np.float64) / temperature, axis=1).astype(np.float32)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    logp = log_softmax(np.asarray(logits, np.float64) / temperature, axis=1)
    return float(-logp[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises validation NLL, searched over log T (a bounded 1-D problem: the NLL is
    convex in 1/T, so the minimum is unique)."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
    if len(labels) == 0:
        raise ValueError("no images to fit a temperature on")
    lo, hi = np.log(T_RANGE[0]), np.log(T_RANGE[1])
    best = minimize_scalar(lambda s: nll(logits, labels, float(np.exp(s))), bounds=(lo, hi), method="bounded",
                           options={"xatol": 1e-5})
    return float(np.exp(best.x))


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> list[dict]:
    """One row per non-empty confidence bin ((lo, hi], the first [0, hi]): its bounds, image count, mean
    confidence and accuracy."""
    conf, correct = np.asarray(probs).max(1), np.asarray(probs).argmax(1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        inside = which == b
        if inside.any():
            rows.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "images": int(inside.sum()),
                         "confidence": float(conf[inside].mean()), "accuracy": float(correct[inside].mean())})
    return rows


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    rows = reliability(probs, labels, bins)
    total = sum(r["images"] for r in rows)
    return float(sum(r["images"] * abs(r["accuracy"] - r["confidence"]) for r in rows) / total) if total else 0.0


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each distinct confidence as the threshold, from the highest down: (threshold, coverage, precision),
    coverage being the share of images with a confidence of at least the threshold and precision the share of
    those that are right."""
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, bool)
    order = np.argsort(-confidence, kind="stable")
    conf, hits = confidence[order], np.cumsum(correct[order])
    # the last image of each run of equal confidences: a threshold answers all of them or none
    last = np.r_[np.flatnonzero(np.diff(conf) != 0), len(conf) - 1] if len(conf) else np.array([], int)
    answered = last + 1
    return conf[last], answered / max(len(conf), 1), hits[last] / answered


def threshold_for(confidence: np.ndarray, correct: np.ndarray, target: float = TARGET_PRECISION) -> dict:
    """The lowest confidence threshold whose answered images reach ``target`` precision, with the precision and
    coverage it gives; when no threshold does, ``threshold`` is None (every answer is "unsure") and ``met`` false."""
    thresholds, coverage, precision = risk_coverage(confidence, correct)
    ok = np.flatnonzero(precision >= target)
    record = {"target_precision": float(target), "images": int(len(np.asarray(confidence)))}
    if not len(ok):
        return {**record, "threshold": None, "met": False, "precision": None, "coverage": 0.0}
    i = ok[-1]  # the lowest such threshold answers the most images
    return {**record, "threshold": float(thresholds[i]), "met": True, "precision": float(precision[i]),
            "coverage": float(coverage[i])}


def calibrate(logits: np.ndarray, labels: np.ndarray, target: float = TARGET_PRECISION) -> dict:
    """What export stores: the temperature, validation NLL and ECE before and after, and the selective threshold
    (on calibrated confidence) for ``target`` precision."""
    labels = np.asarray(labels)
    t = fit_temperature(logits, labels)
    raw, cal = probabilities(logits), probabilities(logits, t)
    selective = threshold_for(cal.max(1), cal.argmax(1) == labels, target)
    return {"temperature": t, "images": int(len(labels)), "bins": BINS,
            "nll_raw": nll(logits, labels), "nll": nll(logits, labels, t),
            "ece_raw": ece(raw, labels), "ece": ece(cal, labels), "selective": selective}


def curve_points(confidence: np.ndarray, correct: np.ndarray, points: int = 200) -> list[dict]:
    """The risk–coverage curve at up to ``points`` evenly spaced coverages, small enough to store and plot."""
    thresholds, coverage, precision = risk_coverage(confidence, correct)
    if len(coverage) > points:
        keep = np.unique(np.searchsorted(coverage, np.linspace(coverage[0], 1.0, points)).clip(0, len(coverage) - 1))
        thresholds, coverage, precision = thresholds[keep], coverage[keep], precision[keep]
    return [{"threshold": float(t), "coverage": float(c), "precision": float(p)}
            for t, c, p in zip(thresholds, coverage, precision)]


def summary(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0, threshold: float | None = None,
            bins: int = BINS) -> dict:
    """How calibrated a model is on some images, raw and at ``temperature``, and what its "unsure" threshold
    (on calibrated confidence; None: none stored) gives there: what eval writes and the report draws."""
    labels = np.asarray(labels)
    raw, cal = probabilities(logits), probabilities(logits, temperature)
    conf, correct = cal.max(1), cal.argmax(1) == labels
    out = {"images": int(len(labels)), "temperature": float(temperature), "bins": bins,
           "ece_raw": ece(raw, labels, bins), "ece": ece(cal, labels, bins),
           "nll_raw": nll(logits, labels), "nll": nll(logits, labels, temperature),
           "reliability_raw": reliability(raw, labels, bins), "reliability": reliability(cal, labels, bins),
           "risk_coverage": curve_points(conf, correct)}
    if threshold is not None:
        answered = conf >= threshold
        out["selective"] = {"threshold": None if threshold == float("inf") else float(threshold),
                            "coverage": float(answered.mean()) if len(labels) else 0.0,
                            "precision": float(correct[answered].mean()) if answered.any() else None,
                            "answered": int(answered.sum())}
    return out
