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
from typing import Any

import numpy as np

from adrec.core import keys
from adrec.core.features import KNOWN_PIDS
from adrec.core.model import CtrModel, ModelArtifactError
from services.runtime.data import PopularLists, RedisReader, model_version
from services.runtime.logs import ServiceLogger

#: Placement the job scores offline lists at, unless the version's job report names another.
DEFAULT_OFFLINE_PID = KNOWN_PIDS[0]


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
        cls, reader: RedisReader, version: str, meta: Mapping[str, Any], log: ServiceLogger
    ) -> GatewayVersion:
        """The version's state; `meta` is its metadata ({} when it has none)."""
        popular = await PopularLists.read(reader, version)
        model_raw = await reader.get(keys.MODEL.key(version), op="load_model")
        offline_pid = meta.get("report", {}).get("offline", {}).get("pid", DEFAULT_OFFLINE_PID)
        spec_id, shifts = "", {}
        if model_raw is not None:
            try:
                model = CtrModel.from_json(model_raw)
            except ModelArtifactError as error:
                # The job scored the lists with this artifact all the same; serve them as
                # stored, for the placement they were scored at.
                log.warning(
                    "offline CTRs of version %s are served as scored for placement %s: %s",
                    version, offline_pid, error, extra={"version": version},
                )
            else:
                spec_id = model.spec.spec_id
                shifts = _placement_shifts(model, offline_pid)
        return cls(
            version=version,
            popular=popular,
            model_version=model_version(version, spec_id) if spec_id else "",
            offline_logit_shift=shifts,
        )


def _placement_shifts(model: CtrModel, offline_pid: str) -> dict[str, float]:
    weights = dict(zip(model.spec.feature_names, model.weights.tolist(), strict=True))
    base = weights.get(f"pid={offline_pid}")
    if base is None:
        return {}
    return {pid: weights[f"pid={pid}"] - base for pid in KNOWN_PIDS if f"pid={pid}" in weights}
