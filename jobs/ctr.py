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
- :func:`evaluate` ``(labels, probabilities)`` -> AUC, logloss, calibration and a
  10-bin reliability table; :func:`oracle_metrics` ``(spark, data_dir)`` gives the same
  for the synthetic data's true click probabilities on the test day.

Training is unweighted by default: the predicted CTRs are used as probabilities (ranking
scores, offline lists, the quality report), and reweighting the rare clicks would inflate
them all.
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
from pyspark.ml.classification import LogisticRegression, LogisticRegressionModel
from pyspark.ml.functions import array_to_vector
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F  # noqa: N812 - the conventional alias
from pyspark.sql import types as T  # noqa: N812
from sklearn.metrics import log_loss, roc_auc_score

from adrec.core.dataset import TRUTH_FILE
from adrec.core.features import FeatureSpec
from adrec.core.model import CtrModel
from jobs.ingest import event_day_column, on_test_day

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


def fit(examples: DataFrame, spec: FeatureSpec, config: CtrConfig) -> LogisticRegressionModel:
    """Spark ML logistic regression on the ``train`` split of ``examples``."""
    training_rows = examples.where(F.col("split") == "train").select("label", *spec.input_columns)
    train = encode_features(training_rows, spec).select(
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
    examples: DataFrame, spec: FeatureSpec, config: CtrConfig | None = None
) -> tuple[CtrModel, dict[str, Any]]:
    """Fit on days 1-7, evaluate the artifact on day 8; metrics go into the artifact too."""
    config = config or CtrConfig()
    train_rows = examples.where(F.col("split") == "train").count()
    if train_rows == 0:
        raise ValueError("no training examples (days 1-7) to fit the CTR model on")
    started = time.perf_counter()
    fitted = fit(examples, spec, config)
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    unevaluated = to_ctr_model(fitted, spec)
    scored = predict(examples.where(F.col("split") == "test"), unevaluated).toPandas()
    test = evaluate(scored["label"].to_numpy(), scored["probability"].to_numpy())
    metrics = {
        "feature_set": spec.name,
        "feature_spec_id": spec.spec_id,
        "features": spec.dim,
        "train_rows": train_rows,
        "iterations": int(fitted.summary.totalIterations),
        "config": dataclasses.asdict(config),
        **test,
        "train_seconds": round(train_seconds, 3),
        "evaluate_seconds": round(time.perf_counter() - started, 3),
    }
    return dataclasses.replace(unevaluated, metrics=metrics), metrics


# ------------------------------------------------------------------ evaluation


def evaluate(
    labels: np.ndarray, probabilities: np.ndarray, bins: int = RELIABILITY_BINS
) -> dict[str, Any]:
    """AUC, logloss and calibration of predicted click probabilities against 0/1 labels.

    The reliability table splits the rows, sorted by prediction, into ``bins`` groups of
    (nearly) equal size: CTRs crowd into a narrow range, where equal-width bins would
    leave most bins empty. ``calibration_error`` is the row-weighted mean absolute gap
    between predicted and observed CTR over those bins.
    """
    labels = np.asarray(labels, dtype=np.float64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if labels.shape != probabilities.shape or labels.ndim != 1:
        raise ValueError("labels and probabilities must be 1-d arrays of the same length")
    rows = len(labels)
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
    both_classes = 0 < labels.sum() < rows
    order = np.argsort(probabilities, kind="stable")
    reliability = []
    for chunk in np.array_split(order, min(bins, rows)):
        reliability.append(
            {
                "rows": len(chunk),
                "min_predicted": float(probabilities[chunk].min()),
                "max_predicted": float(probabilities[chunk].max()),
                "mean_predicted": float(probabilities[chunk].mean()),
                "observed_ctr": float(labels[chunk].mean()),
            }
        )
    gap = sum(b["rows"] * abs(b["mean_predicted"] - b["observed_ctr"]) for b in reliability)
    return {
        "test_rows": rows,
        "auc": float(roc_auc_score(labels, probabilities)) if both_classes else None,
        "logloss": float(log_loss(labels, np.clip(probabilities, 1e-15, 1 - 1e-15), labels=[0, 1])),
        "observed_ctr": float(labels.mean()),
        "mean_predicted": float(probabilities.mean()),
        "calibration_error": float(gap / rows),
        "reliability": reliability,
    }


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
    test = (
        truth.where(on_test_day(event_day_column(F.col("time_stamp"))))
        .select("clk", "click_probability")
        .toPandas()
    )
    return evaluate(test["clk"].to_numpy(), test["click_probability"].to_numpy())
