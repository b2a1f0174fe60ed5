"""The factorization-machine comparison: Spark ML's ``FMClassifier`` over the shared encoder.

Contract:

- :func:`fit` ``(examples, spec, config)`` -> ``FMClassificationModel`` fitted on the
  ``train`` split (days 1-7) of the spec's encoded features, built exactly as the
  logistic regression's (:func:`jobs.ctr.encode_features`).
- :func:`to_fm_model` turns it into the numpy artifact :class:`adrec.core.fm.FmModel`.
- :func:`train_fm_model` ``(examples, spec, config)`` -> ``(FmModel, metrics)``: fits, then
  scores the ``test`` split (day 8) with the artifact itself through
  :func:`jobs.ctr.predict`, the numbers the ranking service would produce, and evaluates
  them with :func:`jobs.evaluation.evaluate`.
- :func:`fm_wins` tells whether an FM's metrics beat a logistic regression's by
  :data:`MIN_AUC_GAIN`, the margin an FM must win by before it may be served.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

import numpy as np
from pyspark import StorageLevel
from pyspark.ml.classification import FMClassificationModel, FMClassifier
from pyspark.ml.linalg import SparseVector, VectorUDT
from pyspark.sql import DataFrame
from pyspark.sql import functions as F  # noqa: N812 - the conventional alias

from adrec.core.features import FeatureSpec
from adrec.core.fm import FmModel
from jobs.ctr import encode_features, fit_and_evaluate

#: The day-8 AUC an FM must gain over the logistic regression on the same features to be
#: worth serving: its pairwise factors cost the ranking service far more than a dot product.
MIN_AUC_GAIN = 0.005

SOLVERS = ("adamW", "gd")


@dataclasses.dataclass(frozen=True)
class FmConfig:
    """``FMClassifier`` hyperparameters (Spark ML names in snake case)."""

    factor_size: int = 8
    max_iter: int = 100
    #: AdamW's learning rate; Spark's default of 1.0 overshoots on these few dense features.
    step_size: float = 0.1
    #: L2 on the linear weights and the factors.
    reg_param: float = 0.01
    mini_batch_fraction: float = 1.0
    init_std: float = 0.01
    tol: float = 1e-6
    solver: str = "adamW"
    #: Seeds the factors' random start, so a run can be repeated.
    seed: int = 7

    def __post_init__(self) -> None:
        if self.factor_size < 1 or self.max_iter < 1:
            raise ValueError("factor_size and max_iter must be at least 1")
        if self.step_size <= 0 or self.tol <= 0 or self.init_std <= 0:
            raise ValueError("step_size, tol and init_std must be positive")
        if self.reg_param < 0:
            raise ValueError("reg_param must be >= 0")
        if not 0 < self.mini_batch_fraction <= 1:
            raise ValueError("mini_batch_fraction must be within (0, 1]")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {list(SOLVERS)}, got {self.solver!r}")


def fit(examples: DataFrame, spec: FeatureSpec, config: FmConfig) -> FMClassificationModel:
    """Spark ML factorization machine on the ``train`` split of ``examples``."""
    rows = examples.where(F.col("split") == "train").select("label", *spec.input_columns)
    # Sparse and cached: FMClassifier's gradient visits every stored entry of a row (a
    # dense one-hot encoding is mostly zeros), and unlike LogisticRegression it keeps no
    # copy of its input, so each iteration would otherwise encode every row again.
    # useArrow stated, so pyspark does not read the function's hints as a pandas UDF's.
    sparse = F.udf(_sparse_row(spec.dim), VectorUDT(), useArrow=False)
    train = (
        encode_features(rows, spec)
        .select("label", sparse(F.col("features")).alias("features"))
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    estimator = FMClassifier(
        featuresCol="features",
        labelCol="label",
        factorSize=config.factor_size,
        fitIntercept=True,
        fitLinear=True,
        regParam=config.reg_param,
        miniBatchFraction=config.mini_batch_fraction,
        initStd=config.init_std,
        maxIter=config.max_iter,
        stepSize=config.step_size,
        tol=config.tol,
        solver=config.solver,
        seed=config.seed,
    )
    try:
        # As for LogisticRegression: pyspark types ProbabilisticClassifier.fit as Any.
        return cast(FMClassificationModel, estimator.fit(train))
    finally:
        train.unpersist()


def _sparse_row(dim: int) -> Callable[[list[float]], SparseVector]:
    def sparse(values: list[float]) -> SparseVector:
        row = np.asarray(values, dtype=np.float64)
        present = np.flatnonzero(row)
        return SparseVector(dim, present, row[present])

    return sparse


def to_fm_model(
    fitted: FMClassificationModel, spec: FeatureSpec, metrics: dict[str, Any] | None = None
) -> FmModel:
    return FmModel(
        spec=spec,
        linear=fitted.linear.toArray(),
        factors=fitted.factors.toArray(),
        intercept=float(fitted.intercept),
        metrics=metrics or {},
        trained_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def train_fm_model(
    examples: DataFrame,
    spec: FeatureSpec,
    config: FmConfig | None = None,
    sampled_from: int | None = None,
) -> tuple[FmModel, dict[str, Any]]:
    """Fit on days 1-7, evaluate the artifact on day 8; metrics go into the artifact too.

    ``sampled_from``: the training impressions ``examples`` were sampled from, if it was.
    """
    config = config or FmConfig()

    def fitted_model(rows: DataFrame, spec: FeatureSpec) -> tuple[FmModel, dict[str, Any]]:
        return to_fm_model(fit(rows, spec, config), spec), {}

    return fit_and_evaluate(
        examples,
        spec,
        fitted_model,
        "the FM",
        {"model": "fm", "config": dataclasses.asdict(config)},
        sampled_from,
    )


def fm_wins(fm_metrics: dict[str, Any], lr_metrics: dict[str, Any]) -> bool:
    """True when the FM's day-8 AUC beats the logistic regression's by :data:`MIN_AUC_GAIN`;
    never when either AUC is undefined."""
    fm_auc, lr_auc = fm_metrics.get("auc"), lr_metrics.get("auc")
    if fm_auc is None or lr_auc is None:
        return False
    return bool(fm_auc >= lr_auc + MIN_AUC_GAIN)
