"""One data version's ranking state, held in memory and scored against per request.

A :class:`RankingSnapshot` is immutable and replaced as a whole on reload, so a request that
started on one version finishes on it. Everything per-version (the ad table's arrays, the
category factors, the model split into per-column contributions, an id -> row table, each
ad's row in the category factors) is prepared when the snapshot is built; a request only
looks its candidates up, computes the user's ALS affinity to their categories and sums the
model's contributions - the batch job's offline scoring with the same stored values (see
scorer.py for why the sums equal encode + predict).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from adrec.core import codecs, features
from adrec.core.codecs import UserFeatures
from adrec.core.model import CtrModel
from services.ranking.scorer import CompiledScorer
from services.runtime.data import model_version

#: Ad table columns the ranking service needs (the table may hold more).
AD_COLUMNS = ("adgroup_id", "cate_id", *features.AD_NUMERIC_FIELDS)
#: Ad ids below this get a dense id -> row table (int32: 64 MiB at most; the data set's ids
#: stay under a million); larger ids are looked up by binary search instead.
DENSE_ID_LIMIT = 1 << 24


class SnapshotError(ValueError):
    """A published version that cannot be served (missing or malformed data)."""


@dataclasses.dataclass(frozen=True)
class Scored:
    """Scored candidates, best first, and how many distinct candidates had no features."""

    ad_ids: list[int]
    ctrs: list[float]
    unknown_ads: int


@dataclasses.dataclass(frozen=True, eq=False)
class RankingSnapshot:
    data_version: str
    model_version: str
    model: CtrModel
    ad_ids: np.ndarray
    ad_numeric: dict[str, np.ndarray]
    cate_ids: np.ndarray
    #: float64 (the float32 stored values, exactly), row-aligned with cate_ids, plus a last
    #: row of NaN: the factors of every category without any, so their affinity is missing.
    cate_factors: np.ndarray
    #: None when the model's spec cannot be split: every request is then encoded.
    scorer: CompiledScorer | None
    uses_affinity: bool
    #: Ad id -> row of the ad table, -1 for ids it lacks; the last entry stands for every id
    #: past the largest. None when the ids are too large for a dense table.
    row_by_id: np.ndarray | None
    #: Row of each ad's category in cate_factors (the NaN row when it has no factors).
    ad_cate_rows: np.ndarray

    @classmethod
    def build(
        cls,
        data_version: str,
        model_json: bytes | None,
        ad_table: bytes | None,
        cate_factors: bytes | None,
    ) -> RankingSnapshot:
        """Decode and prepare a version; raises ModelArtifactError or SnapshotError."""
        if model_json is None:
            raise SnapshotError(f"version {data_version} has no CTR model")
        if ad_table is None:
            raise SnapshotError(f"version {data_version} has no ad feature table")
        model = CtrModel.from_json(model_json)
        try:
            table = codecs.decode_table(ad_table)
            factors = (codecs.decode_table(cate_factors) if cate_factors is not None
                       else {"cate_id": np.zeros(0, np.int32),
                             "factors": np.zeros((0, 0), np.float32)})
        except codecs.CodecError as error:
            raise SnapshotError(f"version {data_version}: {error}") from None
        missing = [column for column in AD_COLUMNS if column not in table]
        if missing:
            raise SnapshotError(f"version {data_version}: ad table lacks columns {missing}")
        ad_ids = table["adgroup_id"].astype(np.int64)
        if len(ad_ids) > 1 and not (np.diff(ad_ids) > 0).all():
            raise SnapshotError(f"version {data_version}: ad table is not sorted by adgroup_id")
        cate_ids = factors["cate_id"].astype(np.int64)
        if len(cate_ids) > 1 and not (np.diff(cate_ids) > 0).all():
            raise SnapshotError(f"version {data_version}: category factors are not sorted")
        ad_numeric = {name: table[name].astype(np.float64) for name in features.AD_NUMERIC_FIELDS}
        # Stored as float32: widening once here gives the values als_affinity computes with
        # after widening the rows it gathers.
        cate_factors = factors["factors"].astype(np.float32).astype(np.float64)
        missing_factors = np.full((1, cate_factors.shape[1]), np.nan)
        ad_cate_rows = _rows_in(cate_ids, table["cate_id"].astype(np.int64))
        return cls(
            data_version=data_version,
            model_version=model_version(data_version, model.spec.spec_id),
            model=model,
            ad_ids=ad_ids,
            ad_numeric=ad_numeric,
            cate_ids=cate_ids,
            cate_factors=np.vstack([cate_factors, missing_factors]),
            scorer=CompiledScorer.compile(model, ad_numeric) if len(ad_ids) else None,
            uses_affinity="als_affinity" in model.spec.input_columns,
            row_by_id=_dense_rows(ad_ids),
            ad_cate_rows=np.where(ad_cate_rows < 0, len(cate_ids), ad_cate_rows),
        )

    @property
    def ads(self) -> int:
        return len(self.ad_ids)

    def score(
        self, pid: str, user: UserFeatures, candidates: np.ndarray, top_k: int
    ) -> Scored:
        """The best `top_k` distinct candidates (all when 0), CTR descending, ties in order."""
        rows = self._rows(candidates)
        if _has_repeats(candidates):
            # Keep each id's first occurrence, in request order.
            first = np.unique(candidates, return_index=True)[1]
            first.sort()
            candidates, rows = candidates[first], rows[first]
        known = rows >= 0
        unknown = len(rows) - int(np.count_nonzero(known))
        if unknown:
            candidates, rows = candidates[known], rows[known]
        if not len(rows):
            return Scored([], [], unknown)

        affinity = self._affinity(user, rows) if self.uses_affinity else None
        if self.scorer is not None:
            ctrs = 1.0 / (1.0 + np.exp(-self.scorer.margins(pid, user, rows, affinity)))
        else:
            ctrs = self.encode_and_predict(pid, user, rows, affinity)

        order = np.argsort(-ctrs, kind="stable")
        if top_k:
            order = order[:top_k]
        return Scored(candidates[order].tolist(), ctrs[order].tolist(), unknown)

    def _rows(self, candidates: np.ndarray) -> np.ndarray:
        """Row of each candidate id in the ad table, -1 for ids the table lacks."""
        if self.row_by_id is not None:
            return self.row_by_id.take(np.minimum(candidates, len(self.row_by_id) - 1))
        if not self.ads:
            return np.full(len(candidates), -1, dtype=np.int64)
        return _rows_in(self.ad_ids, candidates)

    def encode_and_predict(
        self, pid: str, user: UserFeatures, position: np.ndarray, affinity: np.ndarray | None
    ) -> np.ndarray:
        """CTRs the plain way: the shared encoder over every candidate row, then the model."""
        columns: dict[str, np.ndarray | str] = {"pid": pid, **user.columns()}
        for name, values in self.ad_numeric.items():
            columns[name] = values[position]
        if affinity is not None:
            columns["als_affinity"] = affinity
        return self.model.predict(self.model.spec.encode(columns))

    def _affinity(self, user: UserFeatures, rows: np.ndarray) -> np.ndarray:
        """features.als_affinity of the ads at `rows`, with their categories looked up once
        per version: the same products of the same values, so the same results."""
        factors = user.als_factors
        if factors is None or len(factors) != self.cate_factors.shape[1]:
            # No factors (or factors of another ALS rank): missing, as the job encodes it.
            return np.full(len(rows), np.nan)
        # take() gathers rows several times faster than fancy indexing does; an ad whose
        # category has no factors meets the NaN row, so its product is NaN.
        return self.cate_factors.take(self.ad_cate_rows.take(rows), axis=0) \
            @ np.asarray(factors, np.float64)


def _rows_in(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Position of each of `ids` in the ascending `sorted_ids`, -1 where absent."""
    if not len(sorted_ids):
        return np.full(len(ids), -1, dtype=np.int64)
    position = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return np.where(sorted_ids[position] == ids, position, -1)


def _dense_rows(ad_ids: np.ndarray) -> np.ndarray | None:
    """The id -> row table of RankingSnapshot.row_by_id for ascending `ad_ids`."""
    if not len(ad_ids) or ad_ids[0] < 0 or ad_ids[-1] >= DENSE_ID_LIMIT:
        return None
    rows = np.full(int(ad_ids[-1]) + 2, -1, dtype=np.int32)
    rows[ad_ids] = np.arange(len(ad_ids), dtype=np.int32)
    return rows


def _has_repeats(ids: np.ndarray) -> bool:
    """Whether an id occurs twice; checked on the ids cut to 32 bits, which sort four times
    faster and can only add repeats (then np.unique sorts out the truth), never hide one."""
    ordered = np.sort(ids.astype(np.int32))
    return bool((ordered[1:] == ordered[:-1]).any())
