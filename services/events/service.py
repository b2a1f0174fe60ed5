"""EventService: checks reported events and appends each accepted batch to the event log.

Every event of a batch is converted to :class:`adrec.core.events.Event` and checked with
:func:`adrec.core.events.check_event`; impressions and clicks must also name an ad of the
active data version. A batch with any problem is refused whole, naming each problem by
the event's index and field; an accepted batch is appended in one transaction
(:class:`services.events.log.EventLog`), so it is logged whole or not at all, and is
acknowledged only once Redis has confirmed it.

The service follows the active data version as the others do, but holds only the sorted
ids of the version's ad table. Behaviour events need no version and are accepted before
the first publish; impressions and clicks are refused UNAVAILABLE until there is an ad
table to check them against, as a typo in an ad id would otherwise count for an ad that
does not exist. Readiness follows Redis alone: nothing can be logged without it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Sequence

import grpc
import numpy as np
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from adrec.api.events.v1 import event_service_pb2, event_service_pb2_grpc
from adrec.api.gateway.v1 import gateway_service_pb2 as gateway_pb2
from adrec.core import keys
from adrec.core.codecs import CodecError
from adrec.core.events import MAX_ID, Event, Kind, TimeBounds, check_event, encode_event
from adrec.core.metadata import VersionMeta
from services.events.log import EventLog
from services.runtime.data import LOAD_TIMEOUT_SECONDS, RedisOp, RedisReader
from services.runtime.logs import LogThrottle, service_logger
from services.runtime.requests import (
    FieldViolation,
    InvalidArgumentError,
    UnavailableError,
    grpc_errors,
    no_version_loaded,
)
from services.runtime.server import ServiceSpec

ReportEventsResponse = event_service_pb2.ReportEventsResponse

#: Problems one refusal names; a batch of bad events would otherwise make an error message
#: as large as the batch.
MAX_REPORTED_PROBLEMS = 20

#: Why a batch was refused: the `reason` label of adrec_event_batches_rejected_total.
REJECTION_REASONS = ("too_large", "invalid_event", "no_ad_table", "redis_unavailable")

_BEHAVIOUR_KINDS = {
    event_service_pb2.BEHAVIOR_TYPE_PAGE_VIEW: Kind.PAGE_VIEW,
    event_service_pb2.BEHAVIOR_TYPE_CART: Kind.CART,
    event_service_pb2.BEHAVIOR_TYPE_FAVORITE: Kind.FAVOURITE,
    event_service_pb2.BEHAVIOR_TYPE_BUY: Kind.BUY,
}
_BEHAVIOUR_TYPES = "must be one of " + ", ".join(
    event_service_pb2.BehaviorType.Name(value) for value in _BEHAVIOUR_KINDS
)
#: Fields of every event, whatever its payload: reported at the event's own level.
_COMMON_FIELDS = frozenset({"event_id", "user_id", "time"})


@dataclasses.dataclass(frozen=True)
class Limits:
    max_batch_size: int
    time_bounds: TimeBounds


@dataclasses.dataclass(frozen=True)
class KnownAds:
    """The ad ids of one data version's ad table, sorted, for membership tests."""

    version: str
    ids: np.ndarray

    @classmethod
    def decode(cls, version: str, raw: bytes) -> KnownAds:
        table = keys.ADS.decode(raw)
        if "adgroup_id" not in table:
            raise CodecError("the ad table has no adgroup_id column")
        return cls(version, np.unique(table["adgroup_id"].astype(np.int64)))

    def unknown(self, ad_ids: np.ndarray) -> np.ndarray:
        """Which of `ad_ids` are not in the table, as a boolean mask."""
        if not len(self.ids):
            return np.ones(len(ad_ids), dtype=bool)
        position = np.searchsorted(self.ids, ad_ids).clip(0, len(self.ids) - 1)
        unknown: np.ndarray = self.ids[position] != ad_ids
        return unknown


