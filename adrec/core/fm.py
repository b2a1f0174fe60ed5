"""The factorization-machine CTR artifact: a second-order FM bound to one feature spec.

A factorization machine (Rendle 2010) adds to logistic regression a learned interaction
for every pair of features: feature ``i`` has a factor vector ``v_i`` of ``k`` numbers
and the pair ``(i, j)`` contributes ``<v_i, v_j> x_i x_j`` to the margin,

    margin(x) = intercept + sum_i w_i x_i + sum_{i < j} <v_i, v_j> x_i x_j
              = intercept + w . x + 1/2 sum_f ((sum_i v_if x_i)^2 - sum_i v_if^2 x_i^2),

the second form costing ``O(k * dim)`` per row; the click probability is the sigmoid of
the margin. This is the model Spark ML's ``FMClassifier`` fits, and :meth:`FmModel.predict`
computes it with numpy alone, so the ranking service can score it without Spark.

Stored as JSON with the weights and factors listed by feature name, never pickled, and
checked on load like :class:`adrec.core.model.CtrModel`: the format, the feature spec id,
the names and their order, the shapes and finiteness; every problem is a
:class:`~adrec.core.model.ModelArtifactError`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from adrec.core.features import FeatureSpec, feature_spec
from adrec.core.model import ModelArtifactError

ARTIFACT_FORMAT = "adrec.fm_model.v1"


@dataclasses.dataclass(frozen=True)
class FmModel:
    spec: FeatureSpec
    #: ``(dim,)`` weights of the features alone.
    linear: np.ndarray
    #: ``(dim, k)``: row ``i`` is feature ``i``'s factor vector.
    factors: np.ndarray
    intercept: float
    metrics: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    trained_at: str = ""

    def __post_init__(self) -> None:
        linear = np.asarray(self.linear, dtype=np.float64)
        factors = np.asarray(self.factors, dtype=np.float64)
        dim = self.spec.dim
        if linear.shape != (dim,):
            raise ModelArtifactError(
                f"feature set {self.spec.name!r} has {dim} features, "
                f"got {linear.size} linear weights"
            )
        if factors.ndim != 2 or factors.shape[0] != dim or factors.shape[1] < 1:
            raise ModelArtifactError(
                f"factors must be a ({dim}, k) matrix with k >= 1 for feature set "
                f"{self.spec.name!r}, got shape {factors.shape}"
            )
        if (
            not np.isfinite(linear).all()
            or not np.isfinite(factors).all()
            or not np.isfinite(self.intercept)
        ):
            raise ModelArtifactError("FM weights, factors and intercept must be finite")
        object.__setattr__(self, "linear", linear)
        object.__setattr__(self, "factors", factors)

    @property
    def factor_size(self) -> int:
        return int(self.factors.shape[1])

    def margin(self, features: np.ndarray) -> np.ndarray:
        """The FM margin (log-odds) of an encoded ``(n, dim)`` feature matrix."""
        x = features.astype(np.float64, copy=False)
        projected = x @ self.factors
        squares = (x * x) @ (self.factors * self.factors)
        pairs = 0.5 * (projected * projected - squares).sum(axis=1)
        margin: np.ndarray = self.intercept + x @ self.linear + pairs
        return margin

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Click probabilities for an encoded ``(n, dim)`` feature matrix."""
        # exp(-logaddexp(0, -m)) is the sigmoid without overflow for very negative margins.
        probabilities: np.ndarray = np.exp(-np.logaddexp(0.0, -self.margin(features)))
        return probabilities

    def to_json(self) -> bytes:
        names = self.spec.feature_names
        document = {
            "format": ARTIFACT_FORMAT,
            "feature_set": self.spec.name,
            "feature_spec_id": self.spec.spec_id,
            "factor_size": self.factor_size,
            "intercept": float(self.intercept),
            "linear": {name: float(w) for name, w in zip(names, self.linear, strict=True)},
            "factors": {
                name: [float(v) for v in row] for name, row in zip(names, self.factors, strict=True)
            },
            "metrics": dict(self.metrics),
            "trained_at": self.trained_at,
        }
        return json.dumps(document, indent=1, allow_nan=False).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> FmModel:
        try:
            document = json.loads(raw)
        except ValueError as exc:
            raise ModelArtifactError(f"FM artifact is not JSON: {exc}") from None
        if not isinstance(document, dict) or document.get("format") != ARTIFACT_FORMAT:
            raise ModelArtifactError(f"FM artifact format is not {ARTIFACT_FORMAT!r}")
        try:
            spec = feature_spec(document["feature_set"])
            stored_id = document["feature_spec_id"]
            factor_size = int(document["factor_size"])
            intercept = float(document["intercept"])
            linear_by_name = dict(document["linear"])
            factors_by_name = dict(document["factors"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelArtifactError(f"FM artifact is missing or has a bad field: {exc}") from None
        if stored_id != spec.spec_id:
            raise ModelArtifactError(
                f"FM model was trained with feature spec {stored_id!r} but this code encodes "
                f"{spec.name!r} as {spec.spec_id!r}; retrain or deploy matching code"
            )
        if factor_size < 1:
            raise ModelArtifactError(f"FM factor_size must be at least 1, got {factor_size}")
        names = spec.feature_names
        if list(linear_by_name) != names or list(factors_by_name) != names:
            raise ModelArtifactError(
                "FM weight and factor names do not match the feature spec order"
            )
        rows = list(factors_by_name.values())
        if not all(isinstance(row, list) and len(row) == factor_size for row in rows):
            raise ModelArtifactError(f"every FM factor vector must list {factor_size} numbers")
        try:
            linear = np.array(list(linear_by_name.values()), dtype=np.float64)
            factors = np.array(rows, dtype=np.float64).reshape(len(names), factor_size)
        except (TypeError, ValueError) as exc:
            raise ModelArtifactError(f"FM weights and factors must be numbers: {exc}") from None
        return cls(
            spec=spec,
            linear=linear,
            factors=factors,
            intercept=intercept,
            metrics=document.get("metrics", {}),
            trained_at=document.get("trained_at", ""),
        )
