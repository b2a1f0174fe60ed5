"""RankingService: scores a user's candidate ads with the active version's LR model.

The model, the ad feature table and the ALS category factors of the active version live in
one immutable :class:`RankingSnapshot`, swapped as a whole when a new version is activated;
the user's features are read from Redis on every request, so a profile update applies to
the next one. A version whose model does not match this code's feature spec is refused:
the previous snapshot keeps serving, and the refusal is logged and counted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

import grpc
import numpy as np
from redis.exceptions import RedisError, ResponseError

from adrec.api.common.v1 import common_pb2
from adrec.api.ranking.v1 import ranking_service_pb2, ranking_service_pb2_grpc
from adrec.core import features, keys
from adrec.core.codecs import CodecError, UserFeatures
from adrec.core.metadata import VersionMeta
from adrec.core.model import ModelArtifactError
from adrec.core.scoring import Contribution, HistoryCounts, RankBy
from services.ranking.snapshot import RankingSnapshot, SnapshotError
from services.runtime.data import LOAD_TIMEOUT_SECONDS, RedisOp, RedisReader
from services.runtime.logs import service_logger
from services.runtime.requests import (
    FieldChecks,
    grpc_errors,
    no_version_loaded,
    redis_unavailable,
)
from services.runtime.server import ServiceSpec

MAX_CANDIDATES = 1000
MAX_TOP_K = 1000

RankCandidatesResponse = ranking_service_pb2.RankCandidatesResponse
AdExplanation = ranking_service_pb2.AdExplanation
ScoredAd = common_pb2.ScoredAd
FeatureContribution = common_pb2.FeatureContribution
_RANK_BY = {
    common_pb2.RANK_BY_UNSPECIFIED: RankBy.PCTR,
    common_pb2.RANK_BY_PCTR: RankBy.PCTR,
    common_pb2.RANK_BY_ECPM: RankBy.ECPM,
}

#: Why a published version is refused, by the error refusing it: the `reason` label of
#: adrec_model_reload_failures_total, exported at 0 for each from the start.
REFUSAL_REASONS: dict[type[Exception], str] = {
    ModelArtifactError: "model_spec_mismatch",
    SnapshotError: "bad_version_data",
}
#: What a version load reads, in order.
_VERSION_DATA = (
    (keys.MODEL, RedisOp.LOAD_MODEL),
    (keys.ADS, RedisOp.LOAD_ADS),
    (keys.CATE_FACTORS, RedisOp.LOAD_CATE_FACTORS),
    (keys.BIDS, RedisOp.LOAD_BIDS),
)


class RankingService(ranking_service_pb2_grpc.RankingServiceServicer):
    name = "ranking"

    def __init__(self, reader: RedisReader):
        self.reader = reader
        self.metrics = reader.metrics
        self.log = service_logger(self.name)
        self.metrics.declare_reload_failure_reasons(REFUSAL_REASONS.values())
        self.snapshot: RankingSnapshot | None = None

    @property
    def spec(self) -> ServiceSpec:
        return ServiceSpec.of(
            ranking_service_pb2.DESCRIPTOR.services_by_name["RankingService"],
            self,
            ranking_service_pb2_grpc.add_RankingServiceServicer_to_server,
        )

    @property
    def answers_without_redis(self) -> bool:
        # Every answer needs the user's features from Redis.
        return False

    @property
    def ready(self) -> bool:
        return self.snapshot is not None

    async def load_version(self, version: str, meta: VersionMeta | None) -> None:
        model_json, ad_table, cate_factors, bids = [
            await self.reader.get(family.key(version), op=op, timeout=LOAD_TIMEOUT_SECONDS)
            for family, op in _VERSION_DATA
        ]
        try:
            # Decoding a large ad table takes a while: keep answering requests meanwhile.
            snapshot = await asyncio.to_thread(
                RankingSnapshot.build, version, model_json, ad_table, cate_factors, bids
            )
        except tuple(REFUSAL_REASONS) as error:
            reason = next(r for kind, r in REFUSAL_REASONS.items() if isinstance(error, kind))
            self.metrics.model_reload_failure(reason)
            serving = self.snapshot.data_version if self.snapshot else None
            self.log.error(
                "refused data version %s; %s",
                version,
                f"still serving {serving}" if serving else "nothing to serve yet",
                extra={
                    "version": version,
                    "reason": reason,
                    "error": str(error),
                    "serving_version": serving,
                },
            )
            return
        self.snapshot = snapshot
        self.metrics.set_data_version(snapshot.data_version, meta.created_at_unix if meta else None)
        self.metrics.set_model_version(snapshot.model_version)
        self.log.info(
            "loaded data version %s",
            version,
            extra={
                "version": version,
                "model_version": snapshot.model_version,
                "ads": snapshot.ads,
                "categories": len(snapshot.cate_ids),
                "bids": snapshot.has_bids,
            },
        )

    @grpc_errors
    async def RankCandidates(
        self,
        request: ranking_service_pb2.RankCandidatesRequest,
        context: grpc.aio.ServicerContext[
            ranking_service_pb2.RankCandidatesRequest, RankCandidatesResponse
        ],
    ) -> RankCandidatesResponse:
        checks = FieldChecks()
        user_id = checks.positive_id("user_id", request.user_id)
        pid = checks.known_pid("pid", request.pid, required=True)
        top_k = checks.in_range("top_k", request.top_k, 0, MAX_TOP_K)
        rank_by = _RANK_BY.get(request.rank_by)
        if rank_by is None:
            checks.add("rank_by", f"unknown value {request.rank_by}")
        count = len(request.ad_ids)
        candidates = np.array(request.ad_ids, dtype=np.int64)
        if count > MAX_CANDIDATES:
            checks.add("ad_ids", f"holds {count} ids; at most {MAX_CANDIDATES}")
        elif count and candidates.min() <= 0:
            bad = np.flatnonzero(candidates <= 0)
            checks.add(
                "ad_ids",
                f"ids must be positive; ad_ids[{bad[0]}] is {candidates[bad[0]]}"
                + (f", and {len(bad) - 1} more are not" if len(bad) > 1 else ""),
            )
        checks.raise_if_any()
        snapshot = self.snapshot
        if snapshot is None:
            raise no_version_loaded(self.reader.last_failure, "no CTR model loaded yet")
        if rank_by is RankBy.ECPM and not snapshot.has_bids:
            checks.add(
                "rank_by",
                f"RANK_BY_ECPM needs bids, and data version {snapshot.data_version} has none",
            )
            checks.raise_if_any()
        assert rank_by is not None  # checked above

        state_key = keys.REALTIME_USER.key(user_id)
        stored: UserFeatures | BaseException | None
        state_raw: bytes | BaseException | None = None
        if not snapshot.reads_history:
            try:
                stored = await self._read_user(snapshot.data_version, user_id)
            except RedisError as error:
                stored = error
        elif self.reader.cluster:
            stored, state_raw = await self._read_apart(snapshot.data_version, user_id, state_key)
        else:
            stored, state_raw = await self._read_both(snapshot.data_version, user_id, state_key)
        if isinstance(stored, RedisError):
            raise redis_unavailable("the user's features", stored) from None
        if isinstance(stored, BaseException):
            raise stored
        user = stored if stored is not None else UserFeatures.missing()
        history = self._history(user_id, state_raw)

        scored = snapshot.score(pid, user, candidates, top_k, history, rank_by, request.explain)
        self.metrics.candidates.observe(count)
        if scored.unknown_ads:
            self.metrics.unknown_ads.inc(scored.unknown_ads)
        if stored is None:
            self.metrics.user_profiles_missing.inc()
        if scored.bids is None or scored.ecpms is None:
            ads = [
                ScoredAd(ad_id=ad_id, ctr=ctr, pctr=pctr)
                for ad_id, ctr, pctr in zip(scored.ad_ids, scored.ctrs, scored.pctrs, strict=True)
            ]
        else:
            ads = [
                ScoredAd(ad_id=ad_id, ctr=ctr, pctr=pctr, bid=bid, ecpm=ecpm)
                for ad_id, ctr, pctr, bid, ecpm in zip(
                    scored.ad_ids, scored.ctrs, scored.pctrs, scored.bids, scored.ecpms, strict=True
                )
            ]
        return RankCandidatesResponse(
            ads=ads,
            model_version=snapshot.model_version,
            data_version=snapshot.data_version,
            unknown_ads_skipped=scored.unknown_ads,
            user_profile_found=stored is not None,
            behaviour_counts_found=history is not None,
            explanations=_explanations(scored.ad_ids, scored.contributions),
        )

    def _read_user(self, version: str, user_id: int) -> Awaitable[UserFeatures | None]:
        return self.reader.read(keys.USER, version, user_id, op=RedisOp.USER_FEATURES)

    async def _read_apart(
        self, version: str, user_id: int, state_key: bytes
    ) -> tuple[UserFeatures | BaseException | None, bytes | BaseException | None]:
        """The user's features and real-time state value, both reads in flight at once (one
        round trip, each on its key's node), each failing alone: a state that cannot be
        read leaves the features readable."""
        state_read = self.reader.get(state_key, op=RedisOp.REALTIME_STATE)
        stored, state_raw = await asyncio.gather(
            self._read_user(version, user_id), state_read, return_exceptions=True
        )
        return stored, state_raw

    async def _read_both(
        self, version: str, user_id: int, state_key: bytes
    ) -> tuple[UserFeatures | BaseException | None, bytes | BaseException | None]:
        """As :meth:`_read_apart`, both GETs in one write and one read of one connection
        (a single Redis). A failure of the server fails both, as two reads would; an error
        reply to one key (a value of the wrong type) has them read apart."""
        try:
            raw_user, state_raw = await self.reader.get_many(
                [
                    (keys.USER.key(version, user_id), RedisOp.USER_FEATURES),
                    (state_key, RedisOp.REALTIME_STATE),
                ],
                self.reader.timeout,
            )
        except ResponseError:
            return await self._read_apart(version, user_id, state_key)
        except RedisError as error:
            return error, error
        return (keys.USER.decode(raw_user) if raw_user is not None else None), state_raw

    def _history(self, user_id: int, state_raw: object) -> HistoryCounts | None:
        """The user's window counts now; None without any (the model then counts 0s).

        Counts only sharpen a score, so a state that cannot be read or decoded is scored
        as none rather than failing the request; it is logged.
        """
        if state_raw is None:
            return None
        if isinstance(state_raw, BaseException):
            if not isinstance(state_raw, RedisError):
                raise state_raw
            return None
        try:
            state = keys.REALTIME_USER.decode(state_raw)  # type: ignore[arg-type]
        except CodecError as error:
            self.log.warning(
                "unreadable real-time state of user %d; scored without counts",
                user_id,
                extra={"user_id": user_id, "error": str(error)},
            )
            return None
        counts = state.window_counts(int(time.time()), features.HISTORY_COUNTS)
        return counts or None


def _explanations(
    ad_ids: list[int], contributions: list[list[Contribution]] | None
) -> list[ranking_service_pb2.AdExplanation]:
    if contributions is None:
        return []
    return [
        AdExplanation(
            ad_id=ad_id,
            contributions=[
                FeatureContribution(feature=c.feature, column=c.column, margin=c.margin)
                for c in terms
            ],
        )
        for ad_id, terms in zip(ad_ids, contributions, strict=True)
    ]