@dataclasses.dataclass
class _Problems:
    """The problems of one batch: the first few as violations, and how many in all."""

    violations: list[FieldViolation] = dataclasses.field(default_factory=list)
    total: int = 0

    def add(self, index: int, field: str, problem: str) -> None:
        self.total += 1
        if len(self.violations) < MAX_REPORTED_PROBLEMS:
            self.violations.append(FieldViolation(f"events[{index}].{field}", problem))

    def raise_if_any(self) -> None:
        if not self.total:
            return
        violations = list(self.violations)
        if self.total > len(violations):
            violations.append(
                FieldViolation(
                    "events",
                    f"{self.total} problems in all; the first {len(violations)} are listed",
                )
            )
        raise InvalidArgumentError(violations)


class EventService(event_service_pb2_grpc.EventServiceServicer):
    name = "events"

    def __init__(self, reader: RedisReader, log: EventLog, limits: Limits):
        self.reader = reader
        self.event_log = log
        self.limits = limits
        self.metrics = reader.metrics
        self.log = service_logger(self.name)
        self.known_ads: KnownAds | None = None
        family = self.metrics.metrics
        service = self.metrics.service
        self._accepted = {kind: family.events_accepted.labels(service, kind.value) for kind in Kind}
        self._rejected = {
            reason: family.event_batches_rejected.labels(service, reason)
            for reason in REJECTION_REASONS
        }
        self._batch_size = family.event_batch_size.labels(service)
        self._log_length = family.event_log_length.labels(service)
        self._failures = LogThrottle()

    @property
    def spec(self) -> ServiceSpec:
        return ServiceSpec.of(
            event_service_pb2.DESCRIPTOR.services_by_name["EventService"],
            self,
            event_service_pb2_grpc.add_EventServiceServicer_to_server,
        )

    @property
    def answers_without_redis(self) -> bool:
        # Every accepted batch is a Redis write.
        return False

    @property
    def ready(self) -> bool:
        # Behaviour events need no data version.
        return True

    async def load_version(self, version: str, meta: VersionMeta | None) -> None:
        raw = await self.reader.get(
            keys.ADS.key(version), op=RedisOp.LOAD_ADS, timeout=LOAD_TIMEOUT_SECONDS
        )
        kept = self.known_ads.version if self.known_ads else None
        try:
            if raw is None:
                raise CodecError("the version has no ad table")
            # Decoding a large ad table takes a while: keep taking events meanwhile.
            known = await asyncio.to_thread(KnownAds.decode, version, raw)
        except CodecError as error:
            self.log.error(
                "refused data version %s; %s",
                version,
                f"still checking ads against {kept}" if kept else "no ad table to check against",
                extra={"version": version, "error": str(error), "serving_version": kept},
            )
            return
        self.known_ads = known
        self.metrics.set_data_version(version, meta.created_at_unix if meta else None)
        self.log.info(
            "checking ads against data version %s",
            version,
            extra={"version": version, "ads": len(known.ids)},
        )

    @grpc_errors
    async def ReportEvents(
        self,
        request: event_service_pb2.ReportEventsRequest,
        context: grpc.aio.ServicerContext[
            event_service_pb2.ReportEventsRequest, ReportEventsResponse
        ],
    ) -> ReportEventsResponse:
        count = len(request.events)
        self._batch_size.observe(count)
        limit = self.limits.max_batch_size
        if count > limit:
            self._rejected["too_large"].inc()
            raise InvalidArgumentError(
                [FieldViolation("events", f"holds {count} events; at most {limit} per batch")]
            )
        if not count:
            return ReportEventsResponse(accepted=0)

        events, problems, ad_events = self._converted(request.events, int(time.time()))
        if ad_events:
            self._check_ads(events, ad_events, problems)
        if problems.total:
            self._rejected["invalid_event"].inc()
            problems.raise_if_any()

        try:
            appended = await self.event_log.append([encode_event(event) for event in events])
        except RedisError as error:
            self._rejected["redis_unavailable"].inc()
            held = self._failures.allow("append")
            if held is not None:
                self.log.warning(
                    "cannot log events", extra={"error": str(error), "held_back": held}
                )
            raise _log_unavailable(error) from None
        for kind, accepted in collections.Counter(event.kind for event in events).items():
            self._accepted[kind].inc(accepted)
        self._log_length.set(appended.length)
        return ReportEventsResponse(accepted=count, log_position=appended.last_id)

    def _converted(
        self, messages: Sequence[event_service_pb2.Event], now: int
    ) -> tuple[list[Event], _Problems, list[int]]:
        """The batch's events, their problems, and the indexes of those naming an ad."""
        bounds = self.limits.time_bounds
        events: list[Event] = []
        problems = _Problems()
        ad_events: list[int] = []
        for index, message in enumerate(messages):
            payload = message.WhichOneof("payload")
            if payload == "behavior":
                behavior = message.behavior
                kind = _BEHAVIOUR_KINDS.get(behavior.type)
                if kind is None:
                    problems.add(index, "behavior.type", f"{_BEHAVIOUR_TYPES}, got {behavior.type}")
                event = Event(
                    kind or Kind.PAGE_VIEW,
                    message.event_id,
                    message.user_id,
                    message.time,
                    cate_id=behavior.cate_id,
                    brand_id=behavior.brand_id,
                )
            elif payload is not None:
                shown = message.impression if payload == "impression" else message.click
                event = Event(
                    Kind.IMPRESSION if payload == "impression" else Kind.CLICK,
                    message.event_id,
                    message.user_id,
                    message.time,
                    ad_id=shown.ad_id,
                    pid=shown.pid,
                    request_id=shown.request_id,
                    serving_path=_serving_path(shown.serving_path),
                    model_version=shown.model_version,
                )
                ad_events.append(index)
            else:
                problems.add(index, "payload", "one of impression, click or behavior is required")
                event = Event(Kind.PAGE_VIEW, message.event_id, message.user_id, message.time)
            for field, problem in check_event(event, now, bounds):
                if field in _COMMON_FIELDS:
                    problems.add(index, field, problem)
                elif payload is not None:
                    problems.add(index, f"{payload}.{field}", problem)
            events.append(event)
        return events, problems, ad_events

    def _check_ads(self, events: list[Event], ad_events: list[int], problems: _Problems) -> None:
        """Add a problem for each impression or click of an ad the active version lacks."""
        known = self.known_ads
        if known is None:
            # A bad batch is the caller's to fix first, whether or not there is a table.
            if problems.total:
                return
            self._rejected["no_ad_table"].inc()
            raise no_version_loaded(
                self.reader.last_failure,
                "no data version loaded yet: impressions and clicks cannot be checked against "
                "an ad table (behaviour events are accepted); retry once one is published",
            )
        # An id out of range already has its problem.
        ad_events = [index for index in ad_events if 0 < events[index].ad_id <= MAX_ID]
        ad_ids = np.fromiter((events[index].ad_id for index in ad_events), np.int64, len(ad_events))
        for position in np.flatnonzero(known.unknown(ad_ids)):
            index = ad_events[position]
            payload = "impression" if events[index].kind is Kind.IMPRESSION else "click"
            problems.add(
                index,
                f"{payload}.ad_id",
                f"{events[index].ad_id} is not an ad of the active data version {known.version}",
            )


def _log_unavailable(error: RedisError) -> UnavailableError:
    """A failed append, in the caller's terms: the error's class, never its text, which can
    carry the server's address."""
    if isinstance(error, RedisTimeoutError):
        problem = "Redis did not answer in time"
    elif isinstance(error, RedisConnectionError):
        problem = "Redis is unreachable"
    else:
        problem = "Redis refused the write"
    return UnavailableError(
        f"cannot log events: {problem} ({type(error).__name__}); the batch is not "
        "acknowledged, retry it (a resent event is counted once)"
    )


def _serving_path(value: int) -> str:
    """The event's serving path by name (events.SERVING_PATHS); "" when unspecified, and
    the number itself for a value this release does not know, which the checks refuse."""
    if value == gateway_pb2.SERVING_PATH_UNSPECIFIED:
        return ""
    try:
        return gateway_pb2.ServingPath.Name(value).removeprefix("SERVING_PATH_").lower()
    except ValueError:
        return str(value)
