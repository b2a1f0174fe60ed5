"""What the gateway keeps per data version: popular lists and the offline lists' CTR basis.

The batch job scores each user's offline list once, at one placement (the majority one),
because a list per placement does not fit the Redis budget. The LR model is additive and
the placement enters it only through its own one-hot weight, so the list's order holds for
every placement and its CTRs convert exactly: shift each logit by the difference of the two
placements' weights. The gateway loads the version's model to know that difference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from adrec.core import keys
from adrec.core.dataset import PIDS
from adrec.core.metadata import VersionMeta
from adrec.core.model import CtrModel, ModelArtifactError
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

    def offline_ctrs(self, pid: str, stored: np.ndarray) -> np.ndarray:
        shift = self.offline_logit_shift.get(pid, 0.0)
        if not shift:
            return stored
        ctrs = np.clip(stored.astype(np.float64), 1e-7, 1 - 1e-7)
        return 1.0 / (1.0 + np.exp(-(np.log(ctrs / (1.0 - ctrs)) + shift)))

    @classmethod
    async def read(
        cls, reader: RedisReader, version: str, meta: VersionMeta | None, log: ServiceLogger
    ) -> GatewayVersion:
        """The version's state; `meta` is its metadata (None when it has none)."""
        popular = await PopularLists.read(reader, version)
        offline_pid = (meta.content.offline_pid if meta else None) or DEFAULT_OFFLINE_PID
        spec_id, shifts = "", {}
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
        return cls(
            version=version,
            popular=popular,
            model_version=model_version(version, spec_id) if spec_id else "",
            offline_logit_shift=shifts,
        )


def _placement_shifts(model: CtrModel, offline_pid: str) -> dict[str, float]:
    slots = {pid: model.spec.one_hot_index("pid", pid) for pid in PIDS}
    base = slots.get(offline_pid)
    if base is None:
        return {}
    weights = model.weights
    return {
        pid: float(weights[slot] - weights[base]) for pid, slot in slots.items() if slot is not None
    }
