"""CTR model training: Spark ML logistic regression over the shared encoder.

Contract:

- :func:`encode_features` ``(examples, spec)`` -> ``examples`` plus ``features``
  (array<float>), encoded on the executors by :meth:`FeatureSpec.encode`, the call the
  ranking service makes, so training cannot drift from serving.
- :func:`train_ctr_model` ``(examples, spec, config)`` -> ``(CtrModel, metrics)``: fits
  on the ``train`` split (days 1-7) less a seeded slice of it held out for calibration
  (``config.calibration_share``), calibrates the model per pid on that slice
  (:mod:`jobs.calibration`) and evaluates the resulting :class:`CtrModel` on the ``test``
  split (day 8), before and after calibration; ``metrics`` is JSON-serialisable and also
  stored in the model. The slice is neither trained nor tested on.
- :func:`predict` ``(examples, model)`` -> ``label``, ``probability`` (and ``user_id``
  when the examples have it, and the columns named in ``keep``): scores with the artifact
  itself, the numbers the service would produce; any artifact with a ``spec`` and a
  ``predict`` of encoded rows will do.
- The metrics are :func:`jobs.evaluation.evaluate`'s, on the executors.

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
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.ml.classification import LogisticRegression, LogisticRegressionModel
from pyspark.ml.functions import array_to_vector
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F  # noqa: N812 - the conventional alias
from pyspark.sql import types as T  # noqa: N812

from adrec.core.features import FeatureSpec
from adrec.core.model import CtrModel
from jobs import calibration
from jobs.evaluation import evaluate

#: The column :func:`predict` carries through for the group AUC.
USER_COLUMN = "user_id"
#: ``split`` of the training-day rows held out of the fit to calibrate the model on.
CALIBRATION_SPLIT = "calibrate"


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
    #: Share of the training impressions held out of the fit to calibrate on; 0: none.
    calibration_share: float = 0.1
    #: Seeds which impressions the calibration slice takes.
    seed: int = 0

    def __post_init__(self) -> None:
        if self.reg_param < 0 or not 0 <= self.elastic_net_param <= 1:
            raise ValueError("reg_param must be >= 0 and elastic_net_param within [0, 1]")
        if self.max_iter < 1 or self.tol <= 0 or self.positive_weight <= 0:
            raise ValueError("max_iter, tol and positive_weight must be positive")
        if not 0 <= self.calibration_share < 1:
            raise ValueError("calibration_share must be within [0, 1)")


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


class Scorer(Protocol):
    """What :func:`predict` needs of a model artifact: its spec and encoded-row scoring."""

    @property
    def spec(self) -> FeatureSpec: ...

    def predict(self, features: np.ndarray) -> np.ndarray: ...


def predict(examples: DataFrame, model: Scorer, keep: tuple[str, ...] = ()) -> DataFrame:
    """``label`` and the artifact's ``probability`` for every example, scored on executors;
    ``user_id`` too when ``examples`` has it, and the columns ``keep`` names."""
    spec = model.spec
    kept_names = [USER_COLUMN] if USER_COLUMN in examples.columns else []
    kept = [examples.schema[name] for name in dict.fromkeys([*kept_names, *keep])]
    schema = T.StructType(
        [
            T.StructField("label", T.DoubleType()),
            T.StructField("probability", T.DoubleType()),
            *kept,
        ]
    )

    def score(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            probability = model.predict(spec.encode(encoder_inputs(batch, spec.input_columns)))
            yield pa.RecordBatch.from_arrays(
                [
                    pc.cast(batch.column("label"), pa.float64()),
                    pa.array(probability, pa.float64()),
                    *(batch.column(field.name) for field in kept),
                ],
                names=schema.names,
            )

    needed = dict.fromkeys(["label", *spec.input_columns, *(field.name for field in kept)])
    return examples.select(*needed).mapInArrow(score, schema)


# ------------------------------------------------------------------ training


_SAMPLE_BUCKETS = 1 << 20


def calibration_slice(share: float, seed: int) -> Column:
    """True for about ``share`` of the impressions, the same whatever the partitioning; a
    hash of its own, so it is independent of :func:`training_sample`."""
    bucket = F.pmod(
        F.xxhash64("user_id", "time_stamp", "adgroup_id", F.lit(f"calibration-{seed}")),
        F.lit(_SAMPLE_BUCKETS),
    )
    return bucket < F.lit(round(_SAMPLE_BUCKETS * share))


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
    """Fit on days 1-7 less the calibration slice, calibrate per pid on the slice, evaluate
    the artifact on day 8 before and after calibration; metrics go into the artifact too.

    ``sampled_from``: the training impressions ``examples`` were sampled from, if it was.
    """
    config = config or CtrConfig()
    if config.calibration_share:
        held_out = (F.col("split") == "train") & calibration_slice(
            config.calibration_share, config.seed
        )
        examples = examples.withColumn(
            "split", F.when(held_out, F.lit(CALIBRATION_SPLIT)).otherwise(F.col("split"))
        )

    def fitted_model(rows: DataFrame, spec: FeatureSpec) -> tuple[CtrModel, dict[str, Any]]:
        fitted = fit(rows, spec, config)
        model = to_ctr_model(fitted, spec)
        report: dict[str, Any] = {"iterations": int(fitted.summary.totalIterations)}
        if config.calibration_share:
            slice_rows = rows.where(F.col("split") == CALIBRATION_SPLIT)
            fitted_calibration, per_pid = calibration.fit_calibration(
                predict(slice_rows, model, keep=("pid",))
            )
            model = dataclasses.replace(model, calibration=fitted_calibration)
            report["calibration"] = {"pids": per_pid}
        return model, report

    model, metrics = fit_and_evaluate(
        examples,
        spec,
        fitted_model,
        "the CTR model",
        {"config": dataclasses.asdict(config)},
        sampled_from,
    )
    if not config.calibration_share:
        return model, metrics
    metrics["calibration"].update(_calibration_effect(examples, model, metrics))
    return dataclasses.replace(model, metrics=metrics), metrics


def _calibration_effect(
    examples: DataFrame, model: CtrModel, before: dict[str, Any]
) -> dict[str, Any]:
    """Day-8 quality of the calibrated pCTRs beside the model's CTRs, overall and per pid."""
    scored = predict(examples.where(F.col("split") == "test"), model, keep=("pid",))
    pctrs = calibration.calibrated(
        scored.withColumn("ctr", F.col("probability")), model.calibration
    )
    after = evaluate(pctrs, roc_points=2)
    keys = ("calibration_error", "logloss", "mean_predicted", "observed_ctr")
    by_pid = (
        pctrs.groupBy("pid")
        .agg(
            F.count(F.lit(1)).alias("test_rows"),
            F.avg("label").alias("observed_ctr"),
            F.avg("ctr").alias("mean_ctr"),
            F.avg("probability").alias("mean_pctr"),
        )
        .collect()
    )
    per_pid = {
        row["pid"]: {
            "test_rows": int(row["test_rows"]),
            **{name: float(row[name]) for name in ("observed_ctr", "mean_ctr", "mean_pctr")},
        }
        for row in by_pid
    }
    return {
        "before": {key: before.get(key) for key in keys},
        "after": {key: after.get(key) for key in keys},
        "test_by_pid": per_pid,
    }


