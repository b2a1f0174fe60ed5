"""Quality of predicted click probabilities, aggregated on the executors.

The test day has millions of rows at full size, so every metric here is a Spark
aggregation whose result is a handful of rows: nothing collects the scored rows to the
driver. :func:`evaluate` takes any frame with a 0/1 label and a predicted probability
(and optionally a user id), so it scores every model alike: each feature set's logistic
regression, the factorization machine and the synthetic data's oracle.

Definitions, over the ``n`` rows with labels ``y`` and predictions ``p``:

- ``auc``: area under the ROC curve, exact: the share of (click, non-click) pairs whose
  click has the higher prediction, a tie counting half (the trapezoidal ROC, as
  scikit-learn's ``roc_auc_score``). None unless both classes occur.
- ``gauc``: group AUC as DIN reports it (Zhou et al. 2018): each user's own AUC over
  their impressions, averaged with the user's impression count as weight,
  ``sum_u n_u * AUC_u / sum_u n_u``, over the users with at least one click and one
  non-click (the AUC of any other user is undefined). ``gauc_users`` and
  ``gauc_impressions`` say how many users and impressions that covers, ``test_users``
  how many users the rows have. Only computed when a user column is given.
- ``logloss``: mean of ``-(y log p + (1 - y) log(1 - p))``, with ``p`` clipped to
  ``[1e-15, 1 - 1e-15]``.
- ``normalized_entropy``: the logloss divided by the entropy of the observed CTR
  ``c = mean(y)``, ``-(c log c + (1 - c) log(1 - c))``: the logloss relative to always
  predicting the base rate (He et al. 2014); below 1 is better than that. None unless
  both classes occur.
- ``reliability``: the rows sorted by prediction and split into ``bins`` groups of
  (nearly) equal size, each with its row count, prediction range, mean prediction and
  observed CTR. CTRs crowd into a narrow range, where equal-width bins would leave most
  bins empty. Bin edges are quantiles within a 10,000th of the rows; rows tied on an
  edge share the lower bin.
- ``calibration_error``: the row-weighted mean absolute gap between mean prediction and
  observed CTR over those bins.
- ``roc``: at most :data:`ROC_POINTS` points of the ROC curve for plotting, as three
  lists: for each ``threshold``, the true and false positive rates of predicting a click
  where ``p >= threshold``. The thresholds are the smallest prediction and quantiles of
  the predictions, so the points spread evenly over the rows; the first point is (0, 0),
  with threshold None. Empty lists unless both classes occur.
"""

from __future__ import annotations

import math
from typing import Any

from pyspark import StorageLevel
from pyspark.ml.evaluation import BinaryClassificationEvaluator
from pyspark.ml.feature import Bucketizer
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F  # noqa: N812 - the conventional alias

from adrec.core.dataset import TRUTH_FILE
from jobs.ingest import event_day_column, on_test_day
from jobs.spark import aggregate_row

RELIABILITY_BINS = 10
#: Most points of a reported ROC curve: enough for a smooth plot, small in the JSON.
ROC_POINTS = 200

_EPSILON = 1e-15
# Rank error of the reliability bins' edges and the ROC thresholds: a 10,000th of the rows.
_QUANTILE_ERROR = 1e-4


def evaluate(
    scored: DataFrame,
    bins: int = RELIABILITY_BINS,
    label: str = "label",
    probability: str = "probability",
    user: str | None = None,
    roc_points: int = ROC_POINTS,
) -> dict[str, Any]:
    """The metrics of the module docstring for ``scored``'s ``label`` and ``probability``;
    ``user`` names the column the group AUC groups by, or None to skip it."""
    if roc_points < 2:
        raise ValueError("roc_points must be at least 2: the curve's two ends")
    columns = [
        F.col(label).cast("double").alias("label"),
        F.col(probability).cast("double").alias("probability"),
    ]
    if user is not None:
        columns.append(F.col(user).alias("user"))
    frame = scored.select(*columns).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        return _evaluate(frame, bins, grouped=user is not None, roc_points=roc_points)
    finally:
        frame.unpersist()


