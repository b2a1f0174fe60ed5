"""RecallService: a user's candidate ads from the active data version.

The user's recall list is read from Redis on every request (one GET), so a list updated in
place is served at once. Users without one get the version's popular list for the
placement, which is read once per version and answered from memory.
"""

from __future__ import annotations

import dataclasses

import grpc
from redis.exceptions import RedisError

from adrec.api.common.v1 import common_pb2
from adrec.api.recall.v1 import recall_service_pb2, recall_service_pb2_grpc
from adrec.core import keys
from adrec.core.metadata import VersionMeta
from services.runtime.data import PopularLists, RedisOp, RedisReader
from services.runtime.logs import service_logger
from services.runtime.metrics import enum_labels
from services.runtime.requests import (
    InvalidArgumentError,
    UnavailableError,
    grpc_errors,
    known_pid,
    positive_id,
)
from services.runtime.server import ServiceSpec

GetCandidatesResponse = recall_service_pb2.GetCandidatesResponse
#: Fallback reason -> its name in metrics ("no_recall_set").
_FALLBACK_REASONS = enum_labels(recall_service_pb2.FallbackReason)


@dataclasses.dataclass(frozen=True)
class RecallVersion:
    version: str
    popular: PopularLists


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
        self.current = RecallVersion(version, popular)
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
        user_id = positive_id("user_id", request.user_id)
        pid = known_pid("pid", request.pid, required=False)
        limit = request.limit
        if limit < 0:
            raise InvalidArgumentError("limit", f"must be 0 (everything) or more, got {limit}")
        current = self.current
        if current is None:
            raise UnavailableError("no published data version yet")

        try:
            ids = await self.reader.read(keys.RECALL, current.version, user_id, op=RedisOp.RECALL)
        except RedisError as error:
            raise UnavailableError(f"cannot read the recall set: {error}") from None
        if ids is not None and len(ids):
            if limit:
                ids = ids[:limit]
            self.metrics.candidates.observe(len(ids))
            return GetCandidatesResponse(
                ad_ids=ids.tolist(),
                source=common_pb2.CANDIDATE_SOURCE_PERSONAL,
                data_version=current.version,
            )
        popular = current.popular.for_pid(pid)
        if limit:
            popular = popular[:limit]
        reason = recall_service_pb2.FALLBACK_REASON_NO_RECALL_SET
        self.metrics.fallback(_FALLBACK_REASONS[reason])
        self.metrics.candidates.observe(len(popular))
        return GetCandidatesResponse(
            ad_ids=popular,
            source=common_pb2.CANDIDATE_SOURCE_POPULAR,
            fallback_reason=reason,
            data_version=current.version,
        )
