"""RecallService: a user's candidate ads from the active data version.

The user's recall list is read from Redis on every request (one GET), so a list updated in
place is served at once. Users without one get the version's popular list for the
placement, which is read once per version and answered from memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import grpc
import numpy as np
from redis.exceptions import RedisError

from adrec.api.common.v1 import common_pb2
from adrec.api.recall.v1 import recall_service_pb2, recall_service_pb2_grpc
from adrec.core import keys, realtime
from adrec.core.codecs import CodecError
from adrec.core.metadata import VersionMeta
from adrec.core.realtime import CategoryAds
from services.runtime.data import LOAD_TIMEOUT_SECONDS, PopularLists, RedisOp, RedisReader
from services.runtime.logs import service_logger
from services.runtime.metrics import enum_labels
from services.runtime.requests import (
    FieldChecks,
    grpc_errors,
    no_version_loaded,
    redis_unavailable,
)
from services.runtime.server import ServiceSpec

GetCandidatesResponse = recall_service_pb2.GetCandidatesResponse
_NO_ADS = np.zeros(0, dtype=np.int64)
#: Fallback reason -> its name in metrics ("no_recall_set").
_FALLBACK_REASONS = enum_labels(recall_service_pb2.FallbackReason)


@dataclasses.dataclass(frozen=True)
class RecallVersion:
    version: str
    popular: PopularLists
    category_ads: CategoryAds


class RecallService(recall_service_pb2_grpc.RecallServiceServicer):
    name = "recall"

    def __init__(self, reader: RedisReader):
        self.reader = reader
        self.metrics = reader.metrics
        self.log = service_logger(self.name)
        self.metrics.declare_fallback_reasons(_FALLBACK_REASONS.values())
        self.current: RecallVersion | None = None

    @property
    def spec(self) -> ServiceSpec:
        return ServiceSpec.of(
            recall_service_pb2.DESCRIPTOR.services_by_name["RecallService"],
            self,
            recall_service_pb2_grpc.add_RecallServiceServicer_to_server,
        )

    @property
    def answers_without_redis(self) -> bool:
        # Every answer is a Redis read of the user's recall list.
        return False

    @property
    def ready(self) -> bool:
        return self.current is not None

    async def load_version(self, version: str, meta: VersionMeta | None) -> None:
        popular = await PopularLists.read(self.reader, version)
        table = await self.reader.read(
            keys.CATEGORY_ADS,
            version,
            op=RedisOp.LOAD_CATEGORY_ADS,
            timeout=LOAD_TIMEOUT_SECONDS,
        )
        # A version published before real-time interest existed has no table: no interest.
        category_ads = CategoryAds.from_table(table) if table is not None else CategoryAds.empty()
        self.current = RecallVersion(version, popular, category_ads)
        self.metrics.set_data_version(version, meta.created_at_unix if meta else None)
        self.log.info(
            "following data version %s",
            version,
            extra={
                "version": version,
                "popular_lists": {scope: len(ids) for scope, ids in popular.by_scope.items()},
            },
        )

    @grpc_errors
    async def GetCandidates(
        self,
        request: recall_service_pb2.GetCandidatesRequest,
        context: grpc.aio.ServicerContext[
            recall_service_pb2.GetCandidatesRequest, GetCandidatesResponse
        ],
    ) -> GetCandidatesResponse:
        checks = FieldChecks()
        user_id = checks.positive_id("user_id", request.user_id)
        pid = checks.known_pid("pid", request.pid, required=False)
        limit = request.limit
        if limit < 0:
            checks.add("limit", f"must be 0 (everything) or more, got {limit}")
        checks.raise_if_any()
        current = self.current
        if current is None:
            raise no_version_loaded(self.reader.last_failure, "no published data version yet")

        recall_read = self.reader.read(keys.RECALL, current.version, user_id, op=RedisOp.RECALL)
        state_read = self.reader.get(keys.REALTIME_USER.key(user_id), op=RedisOp.REALTIME_STATE)
        ids, state_raw = await asyncio.gather(recall_read, state_read, return_exceptions=True)
        if isinstance(ids, RedisError):
            raise redis_unavailable("the recall set", ids) from None
        if isinstance(ids, BaseException):
            raise ids
        interest = self._interest_ads(current, user_id, state_raw)
        if ids is not None and len(ids):
            source = common_pb2.CANDIDATE_SOURCE_PERSONAL
            reason = recall_service_pb2.FALLBACK_REASON_UNSPECIFIED
            rest = ids
        else:
            source = common_pb2.CANDIDATE_SOURCE_POPULAR
            reason = recall_service_pb2.FALLBACK_REASON_NO_RECALL_SET
            self.metrics.fallback(_FALLBACK_REASONS[reason])
            rest = np.asarray(current.popular.for_pid(pid), dtype=np.int64)
        if len(interest):
            rest = rest[~np.isin(rest, interest)]
        merged = np.concatenate([interest.astype(np.int64), rest.astype(np.int64)])
        if limit:
            merged = merged[:limit]
        self.metrics.candidates.observe(len(merged))
        return GetCandidatesResponse(
            ad_ids=merged.tolist(),
            source=source,
            fallback_reason=reason,
            data_version=current.version,
            interest_count=min(len(interest), len(merged)),
        )

    def _interest_ads(
        self, current: RecallVersion, user_id: int, state_raw: bytes | BaseException | None
    ) -> np.ndarray:
        """The leading ads of the user's interest categories, strongest first, at most
        :data:`realtime.INTEREST_CANDIDATES`; none when the state is absent or unreadable
        (the ALS list still answers: real-time interest only ever adds to it)."""
        if state_raw is None or isinstance(state_raw, BaseException):
            return _NO_ADS
        try:
            state = keys.REALTIME_USER.decode(state_raw)
        except CodecError:
            self.log.warning("unreadable real-time state of user %d", user_id)
            return _NO_ADS
        chosen: list[np.ndarray] = []
        room = realtime.INTEREST_CANDIDATES
        for cate_id, _score in state.interest_ranking(
            int(time.time()), realtime.INTEREST_HALF_LIFE_SECONDS
        ):
            leaders = current.category_ads.for_category(cate_id)[:room]
            chosen.append(leaders)
            room -= len(leaders)
            if room <= 0:
                break
        return np.concatenate(chosen) if chosen else _NO_ADS