def _entropy(rate: float) -> float:
    return -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))


def _evaluate(frame: DataFrame, bins: int, grouped: bool, roc_points: int) -> dict[str, Any]:
    clipped = F.least(F.greatest(F.col("probability"), F.lit(_EPSILON)), F.lit(1 - _EPSILON))
    row_loss = -(
        F.col("label") * F.log(clipped) + (F.lit(1.0) - F.col("label")) * F.log(1 - clipped)
    )
    totals = aggregate_row(
        frame.agg(
            F.count(F.lit(1)).alias("rows"),
            F.sum("label").alias("clicks"),
            F.avg("probability").alias("mean_predicted"),
            F.min("probability").alias("min_predicted"),
            F.avg(row_loss).alias("logloss"),
        )
    )
    rows = int(totals["rows"])
    group_metrics = _group_auc(frame) if grouped else {}
    if rows == 0:
        return {
            "test_rows": 0,
            "auc": None,
            **group_metrics,
            "logloss": None,
            "normalized_entropy": None,
            "observed_ctr": None,
            "mean_predicted": None,
            "calibration_error": None,
            "reliability": [],
            "roc": {"threshold": [], "fpr": [], "tpr": []},
        }
    clicks = float(totals["clicks"])
    logloss = float(totals["logloss"])
    observed = clicks / rows
    both_classes = 0 < clicks < rows
    auc = None
    if both_classes:
        evaluator = BinaryClassificationEvaluator(
            rawPredictionCol="probability", labelCol="label", metricName="areaUnderROC", numBins=0
        )
        auc = float(evaluator.evaluate(frame))
    # One pass for the quantiles of both the reliability bins and the ROC thresholds.
    bin_count = min(bins, rows)
    steps = roc_points - 1
    edge_levels = [i / bin_count for i in range(1, bin_count)]
    roc_levels = [i / steps for i in range(1, steps)] if both_classes else []
    quantiles = frame.approxQuantile("probability", edge_levels + roc_levels, _QUANTILE_ERROR)
    reliability = _reliability(frame, quantiles[: len(edge_levels)])
    gap = sum(b["rows"] * abs(b["mean_predicted"] - b["observed_ctr"]) for b in reliability)
    roc = (
        _roc(frame, float(totals["min_predicted"]), quantiles[len(edge_levels) :])
        if both_classes
        else {"threshold": [], "fpr": [], "tpr": []}
    )
    return {
        "test_rows": rows,
        "auc": auc,
        **group_metrics,
        "logloss": logloss,
        "normalized_entropy": logloss / _entropy(observed) if both_classes else None,
        "observed_ctr": observed,
        "mean_predicted": float(totals["mean_predicted"]),
        "calibration_error": float(gap / rows),
        "reliability": reliability,
        "roc": roc,
    }


def _group_auc(frame: DataFrame) -> dict[str, Any]:
    # Each user's AUC by ranks: a distinct prediction's clicks beat every non-click of the
    # same user predicted lower and tie with the non-clicks predicted the same. Counts are
    # whole numbers and halves, so the sums are exact in float64.
    levels = frame.groupBy("user", "probability").agg(
        F.sum("label").alias("clicks"),
        (F.count(F.lit(1)) - F.sum("label")).alias("non_clicks"),
    )
    below = (
        Window.partitionBy("user").orderBy("probability").rowsBetween(Window.unboundedPreceding, -1)
    )
    lower_non_clicks = F.coalesce(F.sum("non_clicks").over(below), F.lit(0.0))
    credit = F.col("clicks") * (lower_non_clicks + F.lit(0.5) * F.col("non_clicks"))
    users = (
        levels.withColumn("credit", credit)
        .groupBy("user")
        .agg(
            F.sum("clicks").alias("clicks"),
            F.sum("non_clicks").alias("non_clicks"),
            F.sum("credit").alias("credit"),
        )
    )
    defined = (F.col("clicks") > 0) & (F.col("non_clicks") > 0)
    impressions = F.col("clicks") + F.col("non_clicks")
    user_auc = F.col("credit") / (F.col("clicks") * F.col("non_clicks"))
    summary = aggregate_row(
        users.agg(
            F.count(F.lit(1)).alias("users"),
            F.count(F.when(defined, True)).alias("gauc_users"),
            F.sum(F.when(defined, impressions)).alias("gauc_impressions"),
            F.sum(F.when(defined, impressions * user_auc)).alias("weighted_auc"),
        )
    )
    covered = int(summary["gauc_impressions"] or 0)
    return {
        "gauc": float(summary["weighted_auc"]) / covered if covered else None,
        "gauc_users": int(summary["gauc_users"]),
        "gauc_impressions": covered,
        "test_users": int(summary["users"]),
    }


