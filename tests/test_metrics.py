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


def test_macro_averages_run_over_the_classes_present_as_scikit_learn_does():
    from sklearn.metrics import f1_score, precision_score, recall_score

    # Two of 120 classes in the data, every prediction right: 1.0, not 2/120.
    labels = np.array([3, 3, 7, 7, 7])
    m = classification_metrics(labels, scores_for(labels, 120))
    assert m["precision_macro"] == m["recall_macro"] == m["f1_macro"] == 1.0 and m["macro_classes"] == 2
    # A wrong prediction into a class absent from the data counts that class (precision 0), as scikit-learn does.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 200)
    preds = np.where(rng.random(200) < 0.7, labels, rng.integers(0, 10, 200))
    m = classification_metrics(labels, scores_for(preds, 50))
    assert m["macro_classes"] == len(set(labels) | set(preds)) > 6
    for name, fn in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score)):
        for average in ("macro", "weighted"):
            assert m[f"{name}_{average}"] == pytest.approx(fn(labels, preds, average=average, zero_division=0),
                                                           abs=1e-12), (name, average)
    np.testing.assert_allclose(macro_scores(labels, preds, 50)[1:],
                               [m["precision_macro"], m["recall_macro"], m["f1_macro"]], atol=1e-12)


def test_the_resampling_macro_scores_equal_scikit_learns_on_random_resamples():
    from sklearn.metrics import precision_recall_fscore_support

    rng = np.random.default_rng(1)
    for case in range(300):
        n, classes = int(rng.integers(1, 60)), int(rng.integers(1, 130))
        labels = rng.integers(0, classes, n)
        # from all right to all random, some predictions into classes absent from the labels
        preds = np.where(rng.random(n) < rng.random(), labels, rng.integers(0, classes, n))
        present = np.union1d(labels, preds)
        p, r, f, _ = precision_recall_fscore_support(labels, preds, labels=present, average="macro", zero_division=0)
        np.testing.assert_allclose(macro_scores(labels, preds, classes), [(labels == preds).mean(), p, r, f],
                                   atol=1e-12, err_msg=f"case {case}")
    with pytest.raises(ValueError, match="class 5 is out of range for 5 classes"):
        macro_scores(np.array([0, 5]), np.array([0, 1]), 5)


def test_eval_report_of_two_breeds_all_right_is_one_and_states_the_rule(tmp_path):
    import json

    from dogkit.analysis.evaluate import write_report

    names = [f"breed{i}" for i in range(120)]
    labels = np.array([0] * 8 + [57] * 8)
    metrics = write_report(tmp_path, labels, scores_for(labels, 120), names, {"backend": "onnx"})
    assert metrics["precision_macro"] == metrics["recall_macro"] == metrics["f1_macro"] == 1.0  # was 2/120
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metrics"]["f1_macro"] == 1.0 and "classes present" in saved["macro_average"]
    rows = (tmp_path / "per_class.csv").read_text().splitlines()
    assert len(rows) == 121  # the per-class table still lists every class the model knows
