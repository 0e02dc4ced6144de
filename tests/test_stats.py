import numpy as np
import pytest

from dogkit.analysis.stats import bootstrap_ci, mcnemar
from dogkit.calibration import ece, reliability


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
    assert ece(probs, labels, bins=10) == pytest.approx(0.5 * 0.3 + 0.5 * 0.05)
    assert [(b["images"], b["accuracy"]) for b in reliability(probs, labels, bins=10)] == [(10, 0.5), (10, 0.6)]
    assert ece(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1])) == 0.0


def test_paired_difference_matches_a_t_interval_computed_by_hand_and_scipys_paired_test():
    from scipy import stats

    from dogkit.analysis.stats import paired_difference

    a = np.array([0.62, 0.58, 0.65])
    b = np.array([0.41, 0.44, 0.40])
    result = paired_difference(a, b)
    d = a - b
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    assert result["mean"] == pytest.approx(0.2)
    assert result["ci"] == pytest.approx((d.mean() - half, d.mean() + half))
    t = d.mean() / (d.std(ddof=1) / np.sqrt(len(d)))
    assert result["p_value"] == pytest.approx(2 * stats.t.sf(abs(t), len(d) - 1))
    assert result["p_value"] < 0.05 and result["pairs"] == 3
    assert result["differences"] == pytest.approx(d.tolist())
    # The sign follows the order; the interval and p do not depend on it.
    flipped = paired_difference(b, a)
    assert flipped["mean"] == pytest.approx(-0.2) and flipped["p_value"] == pytest.approx(result["p_value"])


def test_paired_difference_without_spread_or_with_one_pair_gives_no_interval():
    from dogkit.analysis.stats import paired_difference

    one = paired_difference([0.5], [0.3])
    assert one["mean"] == pytest.approx(0.2) and one["ci"] is None and one["p_value"] is None
    constant = paired_difference([0.5, 0.6], [0.4, 0.5])  # every seed differs by exactly 0.1
    assert constant["mean"] == pytest.approx(0.1) and constant["ci"] is None and constant["p_value"] is None