def _reliability(frame: DataFrame, edges: list[float]) -> list[dict[str, Any]]:
    # A row's bin is the number of edges below its prediction: rows tied on an edge
    # share the lower bin.
    position = sum(((F.col("probability") > F.lit(edge)).cast("int") for edge in edges), F.lit(0))
    grouped = (
        frame.groupBy(position.alias("bin"))
        .agg(
            F.count(F.lit(1)).alias("rows"),
            F.min("probability").alias("min_predicted"),
            F.max("probability").alias("max_predicted"),
            F.avg("probability").alias("mean_predicted"),
            F.avg("label").alias("observed_ctr"),
        )
        .orderBy("bin")
        .collect()
    )
    return [
        {
            "rows": int(row["rows"]),
            "min_predicted": float(row["min_predicted"]),
            "max_predicted": float(row["max_predicted"]),
            "mean_predicted": float(row["mean_predicted"]),
            "observed_ctr": float(row["observed_ctr"]),
        }
        for row in grouped
    ]


def _roc(frame: DataFrame, lowest: float, quantiles: list[float]) -> dict[str, list[float | None]]:
    thresholds = sorted({lowest, *(q for q in quantiles if q > lowest)})
    # Bucket j + 1 holds the predictions from thresholds[j] up to the next threshold, so
    # the rows at or above thresholds[j] are the buckets from j + 1 on; nothing is below
    # the lowest prediction, so bucket 0 stays empty.
    bucketizer = Bucketizer(
        splits=[-math.inf, *thresholds, math.inf], inputCol="probability", outputCol="bucket"
    )
    counts = {
        int(row["bucket"]): (float(row["clicks"]), float(row["rows"]) - float(row["clicks"]))
        for row in bucketizer.transform(frame)
        .groupBy("bucket")
        .agg(F.sum("label").alias("clicks"), F.count(F.lit(1)).alias("rows"))
        .collect()
    }
    clicks = sum(c for c, _ in counts.values())
    non_clicks = sum(n for _, n in counts.values())
    curve: dict[str, list[float | None]] = {"threshold": [None], "fpr": [0.0], "tpr": [0.0]}
    true_positives = false_positives = 0.0
    for j in range(len(thresholds) - 1, -1, -1):
        bucket_clicks, bucket_non_clicks = counts.get(j + 1, (0.0, 0.0))
        true_positives += bucket_clicks
        false_positives += bucket_non_clicks
        curve["threshold"].append(thresholds[j])
        curve["fpr"].append(false_positives / non_clicks)
        curve["tpr"].append(true_positives / clicks)
    return curve


def oracle_metrics(spark: SparkSession, data_dir: str) -> dict[str, Any]:
    """:func:`evaluate` of the synthetic data's true click probabilities on the test day.

    The generator writes one truth row per raw_sample row with its click and the exact
    probability it was drawn with, so this is the best any model can do on day 8.
    """
    schema = (
        "user int, time_stamp bigint, adgroup_id int, pid string, clk int, click_probability double"
    )
    truth = spark.read.csv(
        f"{data_dir.rstrip('/')}/{TRUTH_FILE}", schema=schema, header=True, mode="FAILFAST"
    )
    test = truth.where(on_test_day(event_day_column(F.col("time_stamp"))))
    return evaluate(test, label="clk", probability="click_probability", user="user")
