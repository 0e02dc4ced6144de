"""Classification metrics from scores and labels, with scikit-learn; numpy only, no torch."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support


def classification_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Accuracy, top-5, and macro / weighted precision, recall and F1 from (N, C) scores.

    Averages run over all C classes (``labels=range(C)``); a class with no images or no predictions
    scores 0 there (``zero_division=0``) rather than being silently dropped.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    num_classes = scores.shape[1]
    preds = scores.argmax(axis=1)
    classes = np.arange(num_classes)
    out = {"accuracy": float((preds == labels).mean()) if len(labels) else float("nan")}
    # A hit anywhere among the five best scores (every prediction hits with five classes or fewer).
    top = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    out["top5"] = float((top == labels[:, None]).any(axis=1).mean()) if len(labels) else float("nan")
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(labels, preds, labels=classes, average=average, zero_division=0)
        out[f"precision_{average}"], out[f"recall_{average}"], out[f"f1_{average}"] = float(p), float(r), float(f)
    return out


def macro_scores(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """[accuracy, macro precision, macro recall, macro F1] from hard predictions (one pass, for resampling)."""
    p, r, f, _ = precision_recall_fscore_support(labels, preds, labels=np.arange(num_classes), average="macro",
                                                 zero_division=0)
    return np.array([(labels == preds).mean(), p, r, f])


def per_class_report(labels: np.ndarray, preds: np.ndarray, class_names: list[str]) -> list[dict]:
    """One row per class: precision, recall, F1 and support."""
    classes = np.arange(len(class_names))
    p, r, f, s = precision_recall_fscore_support(labels, preds, labels=classes, zero_division=0)
    return [{"class": name, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(class_names)]


def confusion(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    return confusion_matrix(labels, preds, labels=np.arange(num_classes))
