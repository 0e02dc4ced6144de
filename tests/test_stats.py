import numpy as np
import pytest

from dogkit.analysis.stats import bootstrap_ci, calibration, mcnemar


def accuracy(y, p):
    return float((y == p).mean())


def test_mcnemar_exact_p_value_on_known_discordant_counts():
    # 10 images only A gets right, 2 only B: exact two-sided p = 2 * P(X <= 2 | n=12, 1/2) = 2 * 79 / 4096.
    a = np.array([1] * 10 + [0] * 2 + [1] * 30 + [0] * 8, bool)
    b = np.array([0] * 10 + [1] * 2 + [1] * 30 + [0] * 8, bool)
    result = mcnemar(a, b)
    assert (result["only_a_correct"], result["only_b_correct"]) == (10, 2)
    assert result["p_value"] == pytest.approx(2 * 79 / 4096)
    assert mcnemar(a, a)["p_value"] == 1.0


def test_bootstrap_interval_brackets_the_estimate_with_the_binomial_width():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, 2000)
    preds = np.where(rng.random(2000) < 0.8, labels, (labels + 1) % 5)  # 80% correct
    low, high = bootstrap_ci(labels, preds, accuracy, resamples=500)
    acc = accuracy(labels, preds)
    assert low < acc < high
    assert high - low == pytest.approx(2 * 1.96 * np.sqrt(acc * (1 - acc) / 2000), rel=0.2)
    assert bootstrap_ci(labels, preds, accuracy, resamples=500) == (low, high)  # seeded
    assert bootstrap_ci(labels, labels, accuracy, resamples=100) == (1.0, 1.0)
    # Several metrics from one pass per resample: the same intervals as one metric at a time.
    both = bootstrap_ci(labels, preds, lambda y, p: np.array([accuracy(y, p), 1 - accuracy(y, p)]), resamples=500)
    assert both[0] == pytest.approx((low, high))
    assert both[1] == pytest.approx((1 - high, 1 - low))


def test_calibration_error_on_known_confidences():
    # 10 images at confidence 0.9 of which 6 correct (gap 0.3); 10 at 0.55 of which 5 correct (gap 0.05).
    probs = np.zeros((20, 2))
    probs[:10] = [0.9, 0.1]
    probs[10:] = [0.55, 0.45]
    labels = np.array([0] * 6 + [1] * 4 + [0] * 5 + [1] * 5)
    result = calibration(probs, labels, bins=10)
    assert result["ece"] == pytest.approx(0.5 * 0.3 + 0.5 * 0.05)
    assert [(b["count"], b["accuracy"]) for b in result["bins"]] == [(10, 0.5), (10, 0.6)]
    perfect = calibration(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1]))
    assert perfect["ece"] == 0.0
