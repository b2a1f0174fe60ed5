"""The evaluation metrics against reference computations: by hand, and scikit-learn's.

Real local Spark on small frames.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from jobs import evaluation

pytestmark = pytest.mark.spark


def scored_frame(spark, labels, predicted, users=None):
    if users is None:
        rows = [(float(y), float(p)) for y, p in zip(labels, predicted, strict=True)]
        return spark.createDataFrame(rows, "label double, probability double")
    rows = [(float(y), float(p), int(u)) for y, p, u in zip(labels, predicted, users, strict=True)]
    return spark.createDataFrame(rows, "label double, probability double, user_id int")


def reference_gauc(labels, predicted, users):
    """DIN's group AUC written plainly: sklearn's AUC per user with both classes, weighted
    by the user's impressions."""
    weighted, impressions, counted = 0.0, 0, 0
    for user in np.unique(users):
        mine = users == user
        if len(np.unique(labels[mine])) == 2:
            weighted += mine.sum() * roc_auc_score(labels[mine], predicted[mine])
            impressions += int(mine.sum())
            counted += 1
    return weighted / impressions, counted, impressions


def entropy(rate):
    return -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))


def test_evaluate_on_a_hand_computable_example(spark):
    labels = np.array([0, 0, 1, 1, 0, 1])
    predicted = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    metrics = evaluation.evaluate(scored_frame(spark, labels, predicted), bins=3)
    # Positive-negative pairs ranked right: 0.35 beats 0.1 and 0.2, 0.8 and 0.9 beat all.
    assert metrics["auc"] == pytest.approx(8 / 9)
    expected_logloss = -np.mean(np.log([0.9, 0.6, 0.35, 0.8, 0.8, 0.9]))
    assert metrics["logloss"] == pytest.approx(expected_logloss)
    assert metrics["normalized_entropy"] == pytest.approx(expected_logloss / np.log(2))
    assert metrics["observed_ctr"] == 0.5
    assert metrics["mean_predicted"] == pytest.approx(2.75 / 6)
    assert [(b["rows"], b["observed_ctr"]) for b in metrics["reliability"]] == [
        (2, 0.0),
        (2, 0.5),
        (2, 1.0),
    ]
    assert metrics["reliability"][1]["mean_predicted"] == pytest.approx(0.375)
    gaps = [abs(0.15 - 0.0), abs(0.375 - 0.5), abs(0.85 - 1.0)]
    assert metrics["calibration_error"] == pytest.approx(sum(gaps) / 3)
    assert "gauc" not in metrics
    # Six distinct predictions, fewer than the point budget: the exact ROC curve.
    roc = metrics["roc"]
    assert roc["threshold"] == [None, 0.9, 0.8, 0.4, 0.35, 0.2, 0.1]
    assert roc["tpr"] == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1])
    assert roc["fpr"] == pytest.approx([0, 0, 0, 1 / 3, 1 / 3, 2 / 3, 1])


def test_evaluate_without_both_classes_has_no_auc_ne_or_roc(spark):
    metrics = evaluation.evaluate(scored_frame(spark, np.zeros(4), np.full(4, 0.1)))
    assert metrics["auc"] is None and metrics["normalized_entropy"] is None
    assert metrics["logloss"] == pytest.approx(-np.log(0.9))
    assert metrics["roc"] == {"threshold": [], "fpr": [], "tpr": []}


def test_evaluate_of_no_rows(spark):
    empty = scored_frame(spark, [], [], users=[])
    metrics = evaluation.evaluate(empty, user="user_id")
    assert metrics["test_rows"] == 0 and metrics["auc"] is None
    assert metrics["gauc"] is None and metrics["gauc_users"] == 0 and metrics["test_users"] == 0


