"""One data version's ranking state, held in memory and scored against per request.

A :class:`RankingSnapshot` is immutable and replaced as a whole on reload, so a request that
started on one version finishes on it. Everything per-version (the ad table's arrays, the
category factors, the model split into per-column contributions, the id -> row lookup) is
prepared when the snapshot is built, as an :class:`adrec.core.scoring.CtrScorer`: the one
scoring path the batch job's offline top-N goes through too, so a request gets the job's
list for the same user and candidates (CTR descending, ties in request order).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from adrec.core import codecs, keys
from adrec.core.codecs import UserFeatures
from adrec.core.scoring import (
    Contribution,
    CtrScorer,
    HistoryCounts,
    RankBy,
    ScoringDataError,
    present,
)
from services.runtime.data import model_version


class SnapshotError(ValueError):
    """A published version that cannot be served (missing or malformed data)."""


@dataclasses.dataclass(frozen=True)
class Scored:
    """Scored candidates, best first, and how many distinct candidates had no features."""

    ad_ids: list[int]
    ctrs: list[float]
    unknown_ads: int
    pctrs: list[float]
    #: None for an ad without a bid; None altogether when the version has no bids.
    bids: list[float | None] | None
    ecpms: list[float | None] | None
    #: Each ad's largest feature contributions, when asked to explain.
    contributions: list[list[Contribution]] | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class RankingSnapshot:
    data_version: str
    model_version: str
    scorer: CtrScorer

    @classmethod
    def build(
        cls,
        data_version: str,
        model_json: bytes | None,
        ad_table: bytes | None,
        cate_factors: bytes | None,
        bids: bytes | None = None,
    ) -> RankingSnapshot:
        """Decode and prepare a version; raises ModelArtifactError or SnapshotError.

        ``bids`` None: the version has none (its input had no bids file)."""
        if model_json is None:
            raise SnapshotError(f"version {data_version} has no CTR model")
        if ad_table is None:
            raise SnapshotError(f"version {data_version} has no ad feature table")
        model = keys.MODEL.decode(model_json)
        try:
            table = keys.ADS.decode(ad_table)
            factors = (
                keys.CATE_FACTORS.decode(cate_factors)
                if cate_factors is not None
                else {"cate_id": np.zeros(0, np.int32), "factors": np.zeros((0, 0), np.float32)}
            )
            bid_list = keys.BIDS.decode(bids) if bids is not None else None
            scorer = CtrScorer.build(model, table, factors["cate_id"], factors["factors"], bid_list)
        except (codecs.CodecError, ScoringDataError) as error:
            raise SnapshotError(f"version {data_version}: {error}") from None
        return cls(data_version, model_version(data_version, model.spec.spec_id), scorer)

    @property
    def ads(self) -> int:
        return len(self.scorer.index.ad_ids)

    @property
    def cate_ids(self) -> np.ndarray:
        return self.scorer.cate_ids

    @property
    def has_bids(self) -> bool:
        return self.scorer.has_bids

    @property
    def reads_history(self) -> bool:
        """Whether the model reads the user's real-time behaviour counts."""
        return self.scorer.uses_history

    def score(
        self,
        pid: str,
        user: UserFeatures,
        candidates: np.ndarray,
        top_k: int,
        history: HistoryCounts | None = None,
        rank_by: RankBy = RankBy.PCTR,
        explain: bool = False,
    ) -> Scored:
        """The best `top_k` distinct candidates (all when 0) by `rank_by`, ties in order;
        with `explain`, each one's largest feature contributions too."""
        ranked = self.scorer.rank(pid, user, candidates, top_k, history, rank_by)
        return Scored(
            ranked.ad_ids.tolist(),
            ranked.ctrs.tolist(),
            ranked.unknown_ads,
            ranked.pctrs.tolist(),
            present(ranked.bids),
            present(ranked.ecpms),
            self.scorer.contributions(pid, user, ranked.rows, history) if explain else None,
        )
