import numpy as np
import pytest

from dogkit.metrics import classification_metrics, confusion, macro_scores, per_class_report


def scores_for(preds: np.ndarray, num_classes: int) -> np.ndarray:
    scores = np.zeros((len(preds), num_classes))
    scores[np.arange(len(preds)), preds] = 1.0
    return scores


def test_metrics_match_a_hand_computed_confusion_matrix():
    # Confusion matrix (rows = truth, columns = prediction):
    #   class 0: 3 right, 1 predicted as 1
    #   class 1: 2 right, 2 predicted as 2
    #   class 2: 1 right
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2])
    preds = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(confusion(labels, preds, 3), [[3, 1, 0], [0, 2, 2], [0, 0, 1]])
    m = classification_metrics(labels, scores_for(preds, 3))
    # precision: 3/3, 2/3, 1/3; recall: 3/4, 2/4, 1/1
    assert m["accuracy"] == pytest.approx(6 / 9)
    assert m["precision_macro"] == pytest.approx((1 + 2 / 3 + 1 / 3) / 3)
    assert m["recall_macro"] == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
    f1 = [2 * p * r / (p + r) for p, r in ((1, 3 / 4), (2 / 3, 1 / 2), (1 / 3, 1))]
    assert m["f1_macro"] == pytest.approx(sum(f1) / 3)
    assert m["recall_weighted"] == pytest.approx(6 / 9)  # weighted recall is accuracy
    assert m["precision_weighted"] == pytest.approx((4 * 1 + 4 * 2 / 3 + 1 * 1 / 3) / 9)
    rows = per_class_report(labels, preds, ["a", "b", "c"])
    assert rows[1] == {"class": "b", "precision": pytest.approx(2 / 3), "recall": 0.5, "f1": pytest.approx(4 / 7),
                       "support": 4}


def test_top5_counts_a_hit_anywhere_in_the_five_best():
    rng = np.random.default_rng(0)
    scores = rng.random((50, 10))
    labels = np.argsort(-scores, axis=1)[:, 4]  # the truth is always the 5th best
    labels[:10] = np.argsort(-scores[:10], axis=1)[:, 5]  # ... except 10 rows where it is the 6th
    m = classification_metrics(labels, scores)
    assert m["top5"] == pytest.approx(40 / 50)
    assert m["accuracy"] == 0.0


def test_top5_with_five_classes_or_fewer_is_always_a_hit():
    scores = np.array([[0.9, 0.05, 0.05], [0.1, 0.2, 0.7]])
    m = classification_metrics(np.array([2, 0]), scores)
    assert m["top5"] == 1.0 and m["accuracy"] == 0.0


def test_macro_scores_agree_with_the_full_metrics():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2])
    preds = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    full = classification_metrics(labels, scores_for(preds, 3))
    np.testing.assert_allclose(macro_scores(labels, preds, 3), [full["accuracy"], full["precision_macro"],
                                                                full["recall_macro"], full["f1_macro"]])


def test_classes_never_seen_keep_the_macro_average_over_all_classes():
    labels = np.array([0, 0, 1])
    m = classification_metrics(labels, scores_for(np.array([0, 0, 1]), 4))
    assert m["accuracy"] == 1.0
    assert m["recall_macro"] == pytest.approx(0.5)  # classes 2 and 3 have no images: 0 by convention
