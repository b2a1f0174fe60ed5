"""AdminService: sets and reads the ad states (pauses, schedules) and lists their changes.

The states and their change log are kept by :class:`adrec.core.adstate.AdStateStore`,
outside every data version. A change is checked against the active version's ad table
(its ids, and the hierarchy that says what a campaign or customer holds) before anything is
written, and the call returns only once the change counter every gateway reads per request
has moved, so a change is in force for every Recommend call made after it returned.

The service follows the active data version for its ad table alone. Reading states and
the change log needs no version; changing one does, as nothing else could check its id.
Readiness follows Redis alone: every call reads or writes it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TypeVar

import grpc
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from adrec.api.admin.v1 import admin_service_pb2 as pb
from adrec.api.admin.v1 import admin_service_pb2_grpc
from adrec.core import adstate, keys
from adrec.core.adstate import AdHierarchy, AdState, AdStates, Change, Level, Status
from adrec.core.codecs import CodecError
from adrec.core.metadata import VersionMeta
from services.runtime.data import LOAD_TIMEOUT_SECONDS, RedisOp, RedisReader
from services.runtime.logs import service_logger
from services.runtime.requests import (
    FieldChecks,
    UnavailableError,
    grpc_errors,
    no_version_loaded,
    redis_unavailable,
)
from services.runtime.server import ServiceSpec

#: Changes ListAdStateChanges returns unless told, and at most.
DEFAULT_CHANGES = 50
MAX_CHANGES = 1000

_LEVELS = {
    pb.AD_LEVEL_ADGROUP: Level.ADGROUP,
    pb.AD_LEVEL_CAMPAIGN: Level.CAMPAIGN,
    pb.AD_LEVEL_CUSTOMER: Level.CUSTOMER,
}
_LEVEL_VALUES = {level: value for value, level in _LEVELS.items()}
_STATUSES = {pb.AD_STATUS_ACTIVE: Status.ACTIVE, pb.AD_STATUS_PAUSED: Status.PAUSED}
_STATUS_VALUES = {status: value for value, status in _STATUSES.items()}

Result = TypeVar("Result")


class AdminService(admin_service_pb2_grpc.AdminServiceServicer):
    name = "admin"

    def __init__(self, reader: RedisReader):
        self.reader = reader
        self.metrics = reader.metrics
        self.log = service_logger(self.name)
        self.store = adstate.AdStateStore(reader.client)
        self.hierarchy: AdHierarchy | None = None
        self.version: str | None = None

    @property
    def spec(self) -> ServiceSpec:
        return ServiceSpec.of(
            pb.DESCRIPTOR.services_by_name["AdminService"],
            self,
            admin_service_pb2_grpc.add_AdminServiceServicer_to_server,
        )

    @property
    def answers_without_redis(self) -> bool:
        return False

    @property
    def ready(self) -> bool:
        # States can be read and listed before the first publish.
        return True

    async def load_version(self, version: str, meta: VersionMeta | None) -> None:
        raw = await self.reader.get(
            keys.ADS.key(version), op=RedisOp.LOAD_ADS, timeout=LOAD_TIMEOUT_SECONDS
        )
        try:
            if raw is None:
                raise CodecError("the version has no ad table")
            table = await asyncio.to_thread(keys.ADS.decode, raw)
            hierarchy = await asyncio.to_thread(AdHierarchy.from_table, table)
        except CodecError as error:
            self.log.error(
                "refused data version %s; ids are still checked against %s",
                version,
                self.version or "nothing",
                extra={"version": version, "error": str(error)},
            )
            return
        self.hierarchy, self.version = hierarchy, version
        self.metrics.set_data_version(version, meta.created_at_unix if meta else None)
        self.log.info("checking ids against data version %s", version, extra={"version": version})

    async def _redis(self, op: RedisOp, what: str, work: Awaitable[Result]) -> Result:
        """`work` bounded by the Redis timeout, its latency and errors recorded under `op`."""
        latency = self.metrics.redis_latency(op)
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.reader.timeout):
                return await work
        except TimeoutError:
            self.metrics.redis_error(op)
            raise redis_unavailable(what, RedisTimeoutError()) from None
        except RedisError as error:
            self.metrics.redis_error(op)
            raise redis_unavailable(what, error) from None
        except CodecError as error:
            self.log.error("stored ad states cannot be read", extra={"error": str(error)})
            raise UnavailableError(f"cannot read {what}: the stored value is malformed") from None
        finally:
            latency.observe(time.perf_counter() - start)

    @grpc_errors
    async def SetAdState(
        self,
        request: pb.SetAdStateRequest,
        context: grpc.aio.ServicerContext[pb.SetAdStateRequest, pb.SetAdStateResponse],
    ) -> pb.SetAdStateResponse:
        checks = FieldChecks()
        target = _target(checks, "target", request.target)
        hierarchy = self.hierarchy
        if (
            target is not None
            and not checks.violations
            and hierarchy is not None
            and not hierarchy.knows(*target)
        ):
            checks.add(
                "target.id",
                f"{target[1]} is not a {target[0].value} of the active data version {self.version}",
            )
        status = _STATUSES.get(request.status)
        if status is None:
            checks.add("status", "must be AD_STATUS_ACTIVE or AD_STATUS_PAUSED")
        if (problem := adstate.check_reason(request.reason)) is not None:
            checks.add("reason", problem)
        start, end = request.start_time or None, request.end_time or None
        for field, problem in adstate.check_window(start, end, time.time()):
            checks.add(field, problem)
        checks.raise_if_any()
        if hierarchy is None:
            raise no_version_loaded(
                self.reader.last_failure,
                "no data version loaded yet: there is no ad table to check ids against; "
                "retry once one is published",
            )
        assert target is not None and status is not None
        try:
            change = await self._redis(
                RedisOp.AD_STATE_WRITE,
                "the ad states",
                self.store.apply(*target, status, request.reason, start, end),
            )
        except adstate.ConflictError as error:
            await context.abort(grpc.StatusCode.ABORTED, str(error))
        self.log.info(
            "ad state changed",
            extra={
                "change_id": change.change_id,
                "level": target[0].value,
                "id": target[1],
                "status": status.value,
                "start_time": start,
                "end_time": end,
                "reason": request.reason,
            },
        )
        return pb.SetAdStateResponse(change=_change(change, time.time()))

    @grpc_errors
    async def GetAdState(
        self,
        request: pb.GetAdStateRequest,
        context: grpc.aio.ServicerContext[pb.GetAdStateRequest, pb.GetAdStateResponse],
    ) -> pb.GetAdStateResponse:
        checks = FieldChecks()
        target = _target(checks, "target", request.target)
        checks.raise_if_any()
        assert target is not None
        states: AdStates = await self._redis(
            RedisOp.AD_STATE_READ, "the ad states", self.store.read()
        )
        parents = self.hierarchy.parents(*target) if self.hierarchy is not None else []
        now = time.time()
        found = [
            state
            for state in (states.get(level, id) for level, id in (target, *parents))
            if state is not None
        ]
        levels = dict(parents)
        return pb.GetAdStateResponse(
            states=[_state(state, now) for state in found],
            paused=any(state.paused_at(now) for state in found),
            campaign_id=levels.get(Level.CAMPAIGN, 0),
            customer_id=levels.get(Level.CUSTOMER, 0),
        )

    @grpc_errors
    async def ListAdStates(
        self,
        request: pb.ListAdStatesRequest,
        context: grpc.aio.ServicerContext[pb.ListAdStatesRequest, pb.ListAdStatesResponse],
    ) -> pb.ListAdStatesResponse:
        states: AdStates = await self._redis(
            RedisOp.AD_STATE_READ, "the ad states", self.store.read()
        )
        now = time.time()
        ordered = sorted(
            states.states.values(), key=lambda s: (adstate.LEVELS.index(s.level), s.id)
        )
        return pb.ListAdStatesResponse(
            states=[_state(state, now) for state in ordered], last_change_id=states.seq
        )

    @grpc_errors
    async def ListAdStateChanges(
        self,
        request: pb.ListAdStateChangesRequest,
        context: grpc.aio.ServicerContext[
            pb.ListAdStateChangesRequest, pb.ListAdStateChangesResponse
        ],
    ) -> pb.ListAdStateChangesResponse:
        checks = FieldChecks()
        wanted = request.target
        target = None
        if wanted.level or wanted.id:
            target = _target(checks, "target", wanted)
        limit = checks.in_range("limit", request.limit or DEFAULT_CHANGES, 1, MAX_CHANGES)
        checks.raise_if_any()
        changes: list[Change] = await self._redis(
            RedisOp.AD_STATE_HISTORY, "the change log", self.store.history(limit, target)
        )
        now = time.time()
        return pb.ListAdStateChangesResponse(changes=[_change(change, now) for change in changes])


def _target(checks: FieldChecks, field: str, ref: pb.AdRef) -> tuple[Level, int] | None:
    level = _LEVELS.get(ref.level)
    if level is None:
        checks.add(f"{field}.level", "must be AD_LEVEL_ADGROUP, _CAMPAIGN or _CUSTOMER")
    checks.positive_id(f"{field}.id", ref.id)
    return (level, ref.id) if level is not None else None


def _state(state: AdState, now: float) -> pb.AdState:
    return pb.AdState(
        target=pb.AdRef(level=_LEVEL_VALUES[state.level], id=state.id),
        status=_STATUS_VALUES[state.status],
        start_time=state.start or 0,
        end_time=state.end or 0,
        reason=state.reason,
        changed_at_ms=state.changed_at_ms,
        change_id=state.change_id,
        paused_now=state.paused_at(now),
    )


def _change(change: Change, now: float) -> pb.AdStateChange:
    previous = change.previous_status
    return pb.AdStateChange(
        change_id=change.change_id,
        state=_state(change.state, now),
        previous_status=_STATUS_VALUES[previous] if previous else pb.AD_STATUS_UNSPECIFIED,
    )
