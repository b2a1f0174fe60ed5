"""CTR model training and evaluation: Spark ML logistic regression over the shared encoder.

Contract:

- :func:`encode_features` ``(examples, spec)`` -> ``examples`` plus ``features``
  (array<float>), encoded on the executors by :meth:`FeatureSpec.encode`, the call the
  ranking service makes, so training cannot drift from serving.
- :func:`train_ctr_model` ``(examples, spec, config)`` -> ``(CtrModel, metrics)``: fits
  on the ``train`` split (days 1-7) and evaluates the resulting :class:`CtrModel` on the
  ``test`` split (day 8); ``metrics`` is JSON-serialisable and also stored in the model.
- :func:`predict` ``(examples, model)`` -> ``label``, ``probability``: scores with the
  artifact itself, the numbers the service would produce.
- :func:`evaluate` ``(scored)`` -> AUC, logloss, calibration and a 10-bin reliability
  table of a ``label``, ``probability`` frame, computed on the executors (the test day
  has millions of rows at full size; only a few aggregates reach the driver);
  :func:`oracle_metrics` ``(spark, data_dir)`` gives the same for the synthetic data's
  true click probabilities on the test day.

Training is unweighted by default: the predicted CTRs are used as probabilities (ranking
scores, offline lists, the quality report), and reweighting the rare clicks would inflate
them all.

:func:`training_sample` bounds the training impressions with a seeded sample (a hash of
the row, so any partitioning picks the same rows), applied before the examples are
built: a model of a few dozen weights has converged long before tens of millions of
rows, while building each example and every L-BFGS iteration cost a pass over them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark import StorageLevel
from pyspark.ml.classification import LogisticRegression, LogisticRegressionModel
from pyspark.ml.evaluation import BinaryClassificationEvaluator
from pyspark.ml.functions import array_to_vector
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F  # noqa: N812 - the conventional alias
from pyspark.sql import types as T  # noqa: N812

from adrec.core.dataset import TRUTH_FILE
from adrec.core.features import FeatureSpec
from adrec.core.model import CtrModel
from jobs.ingest import event_day_column, on_test_day
from jobs.spark import aggregate_row

RELIABILITY_BINS = 10


@dataclasses.dataclass(frozen=True)
class CtrConfig:
    """Logistic-regression hyperparameters (Spark ML names in snake case)."""

    reg_param: float = 0.0
    elastic_net_param: float = 0.0
    max_iter: int = 100
    tol: float = 1e-6
    standardization: bool = True
    #: Weight of a click relative to a non-click; anything but 1 miscalibrates the CTRs.
    positive_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.reg_param < 0 or not 0 <= self.elastic_net_param <= 1:
            raise ValueError("reg_param must be >= 0 and elastic_net_param within [0, 1]")
        if self.max_iter < 1 or self.tol <= 0 or self.positive_weight <= 0:
            raise ValueError("max_iter, tol and positive_weight must be positive")


# ------------------------------------------------------------------ encoding


def encoder_inputs(batch: pa.RecordBatch, names: Iterable[str]) -> dict[str, np.ndarray]:
    """Columns of an Arrow batch as the encoder takes them: numbers as float64, null -> NaN."""
    columns: dict[str, np.ndarray] = {}
    for name in names:
        column = batch.column(name)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            columns[name] = column.to_numpy(zero_copy_only=False)
        else:
            as_float = pc.cast(column, pa.float64()).fill_null(np.nan)
            columns[name] = as_float.to_numpy(zero_copy_only=False)
    return columns


def _list_column(matrix: np.ndarray) -> pa.ListArray:
    rows, width = matrix.shape
    offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.ravel()))


def encode_features(examples: DataFrame, spec: FeatureSpec) -> DataFrame:
    """Adds ``features`` (array<float>, ``spec.dim`` wide) encoded by ``spec.encode``."""
    schema = T.StructType(
        [*examples.schema.fields, T.StructField("features", T.ArrayType(T.FloatType()), False)]
    )

    def encode(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            matrix = spec.encode(encoder_inputs(batch, spec.input_columns))
            yield pa.RecordBatch.from_arrays(
                [*batch.columns, _list_column(matrix)], names=[*batch.schema.names, "features"]
            )

    return examples.mapInArrow(encode, schema)


def predict(examples: DataFrame, model: CtrModel) -> DataFrame:
    """``label`` and the artifact's ``probability`` for every example, scored on executors."""
    spec = model.spec

    def score(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            probability = model.predict(spec.encode(encoder_inputs(batch, spec.input_columns)))
            yield pa.RecordBatch.from_arrays(
                [batch.column("label"), pa.array(probability)], names=["label", "probability"]
            )

    needed = ["label", *spec.input_columns]
    return examples.select(*needed).mapInArrow(score, "label double, probability double")


# ------------------------------------------------------------------ training


_SAMPLE_BUCKETS = 1 << 20


def training_sample(available: int, max_rows: int | None, seed: int) -> Column:
    """True for about ``max_rows`` of ``available`` impression rows, the same whatever the
    partitioning; always true when ``max_rows`` is None or not below ``available``."""
    if max_rows is None or available <= max_rows:
        return F.lit(True)
    kept = round(_SAMPLE_BUCKETS * max_rows / available)
    bucket = F.pmod(
        F.xxhash64("user_id", "time_stamp", "adgroup_id", F.lit(seed)), F.lit(_SAMPLE_BUCKETS)
    )
    return bucket < kept


def fit(examples: DataFrame, spec: FeatureSpec, config: CtrConfig) -> LogisticRegressionModel:
    """Spark ML logistic regression on the ``train`` split of ``examples``."""
    rows = examples.where(F.col("split") == "train").select("label", *spec.input_columns)
    train = encode_features(rows, spec).select(
        "label", array_to_vector(F.col("features")).alias("features")
    )
    options: dict[str, Any] = {}
    if config.positive_weight != 1.0:
        weight = F.when(F.col("label") > 0, F.lit(config.positive_weight)).otherwise(F.lit(1.0))
        train = train.withColumn("weight", weight)
        options["weightCol"] = "weight"
    # Left unpersisted on purpose: Spark ML then caches its own compact instance blocks.
    estimator = LogisticRegression(
        featuresCol="features",
        labelCol="label",
        family="binomial",
        regParam=config.reg_param,
        elasticNetParam=config.elastic_net_param,
        maxIter=config.max_iter,
        tol=config.tol,
        standardization=config.standardization,
        **options,
    )
    # pyspark's ProbabilisticClassifier subclasses Classifier without its model type
    # argument, so Estimator.fit is typed Any even though this estimator's _fit returns a
    # LogisticRegressionModel.
    return cast(LogisticRegressionModel, estimator.fit(train))


def to_ctr_model(
    fitted: LogisticRegressionModel, spec: FeatureSpec, metrics: dict[str, Any] | None = None
) -> CtrModel:
    return CtrModel(
        spec=spec,
        weights=fitted.coefficients.toArray(),
        intercept=float(fitted.intercept),
        metrics=metrics or {},
        trained_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def train_ctr_model(
    examples: DataFrame,
    spec: FeatureSpec,
    config: CtrConfig | None = None,
    sampled_from: int | None = None,
) -> tuple[CtrModel, dict[str, Any]]:
    """Fit on days 1-7, evaluate the artifact on day 8; metrics go into the artifact too.

    ``sampled_from``: the training impressions ``examples`` were sampled from, if it was.
    """
    config = config or CtrConfig()
    train_rows = examples.where(F.col("split") == "train").count()
    if train_rows == 0:
        raise ValueError("no training examples (days 1-7) to fit the CTR model on")
    started = time.perf_counter()
    fitted = fit(examples, spec, config)
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    unevaluated = to_ctr_model(fitted, spec)
    test = evaluate(predict(examples.where(F.col("split") == "test"), unevaluated))
    metrics = {
        "feature_set": spec.name,
        "feature_spec_id": spec.spec_id,
        "features": spec.dim,
        "train_rows": train_rows,
        "train_rows_available": sampled_from or train_rows,
        "iterations": int(fitted.summary.totalIterations),
        "config": dataclasses.asdict(config),
        **test,
        "train_seconds": round(train_seconds, 3),
        "evaluate_seconds": round(time.perf_counter() - started, 3),
    }
    return dataclasses.replace(unevaluated, metrics=metrics), metrics


# ------------------------------------------------------------------ evaluation


_EPSILON = 1e-15
# Rank error of the reliability bins' edges: a 10,000th of the rows.
_QUANTILE_ERROR = 1e-4


def evaluate(
    scored: DataFrame,
    bins: int = RELIABILITY_BINS,
    label: str = "label",
    probability: str = "probability",
) -> dict[str, Any]:
    """AUC, logloss and calibration of predicted click probabilities against 0/1 labels.

    The reliability table splits the rows, sorted by prediction, into ``bins`` groups of
    (nearly) equal size: CTRs crowd into a narrow range, where equal-width bins would
    leave most bins empty. ``calibration_error`` is the row-weighted mean absolute gap
    between predicted and observed CTR over those bins. The AUC is exact (ties count
    half, as in the trapezoidal ROC); bin edges are quantiles within a 10,000th of the
    rows. Everything is aggregated on the executors.
    """
    frame = scored.select(
        F.col(label).cast("double").alias("label"),
        F.col(probability).cast("double").alias("probability"),
    ).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        return _evaluate(frame, bins)
    finally:
        frame.unpersist()


def _evaluate(frame: DataFrame, bins: int) -> dict[str, Any]:
    clipped = F.least(F.greatest(F.col("probability"), F.lit(_EPSILON)), F.lit(1 - _EPSILON))
    row_loss = -(
        F.col("label") * F.log(clipped) + (F.lit(1.0) - F.col("label")) * F.log(1 - clipped)
    )
    totals = aggregate_row(
        frame.agg(
            F.count(F.lit(1)).alias("rows"),
            F.sum("label").alias("clicks"),
            F.avg("probability").alias("mean_predicted"),
            F.avg(row_loss).alias("logloss"),
        )
    )
    rows = int(totals["rows"])
    if rows == 0:
        return {
            "test_rows": 0,
            "auc": None,
            "logloss": None,
            "observed_ctr": None,
            "mean_predicted": None,
            "calibration_error": None,
            "reliability": [],
        }
    clicks = float(totals["clicks"])
    auc = None
    if 0 < clicks < rows:
        evaluator = BinaryClassificationEvaluator(
            rawPredictionCol="probability", labelCol="label", metricName="areaUnderROC", numBins=0
        )
        auc = float(evaluator.evaluate(frame))
    reliability = _reliability(frame, min(bins, rows))
    gap = sum(b["rows"] * abs(b["mean_predicted"] - b["observed_ctr"]) for b in reliability)
    return {
        "test_rows": rows,
        "auc": auc,
        "logloss": float(totals["logloss"]),
        "observed_ctr": clicks / rows,
        "mean_predicted": float(totals["mean_predicted"]),
        "calibration_error": float(gap / rows),
        "reliability": reliability,
    }


def _reliability(frame: DataFrame, bins: int) -> list[dict[str, Any]]:
    edges = frame.approxQuantile("probability", [i / bins for i in range(1, bins)], _QUANTILE_ERROR)
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
    return evaluate(test, label="clk", probability="click_probability")
