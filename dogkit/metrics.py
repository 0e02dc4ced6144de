"""Classification metrics from scores and labels, with scikit-learn; numpy only, no torch."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

# scikit-learn's own rule (``labels=None``): a class absent from the evaluated images that is never
# predicted either says nothing about the model and is left out, so a folder of two breeds with every
# prediction right scores 1.0, not 2/120. A class predicted but absent scores precision 0 and counts.
MACRO_RULE = "macro averages run over the classes present in the true labels or the predictions"


def present_classes(labels: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """The classes the macro averages run over: those in the true labels or the predictions."""
    return np.union1d(np.asarray(labels), np.asarray(preds)).astype(np.int64)


def classification_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Accuracy, top-5, and macro / weighted precision, recall and F1 from (N, C) scores.

    Macro averages follow ``MACRO_RULE``; ``macro_classes`` says how many classes they ran over.
    Within them, a class with no images or no predictions scores 0 (``zero_division=0``).
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    preds = scores.argmax(axis=1)
    classes = present_classes(labels, preds)
    out = {"accuracy": float((preds == labels).mean()) if len(labels) else float("nan")}
    # A hit anywhere among the five best scores (every prediction hits with five classes or fewer).
    top = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    out["top5"] = float((top == labels[:, None]).any(axis=1).mean()) if len(labels) else float("nan")
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(labels, preds, labels=classes, average=average, zero_division=0)
        out[f"precision_{average}"], out[f"recall_{average}"], out[f"f1_{average}"] = float(p), float(r), float(f)
    out["macro_classes"] = float(len(classes))
    return out


def macro_scores(labels: np.ndarray, preds: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """[accuracy, macro precision, macro recall, macro F1] from hard predictions, for resampling.

    Same rule as ``classification_metrics`` (scikit-learn's, which it is tested against), applied to the images
    given (each bootstrap resample's own classes); ``num_classes`` only checks that the labels fit the model.
    Counted with ``np.bincount``: a report draws 1,000 resamples per run, and scikit-learn's input checks made
    that seconds per run.
    """
    labels, preds = np.asarray(labels, np.int64), np.asarray(preds, np.int64)
    size = int(max(labels.max(initial=-1), preds.max(initial=-1))) + 1
    if num_classes is not None and size > num_classes:
        raise ValueError(f"class {size - 1} is out of range for {num_classes} classes")
    hits = labels == preds
    true = np.bincount(labels, minlength=size)
    predicted = np.bincount(preds, minlength=size)
    right = np.bincount(labels[hits], minlength=size)
    present = (true + predicted) > 0
    if not present.any():
        return np.zeros(4)
    true, predicted, right = true[present], predicted[present], right[present]
    # zero_division=0: a class never predicted has precision 0, one absent from the labels recall 0
    precision = np.divide(right, predicted, out=np.zeros(len(right)), where=predicted > 0)
    recall = np.divide(right, true, out=np.zeros(len(right)), where=true > 0)
    f1 = 2 * right / (true + predicted)  # the harmonic mean of the two, 0 where nothing is right
    return np.array([hits.mean(), precision.mean(), recall.mean(), f1.mean()])


def per_class_report(labels: np.ndarray, preds: np.ndarray, class_names: list[str]) -> list[dict]:
    """One row per class the model knows: precision, recall, F1 and support (0 for classes not in the data)."""
    classes = np.arange(len(class_names))
    p, r, f, s = precision_recall_fscore_support(labels, preds, labels=classes, zero_division=0)
    return [{"class": name, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(class_names)]


def confusion(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    return confusion_matrix(labels, preds, labels=np.arange(num_classes))
