"""Statistics for comparing regimes honestly: bootstrap intervals, McNemar's test, paired differences over seeds
(calibration is ``dogkit.calibration``, shared with export and the deploy core)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import binomtest


def bootstrap_ci(labels: np.ndarray, preds: np.ndarray, metric: Callable[[np.ndarray, np.ndarray], float | np.ndarray],
                 *, resamples: int = 1000, level: float = 0.95, seed: int = 0):
    """Percentile interval of ``metric`` over test images resampled with replacement (seeded).

    A scalar metric gives one (low, high); a metric returning several values (computed together, once
    per resample) gives a list of (low, high), one per value.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    values = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        values.append(metric(labels[idx], preds[idx]))
    alpha = (1 - level) / 2
    low, high = np.quantile(np.asarray(values, dtype=float), [alpha, 1 - alpha], axis=0)
    if np.ndim(low) == 0:
        return float(low), float(high)
    return [(float(lo), float(hi)) for lo, hi in zip(low, high)]


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """Exact McNemar test on paired per-image correctness: only discordant images carry information."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    p = 1.0 if n == 0 else float(binomtest(only_a, n, 0.5).pvalue)
    return {"only_a_correct": only_a, "only_b_correct": only_b, "p_value": p}


def paired_difference(a, b, level: float = 0.95) -> dict:
    """Mean of the paired differences a − b (one pair per seed) with its t interval and the paired t-test.

    Seeds vary the initialisation, the batch order and the augmentation on one fixed split, so this
    answers "which recipe is better", where McNemar on one pair of models answers "which model".
    Fewer than two pairs, or differences with no spread, have no interval and no p-value.
    """
    from scipy.stats import ttest_rel

    a, b = np.asarray(a, float), np.asarray(b, float)
    d = a - b
    out = {"pairs": int(len(d)), "mean": float(d.mean()) if len(d) else float("nan"), "ci": None, "p_value": None,
           "differences": d.tolist()}
    if len(d) >= 2 and np.ptp(d) > 0:
        result = ttest_rel(a, b)
        ci = result.confidence_interval(level)
        out.update(ci=(float(ci.low), float(ci.high)), p_value=float(result.pvalue))
    return out