def test_metrics_match_sklearn_with_ties_and_one_class_users(spark):
    rng = np.random.default_rng(11)
    rows = 5_000
    # Rounded predictions: many ties, which an exact AUC counts as half, within users too.
    predicted = np.round(rng.uniform(0.01, 0.2, rows), 2)
    labels = (rng.random(rows) < predicted * 2).astype(float)
    # Users of 1 to ~60 impressions: many have only non-clicks, some a single row.
    users = rng.zipf(1.6, rows) % 400
    metrics = evaluation.evaluate(scored_frame(spark, labels, predicted, users), user="user_id")

    assert metrics["auc"] == pytest.approx(roc_auc_score(labels, predicted), abs=1e-12)
    assert metrics["logloss"] == pytest.approx(log_loss(labels, predicted), rel=1e-12)
    assert metrics["normalized_entropy"] == pytest.approx(
        log_loss(labels, predicted) / entropy(labels.mean()), rel=1e-12
    )
    gauc, gauc_users, gauc_impressions = reference_gauc(labels, predicted, users)
    one_class = len(np.unique(users)) - gauc_users
    assert one_class > 10 and gauc_impressions < rows
    assert metrics["gauc"] == pytest.approx(gauc, abs=1e-12)
    assert metrics["gauc_users"] == gauc_users
    assert metrics["gauc_impressions"] == gauc_impressions
    assert metrics["test_users"] == len(np.unique(users))

    sizes = [b["rows"] for b in metrics["reliability"]]
    assert sum(sizes) == rows and len(sizes) <= 10


def test_group_auc_on_a_hand_computable_example(spark):
    # User 1: click at 0.5 over non-clicks 0.2 and (tied) 0.5 -> (1 + 0.5) / 2 = 0.75.
    # User 2: click 0.9 over non-click 0.1 -> 1. User 3: clicks only. User 4: one row.
    labels = np.array([1, 0, 0, 1, 0, 1, 1, 0])
    predicted = np.array([0.5, 0.2, 0.5, 0.9, 0.1, 0.3, 0.4, 0.6])
    users = np.array([1, 1, 1, 2, 2, 3, 3, 4])
    metrics = evaluation.evaluate(scored_frame(spark, labels, predicted, users), user="user_id")
    assert metrics["gauc"] == pytest.approx((3 * 0.75 + 2 * 1.0) / 5)
    assert (metrics["gauc_users"], metrics["gauc_impressions"], metrics["test_users"]) == (2, 5, 4)


def test_roc_points_are_bounded_and_lie_on_the_exact_curve(spark):
    rng = np.random.default_rng(3)
    rows = 4_000
    predicted = rng.beta(1, 15, rows)
    labels = (rng.random(rows) < predicted).astype(float)
    metrics = evaluation.evaluate(scored_frame(spark, labels, predicted), roc_points=50)
    roc = metrics["roc"]
    assert len(roc["fpr"]) == len(roc["tpr"]) == len(roc["threshold"])
    assert 40 <= len(roc["fpr"]) <= 50
    assert (roc["fpr"][0], roc["tpr"][0]) == (0.0, 0.0)
    assert (roc["fpr"][-1], roc["tpr"][-1]) == (1.0, 1.0)
    assert roc["threshold"][-1] == predicted.min()
    thresholds = np.array(roc["threshold"][1:])
    assert (np.diff(thresholds) < 0).all()
    positives, negatives = predicted[labels == 1], predicted[labels == 0]
    for threshold, fpr, tpr in zip(thresholds, roc["fpr"][1:], roc["tpr"][1:], strict=True):
        assert tpr == pytest.approx((positives >= threshold).mean(), abs=1e-12)
        assert fpr == pytest.approx((negatives >= threshold).mean(), abs=1e-12)
    # Quantile thresholds spread the points over the rows: no gap holds a large share.
    shares = np.diff(np.array(roc["fpr"]) * negatives.size + np.array(roc["tpr"]) * positives.size)
    assert shares.max() < rows / 10
    # The trapezoids under the points come close to the exact AUC.
    area = float(np.trapezoid(roc["tpr"], roc["fpr"]))
    assert area == pytest.approx(metrics["auc"], abs=0.01)


def test_roc_points_default_bound(spark):
    rng = np.random.default_rng(4)
    predicted = rng.random(3_000)
    labels = (rng.random(3_000) < predicted).astype(float)
    roc = evaluation.evaluate(scored_frame(spark, labels, predicted))["roc"]
    assert 150 < len(roc["fpr"]) <= evaluation.ROC_POINTS


def test_roc_points_must_include_both_ends(spark):
    with pytest.raises(ValueError, match="roc_points"):
        evaluation.evaluate(scored_frame(spark, [0, 1], [0.2, 0.4]), roc_points=1)
