"""What the gateway keeps per data version: popular lists, the offline lists' CTR basis,
the model's calibration and the bids.

The batch job scores each user's offline list once, at one placement (the majority one),
because a list per placement does not fit the Redis budget. The LR model is additive and
the placement enters it only through its own one-hot weight, so the list's order holds for
every placement and its CTRs convert exactly: shift each logit by the difference of the two
placements' weights. The gateway loads the version's model to know that difference, and
its calibration, which turns those CTRs into the pCTRs ranking would report; with the
version's bids (``keys.BIDS``) they give each offline ad its eCPM, by the scoring module's
own definition, for lists asked for in eCPM order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from adrec.core import keys
from adrec.core.dataset import PIDS
from adrec.core.metadata import VersionMeta
from adrec.core.model import Calibration, CtrModel, ModelArtifactError
from adrec.core.scoring import RankBy, by_ecpm, ecpm
from services.runtime.data import PopularLists, RedisOp, RedisReader, model_version
from services.runtime.logs import ServiceLogger

#: Placement the job scores offline lists at, unless the version's job report names another.
DEFAULT_OFFLINE_PID = PIDS[0]


@dataclasses.dataclass(frozen=True)
class GatewayVersion:
    version: str
    popular: PopularLists
    model_version: str
    #: Logit shift taking an offline CTR to each placement; empty when the model is unusable.
    offline_logit_shift: Mapping[str, float]
    calibration: Calibration = dataclasses.field(default_factory=Calibration)
    #: Ascending ad ids with a bid, and their bids; None when the version has no bids.
    bids: tuple[np.ndarray, np.ndarray] | None = None

    def offline_ctrs(self, pid: str, stored: np.ndarray) -> np.ndarray:
        shift = self.offline_logit_shift.get(pid, 0.0)
        if not shift:
            return stored
        ctrs = np.clip(stored.astype(np.float64), 1e-7, 1 - 1e-7)
        return 1.0 / (1.0 + np.exp(-(np.log(ctrs / (1.0 - ctrs)) + shift)))

    def bids_of(self, ad_ids: np.ndarray) -> np.ndarray | None:
        """Each ad's bid, NaN for none; None when the version has no bids."""
        if self.bids is None:
            return None
        ids, bids = self.bids
        if not len(ids):
            return np.full(len(ad_ids), np.nan)
        position = np.searchsorted(ids, ad_ids).clip(0, len(ids) - 1)
        return np.where(ids[position] == ad_ids, bids[position], np.nan)

    def offline_scores(
        self, pid: str, ad_ids: np.ndarray, stored: np.ndarray, rank_by: RankBy
    ) -> OfflineScores:
        """An offline list's scores at `pid`, reordered by eCPM when `rank_by` asks."""
        ctrs = np.asarray(self.offline_ctrs(pid, stored), dtype=np.float64)
        pctrs = self.calibration.apply(pid, ctrs)
        bids = self.bids_of(np.asarray(ad_ids, dtype=np.int64))
        if bids is None:
            return OfflineScores(ad_ids, ctrs, pctrs, None, None)
        ecpms = ecpm(pctrs, bids)
        if rank_by is RankBy.ECPM:
            order = by_ecpm(ctrs, ecpms, 0)
            ad_ids, ctrs, pctrs = ad_ids[order], ctrs[order], pctrs[order]
            bids, ecpms = bids[order], ecpms[order]
        return OfflineScores(ad_ids, ctrs, pctrs, bids, ecpms)

    @classmethod
    async def read(
        cls, reader: RedisReader, version: str, meta: VersionMeta | None, log: ServiceLogger
    ) -> GatewayVersion:
        """The version's state; `meta` is its metadata (None when it has none)."""
        popular = await PopularLists.read(reader, version)
        offline_pid = (meta.content.offline_pid if meta else None) or DEFAULT_OFFLINE_PID
        spec_id, shifts, calibration = "", {}, Calibration()
        bids = await reader.read(keys.BIDS, version, op=RedisOp.LOAD_BIDS)
        try:
            model = await reader.read(keys.MODEL, version, op=RedisOp.LOAD_MODEL)
        except ModelArtifactError as error:
            # The job scored the lists with this artifact all the same; serve them as
            # stored, for the placement they were scored at.
            log.warning(
                "offline CTRs of version %s are served as scored for placement %s: %s",
                version,
                offline_pid,
                error,
                extra={"version": version},
            )
        else:
            if model is not None:
                spec_id = model.spec.spec_id
                shifts = _placement_shifts(model, offline_pid)
                calibration = model.calibration
        return cls(
            version=version,
            popular=popular,
            model_version=model_version(version, spec_id) if spec_id else "",
            offline_logit_shift=shifts,
            calibration=calibration,
            bids=bids,
        )


@dataclasses.dataclass(frozen=True)
class OfflineScores:
    """An offline list as served: ids and their scores, row-aligned, best first."""

    ad_ids: np.ndarray
    ctrs: np.ndarray
    pctrs: np.ndarray
    #: NaN for an ad without a bid; None when the version has no bids.
    bids: np.ndarray | None
    ecpms: np.ndarray | None


def _placement_shifts(model: CtrModel, offline_pid: str) -> dict[str, float]:
    slots = {pid: model.spec.one_hot_index("pid", pid) for pid in PIDS}
    base = slots.get(offline_pid)
    if base is None:
        return {}
    weights = model.weights
    return {
        pid: float(weights[slot] - weights[base]) for pid, slot in slots.items() if slot is not None
    }
