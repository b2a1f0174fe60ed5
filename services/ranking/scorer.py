"""The LR model's margin split by input column, so a request costs lookups, not an encode.

Every block of a feature spec reads one input column, and the model is linear, so a row's
margin is the intercept plus one contribution per column. The contributions are computed
with the shared encoder itself (`FeatureSpec.encode`) and never re-derived:

- per ad (price, smoothed CTRs): encoded once per version for the whole ad table;
- per request (pid, profile fields): stored int8 codes have 129 possible values (missing,
  0..127), all encoded once per version into lookup tables;
- per (user, ad) pair (ALS affinity): its encoding must be affine in the value, with a
  constant for missing; that is probed through the encoder and checked, then applied.

Summing per column changes only the order of the float64 additions, so margins agree with
`model.predict(spec.encode(...))` to ~1e-15. :meth:`CompiledScorer.compile` checks this on
random rows and returns None for a spec it cannot split (a new kind of column); the caller
then encodes every request instead.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

from adrec.core import features
from adrec.core.codecs import UserFeatures
from adrec.core.model import CtrModel

REQUEST_COLUMNS = ("pid", *features.USER_PROFILE_FIELDS)
AD_COLUMNS = features.AD_NUMERIC_FIELDS
PAIR_COLUMN = "als_affinity"

#: Every value a stored profile field can take: missing, then the int8 codes 0..127.
PROFILE_VALUES = np.array([np.nan, *range(128)])
#: Encoded rows at a time when precomputing the ad table's contributions.
AD_CHUNK = 65_536
#: Largest margin disagreement with encode + predict accepted by the self-check.
TOLERANCE = 1e-9
# Exactly representable in float32, so the encoder's float32 output rounds none of them.
_AFFINE_PROBES = np.array([-8.0, -1.5, -0.25, 0.0, 0.5, 1.0, 2.75, 16.0])


@dataclasses.dataclass(frozen=True)
class CompiledScorer:
    model: CtrModel
    #: Margin contribution of every ad's own columns, row-aligned with the ad table.
    ad_margins: np.ndarray
    pid_margins: Mapping[str, float]
    #: Per profile field: contribution of each of PROFILE_VALUES.
    profile_margins: Mapping[str, np.ndarray]
    #: ALS affinity contribution: offset + slope * value, or `missing` for NaN; None if unused.
    pair: tuple[float, float, float] | None

    @classmethod
    def compile(cls, model: CtrModel, ads: Mapping[str, np.ndarray]) -> CompiledScorer | None:
        """Split `model` over the ad table `ads`; None when the spec does not split cleanly."""
        columns = set(model.spec.input_columns)
        if not columns <= {*REQUEST_COLUMNS, *AD_COLUMNS, PAIR_COLUMN}:
            return None
        slots = _slots_by_column(model.spec)
        rows = len(next(iter(ads.values())))
        ad_margins = np.zeros(rows)
        for start in range(0, rows, AD_CHUNK):
            chunk = {c: ads[c][start:start + AD_CHUNK] for c in AD_COLUMNS if c in columns}
            if chunk:
                ad_margins[start:start + AD_CHUNK] = _contributions(model, slots, chunk)
        pid_margins = {pid: float(_contributions(model, slots, {"pid": np.array([pid])})[0])
                       for pid in features.KNOWN_PIDS} if "pid" in columns else {}
        profile_margins = {
            field: _contributions(model, slots, {field: PROFILE_VALUES})
            if field in columns else np.zeros(len(PROFILE_VALUES))
            for field in features.USER_PROFILE_FIELDS
        }
        pair = None
        if PAIR_COLUMN in columns:
            pair = _affine_pair(model, slots)
            if pair is None:
                return None
        scorer = cls(model, ad_margins, pid_margins, profile_margins, pair)
        return scorer if scorer._agrees_with_encoder(ads) else None

    def margins(
        self, pid: str, user: UserFeatures, position: np.ndarray, affinity: np.ndarray | None
    ) -> np.ndarray:
        """Margins of the ads at `position` in the ad table for one request."""
        request = self.model.intercept + self.pid_margins.get(pid, 0.0)
        for field, table in self.profile_margins.items():
            request += table[_profile_index(user.profile[field])]
        margins = self.ad_margins.take(position) + request
        if self.pair is not None and affinity is not None:
            offset, slope, missing = self.pair
            values = affinity.astype(np.float32).astype(np.float64)
            margins += np.where(np.isnan(values), missing, offset + slope * values)
        return margins

    def _agrees_with_encoder(self, ads: Mapping[str, np.ndarray], samples: int = 256) -> bool:
        rng = np.random.default_rng(0)
        rows = len(next(iter(ads.values())))
        position = rng.integers(0, rows, samples)
        pids = rng.choice(features.KNOWN_PIDS, samples)
        codes = rng.integers(-1, 128, (samples, len(features.USER_PROFILE_FIELDS)))
        affinity = np.where(rng.random(samples) < 0.2, np.nan, rng.normal(0, 2, samples))
        columns: dict[str, np.ndarray] = {"pid": pids, PAIR_COLUMN: affinity}
        for i, field in enumerate(features.USER_PROFILE_FIELDS):
            columns[field] = np.where(codes[:, i] < 0, np.nan, codes[:, i])
        for column in AD_COLUMNS:
            columns[column] = ads[column][position]
        spec = self.model.spec
        expected = spec.encode(columns).astype(np.float64) @ self.model.weights \
            + self.model.intercept
        actual = np.empty(samples)
        for i in range(samples):
            profile = {f: float(columns[f][i]) for f in features.USER_PROFILE_FIELDS}
            actual[i] = self.margins(str(pids[i]), UserFeatures(profile), position[i:i + 1],
                                     affinity[i:i + 1])[0]
        return bool(np.max(np.abs(actual - expected)) <= TOLERANCE)


def _slots_by_column(spec: features.FeatureSpec) -> dict[str, list[int]]:
    slots: dict[str, list[int]] = {}
    start = 0
    for block in spec.blocks:
        width = len(block.names)
        slots.setdefault(block.column, []).extend(range(start, start + width))
        start += width
    return slots


def _contributions(
    model: CtrModel, slots: dict[str, list[int]], values: Mapping[str, np.ndarray]
) -> np.ndarray:
    """Summed margin contribution of the columns in `values`, one per row, via the encoder."""
    # Every other column gets a value each block accepts; its slots are not read.
    probe: dict[str, object] = {column: np.nan for column in model.spec.input_columns}
    probe["pid"] = features.KNOWN_PIDS[0]
    probe.update(values)
    encoded = model.spec.encode(probe)
    used = [slot for column in values for slot in slots[column]]
    return encoded[:, used].astype(np.float64) @ model.weights[used]


def _affine_pair(
    model: CtrModel, slots: dict[str, list[int]]
) -> tuple[float, float, float] | None:
    probed = _contributions(model, slots, {PAIR_COLUMN: np.array([np.nan, *_AFFINE_PROBES])})
    missing, finite = float(probed[0]), probed[1:]
    offset = float(finite[_AFFINE_PROBES.tolist().index(0.0)])
    slope = float((finite[-1] - finite[0]) / (_AFFINE_PROBES[-1] - _AFFINE_PROBES[0]))
    fitted = offset + slope * _AFFINE_PROBES
    if np.max(np.abs(fitted - finite)) > TOLERANCE:
        return None
    return offset, slope, missing


def _profile_index(value: float) -> int:
    """Row of PROFILE_VALUES holding `value`; anything else is an unknown level, i.e. missing."""
    if math.isnan(value) or not 0 <= value <= 127 or value != int(value):
        return 0
    return int(value) + 1
