"""One data version's ranking state, held in memory and scored against per request.

A :class:`RankingSnapshot` is immutable and replaced as a whole on reload, so a request that
started on one version finishes on it. Everything per-version (the ad table's arrays, the
category factors, the model split into per-column contributions) is prepared when the
snapshot is built; a request only looks its candidates up, computes the user's ALS affinity
to their categories and sums the model's contributions - the batch job's offline scoring
with the same stored values (see scorer.py for why the sums equal encode + predict).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from adrec.core import codecs, features
from adrec.core.codecs import UserFeatures
from adrec.core.model import CtrModel
from adrec.services.ranking.scorer import CompiledScorer
from adrec.services.runtime.data import model_version

#: Ad table columns the ranking service needs (the table may hold more).
AD_COLUMNS = ("adgroup_id", "cate_id", *features.AD_NUMERIC_FIELDS)


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
    ad_cate_ids: np.ndarray
    ad_numeric: dict[str, np.ndarray]
    cate_ids: np.ndarray
    cate_factors: np.ndarray
    #: None when the model's spec cannot be split: every request is then encoded.
    scorer: CompiledScorer | None
    uses_affinity: bool

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
        return cls(
            data_version=data_version,
            model_version=model_version(data_version, model.spec.spec_id),
            model=model,
            ad_ids=ad_ids,
            ad_cate_ids=table["cate_id"].astype(np.int64),
            ad_numeric=ad_numeric,
            cate_ids=cate_ids,
            cate_factors=factors["factors"].astype(np.float32),
            scorer=CompiledScorer.compile(model, ad_numeric) if len(ad_ids) else None,
            uses_affinity="als_affinity" in model.spec.input_columns,
        )

    @property
    def ads(self) -> int:
        return len(self.ad_ids)

    def score(
        self, pid: str, user: UserFeatures, candidates: np.ndarray, top_k: int
    ) -> Scored:
        """The best `top_k` distinct candidates (all when 0), CTR descending, ties in order."""
        # Looking up the ids in ascending order is cache-friendly; then back to request order.
        distinct, first = np.unique(candidates, return_index=True)
        position = np.searchsorted(self.ad_ids, distinct)
        np.minimum(position, max(self.ads - 1, 0), out=position)
        known = (self.ad_ids[position] == distinct) if self.ads else \
            np.zeros(len(distinct), dtype=bool)
        unknown = len(distinct) - int(np.count_nonzero(known))
        request_order = np.argsort(first[known])
        position, candidates = position[known][request_order], distinct[known][request_order]
        if not len(candidates):
            return Scored([], [], unknown)

        affinity = self._affinity(user, position) if self.uses_affinity else None
        if self.scorer is not None:
            ctrs = 1.0 / (1.0 + np.exp(-self.scorer.margins(pid, user, position, affinity)))
        else:
            ctrs = self.encode_and_predict(pid, user, position, affinity)

        order = np.argsort(-ctrs, kind="stable")
        if top_k:
            order = order[:top_k]
        return Scored(candidates[order].tolist(), ctrs[order].tolist(), unknown)

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

    def _affinity(self, user: UserFeatures, position: np.ndarray) -> np.ndarray:
        factors = user.als_factors
        if factors is None or len(factors) != self.cate_factors.shape[1]:
            # No factors (or factors of another ALS rank): missing, as the job encodes it.
            return np.full(len(position), np.nan)
        return features.als_affinity(
            factors, self.ad_cate_ids[position], self.cate_ids, self.cate_factors
        )
