"""The CTR model artifact: logistic-regression weights bound to one feature spec.

Stored as JSON (weights listed by feature name, so a person can read them), never
pickled. It carries the per-placement calibration too (:class:`Calibration`), so the job
that fits it, the ranking service and the gateway turn a model CTR into a calibrated pCTR
with the one function here. Loading an artifact whose feature spec id differs from the
code's spec of the same name is refused: scoring with misaligned weights is the bug the
original course shipped.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from adrec.core.features import FeatureSpec, feature_spec

ARTIFACT_FORMAT = "adrec.ctr_model.v1"


#: CTRs are clipped to this distance from 0 and 1 before their logit is taken, in the
#: job's fit as in serving.
LOGIT_CLIP = 1e-12


class ModelArtifactError(ValueError):
    """The artifact is malformed or does not match this code's feature spec."""


@dataclasses.dataclass(frozen=True)
class PlacementCalibration:
    """``pctr = sigmoid(slope * logit(ctr) + offset)`` at one placement (Platt scaling of
    the model's logit). The slope is positive, so the order of a placement's ads holds."""

    slope: float = 1.0
    offset: float = 0.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.slope) and np.isfinite(self.offset)) or self.slope <= 0:
            raise ModelArtifactError(
                f"a calibration needs a positive finite slope and a finite offset, "
                f"got {self.slope} and {self.offset}"
            )


IDENTITY = PlacementCalibration()


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Per placement (pid), the map from model CTR to calibrated pCTR; a placement without
    one (and every placement of an artifact written before calibration) keeps the CTR."""

    by_pid: Mapping[str, PlacementCalibration] = dataclasses.field(default_factory=dict)

    def for_pid(self, pid: str) -> PlacementCalibration:
        return self.by_pid.get(pid, IDENTITY)

    def apply(self, pid: str, ctrs: np.ndarray) -> np.ndarray:
        """Calibrated pCTRs of model CTRs at one placement."""
        calibration = self.for_pid(pid)
        if calibration == IDENTITY:
            return np.asarray(ctrs, dtype=np.float64)
        clipped = np.clip(np.asarray(ctrs, dtype=np.float64), LOGIT_CLIP, 1 - LOGIT_CLIP)
        logits = np.log(clipped / (1.0 - clipped))
        pctrs: np.ndarray = 1.0 / (1.0 + np.exp(-(calibration.slope * logits + calibration.offset)))
        return pctrs

    def apply_rows(self, pids: np.ndarray, ctrs: np.ndarray) -> np.ndarray:
        """Calibrated pCTRs of rows that each carry their own placement."""
        ctrs = np.asarray(ctrs, dtype=np.float64)
        pctrs = ctrs.copy()
        for pid in self.by_pid:
            at_pid = pids == pid
            if at_pid.any():
                pctrs[at_pid] = self.apply(pid, ctrs[at_pid])
        return pctrs

    def to_document(self) -> dict[str, dict[str, float]]:
        return {
            pid: {"slope": float(c.slope), "offset": float(c.offset)}
            for pid, c in sorted(self.by_pid.items())
        }

    @classmethod
    def from_document(cls, document: Any) -> Calibration:
        if not isinstance(document, dict):
            raise ModelArtifactError("model artifact calibration is not an object")
        try:
            return cls(
                {
                    str(pid): PlacementCalibration(float(c["slope"]), float(c["offset"]))
                    for pid, c in document.items()
                }
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ModelArtifactError):
                raise
            raise ModelArtifactError(f"model artifact has a bad calibration: {exc}") from None


@dataclasses.dataclass(frozen=True)
class CtrModel:
    spec: FeatureSpec
    weights: np.ndarray
    intercept: float
    metrics: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    trained_at: str = ""
    calibration: Calibration = Calibration()

    def __post_init__(self) -> None:
        weights = np.asarray(self.weights, dtype=np.float64)
        if weights.shape != (self.spec.dim,):
            raise ModelArtifactError(
                f"feature set {self.spec.name!r} has {self.spec.dim} features, "
                f"got {weights.size} weights"
            )
        if not np.isfinite(weights).all() or not np.isfinite(self.intercept):
            raise ModelArtifactError("model weights and intercept must be finite")
        object.__setattr__(self, "weights", weights)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Click probabilities for an encoded ``(n, dim)`` feature matrix."""
        margin = features.astype(np.float64, copy=False) @ self.weights + self.intercept
        probabilities: np.ndarray = 1.0 / (1.0 + np.exp(-margin))
        return probabilities

    def to_json(self) -> bytes:
        document = {
            "format": ARTIFACT_FORMAT,
            "feature_set": self.spec.name,
            "feature_spec_id": self.spec.spec_id,
            "intercept": float(self.intercept),
            "weights": {
                name: float(w)
                for name, w in zip(self.spec.feature_names, self.weights, strict=True)
            },
            "metrics": dict(self.metrics),
            "trained_at": self.trained_at,
            "calibration": self.calibration.to_document(),
        }
        return json.dumps(document, indent=1, allow_nan=False).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> CtrModel:
        try:
            document = json.loads(raw)
        except ValueError as exc:
            raise ModelArtifactError(f"model artifact is not JSON: {exc}") from None
        if not isinstance(document, dict) or document.get("format") != ARTIFACT_FORMAT:
            raise ModelArtifactError(f"model artifact format is not {ARTIFACT_FORMAT!r}")
        try:
            spec = feature_spec(document["feature_set"])
            stored_id = document["feature_spec_id"]
            weights_by_name = document["weights"]
            intercept = float(document["intercept"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelArtifactError(
                f"model artifact is missing or has a bad field: {exc}"
            ) from None
        if stored_id != spec.spec_id:
            raise ModelArtifactError(
                f"model was trained with feature spec {stored_id!r} but this code encodes "
                f"{spec.name!r} as {spec.spec_id!r}; retrain or deploy matching code"
            )
        if list(weights_by_name) != spec.feature_names:
            raise ModelArtifactError("model weight names do not match the feature spec order")
        return cls(
            spec=spec,
            weights=np.array(list(weights_by_name.values()), dtype=np.float64),
            intercept=intercept,
            metrics=document.get("metrics", {}),
            trained_at=document.get("trained_at", ""),
            calibration=Calibration.from_document(document.get("calibration", {})),
        )