_Artifact = TypeVar("_Artifact", bound="Scorer")


def fit_and_evaluate(
    examples: DataFrame,
    spec: FeatureSpec,
    fitted_model: Callable[[DataFrame, FeatureSpec], tuple[_Artifact, dict[str, Any]]],
    what: str,
    described: dict[str, Any],
    sampled_from: int | None,
) -> tuple[_Artifact, dict[str, Any]]:
    """``fitted_model`` on the train split, its artifact evaluated on the test split; the
    metrics (``described`` and what the fit reports among them) go into the artifact too."""
    train_rows = examples.where(F.col("split") == "train").count()
    if train_rows == 0:
        raise ValueError(f"no training examples (days 1-7) to fit {what} on")
    started = time.perf_counter()
    unevaluated, fit_report = fitted_model(examples, spec)
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    test = evaluate(
        predict(examples.where(F.col("split") == "test"), unevaluated), user=USER_COLUMN
    )
    metrics = {
        "feature_set": spec.name,
        "feature_spec_id": spec.spec_id,
        "features": spec.dim,
        "train_rows": train_rows,
        "train_rows_available": sampled_from or train_rows,
        **fit_report,
        **described,
        **test,
        "train_seconds": round(train_seconds, 3),
        "evaluate_seconds": round(time.perf_counter() - started, 3),
    }
    # Both artifacts (CtrModel, FmModel) are frozen dataclasses with a metrics field.
    evaluated: _Artifact = dataclasses.replace(cast(Any, unevaluated), metrics=metrics)
    return evaluated, metrics
