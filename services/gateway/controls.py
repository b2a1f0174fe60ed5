"""The gateway's ad-serving controls: pauses, frequency caps, exclusions and diversity limits.

:class:`AdControls` holds, per process, the loaded version's ad table (ids and their
campaign, customer, category and brand) and a copy of the ad states
(:mod:`adrec.core.adstate`) turned into one "paused" flag per ad of the table. Each request
reads the change counter (``keys.AD_STATE_SEQ``), with the user's real-time state and
served counts when a frequency cap is in force, concurrently with its first downstream
call; a counter ahead of the copy reloads the states before anything is filtered, so a
change is in force for every request that starts after the admin call returned. While
Redis does not answer, requests go on with the last copy and without counts.

A :class:`Selection` builds one answer from the paths in turn, every candidate checked:
excluded by the request, unknown to the ad table (its hierarchy, so its state, cannot be
told), paused, or capped; then the diversity limits per category, brand and customer.
Candidates for ranking are checked before ranking (but for unknown ads, which ranking
itself skips and counts), so only servable ads are scored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
from prometheus_client import Counter
from redis.exceptions import RedisError

from adrec.api.common.v1 import common_pb2
from adrec.api.gateway.v1 import gateway_service_pb2 as gateway_pb2
from adrec.core import adstate, keys
from adrec.core.adstate import AdStates, Cap, Level
from adrec.core.codecs import CodecError
from adrec.core.events import MAX_ID, Scope
from adrec.core.scoring import AdIndex, ScoringDataError, present
from services.runtime.data import LOAD_TIMEOUT_SECONDS, RedisOp, RedisReader
from services.runtime.logs import LogThrottle, ServiceLogger
from services.runtime.metrics import SERVICE_LABEL, enum_labels
from services.runtime.requests import FieldChecks

#: Most ids one request may exclude.
MAX_EXCLUDED_ADS = 500
#: Most frequency caps one request may carry (3 scopes x a few windows).
MAX_REQUEST_CAPS = 12
#: Under diversity limits ranking returns this many times `count` ads, for the limits to
#: pass over; an answer they still leave short is filled in by the next path.
DIVERSITY_HEADROOM = 4
#: How long an answer's served ads wait to be written with those of the answers after it.
SERVED_WRITE_DELAY_SECONDS = 0.005
#: Bound on one write of served ads; it runs beside the answers, never in their way.
SERVED_WRITE_TIMEOUT_SECONDS = 1.0
#: Most users whose served ads may wait at once, bounding the memory they take while Redis
#: does not answer.
MAX_WAITING_SERVED_USERS = 100_000
#: Filter reason -> its label in adrec_filtered_candidates_total ("paused", ...).
FILTER_REASON_NAMES = enum_labels(gateway_pb2.FilterReason)
EXCLUDED = gateway_pb2.FILTER_REASON_EXCLUDED
UNKNOWN_AD = gateway_pb2.FILTER_REASON_UNKNOWN_AD
PAUSED = gateway_pb2.FILTER_REASON_PAUSED
CAPPED = gateway_pb2.FILTER_REASON_CAPPED
DIVERSITY = gateway_pb2.FILTER_REASON_DIVERSITY
_CAP_SCOPES = {
    gateway_pb2.CAP_SCOPE_AD: Scope.AD,
    gateway_pb2.CAP_SCOPE_CAMPAIGN: Scope.CAMPAIGN,
    gateway_pb2.CAP_SCOPE_CUSTOMER: Scope.CUSTOMER,
}
ScoredAd = common_pb2.ScoredAd


class AdScores(Protocol):
    """The scores of offered candidates, by their position among them."""

    def ad(self, index: int, ad_id: int) -> ScoredAd: ...


@dataclasses.dataclass(frozen=True)
class ScoreLists:
    """Scores as lists row-aligned with the offered ids; a None bid or eCPM: the ad has none,
    and None lists: the version has no bids."""

    ctrs: list[float]
    pctrs: list[float]
    bids: list[float | None] | None = None
    ecpms: list[float | None] | None = None

    @classmethod
    def of(
        cls,
        ctrs: np.ndarray,
        pctrs: np.ndarray,
        bids: np.ndarray | None,
        ecpms: np.ndarray | None,
    ) -> ScoreLists:
        """From arrays whose NaN bids and eCPMs mean none."""
        return cls(ctrs.tolist(), pctrs.tolist(), present(bids), present(ecpms))

    def ad(self, index: int, ad_id: int) -> ScoredAd:
        if self.bids is None or self.ecpms is None:
            return ScoredAd(ad_id=ad_id, ctr=self.ctrs[index], pctr=self.pctrs[index])
        return ScoredAd(
            ad_id=ad_id,
            ctr=self.ctrs[index],
            pctr=self.pctrs[index],
            bid=self.bids[index],
            ecpm=self.ecpms[index],
        )


@dataclasses.dataclass(frozen=True)
class RankedAds:
    """Ranking's answer, its messages kept as they are."""

    ads: Sequence[ScoredAd]

    def ad(self, index: int, ad_id: int) -> ScoredAd:
        return self.ads[index]


@dataclasses.dataclass(frozen=True)
class ControlSettings:
    """The server's side of the controls (ADREC_GATEWAY_* settings)."""

    caps: tuple[Cap, ...] = ()
    #: How long what the gateway returned counts towards the caps; 0: not recorded.
    served_seconds: int = 0
    max_per_category: int = 0
    max_per_brand: int = 0
    max_per_customer: int = 0


@dataclasses.dataclass(frozen=True, eq=False)
class MemberRows:
    """The catalog rows of each campaign (or customer): the rows sorted by member, and
    where each distinct member's run of them starts."""

    members: np.ndarray
    starts: np.ndarray
    rows: np.ndarray

    @classmethod
    def of(cls, column: np.ndarray) -> MemberRows:
        rows = np.argsort(column, kind="stable").astype(np.int32)
        ordered = column[rows]
        first = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
        if not len(column):
            first = first[:0]
        return cls(ordered[first], np.append(first, len(column)), rows)

    def rows_of(self, members: np.ndarray) -> np.ndarray:
        """The rows of every ad of `members` (those the catalog has)."""
        if not len(members) or not len(self.members):
            return np.zeros(0, np.int32)
        at = np.minimum(self.members.searchsorted(members), len(self.members) - 1)
        at = at[self.members[at] == members]
        begin, end = self.starts[at], self.starts[at + 1]
        lengths = end - begin
        # Each run's positions, laid end to end: begin + 0, 1, ... per run.
        offsets = np.repeat(begin - (np.cumsum(lengths) - lengths), lengths)
        rows: np.ndarray = self.rows[offsets + np.arange(int(lengths.sum()))]
        return rows


@dataclasses.dataclass(frozen=True, eq=False)
class AdCatalog:
    """One version's ad table as the controls need it, sorted by ad id."""

    version: str
    ids: np.ndarray
    campaign: np.ndarray
    customer: np.ndarray
    cate: np.ndarray
    brand: np.ndarray
    #: Ad id -> row, the index ranking uses for the same table.
    index: AdIndex
    campaign_rows: MemberRows
    customer_rows: MemberRows

    @classmethod
    def of(
        cls,
        version: str,
        ids: np.ndarray,
        campaign: np.ndarray,
        customer: np.ndarray,
        cate: np.ndarray,
        brand: np.ndarray,
        index: AdIndex | None = None,
    ) -> AdCatalog:
        """The catalog of ascending `ids` and their columns."""
        return cls(
            version,
            ids,
            campaign,
            customer,
            cate,
            brand,
            AdIndex.of(ids) if index is None else index,
            MemberRows.of(campaign),
            MemberRows.of(customer),
        )

    @classmethod
    def decode(cls, version: str, raw: bytes) -> AdCatalog:
        table = keys.ADS.decode(raw)
        columns = ("adgroup_id", "campaign_id", "customer_id", "cate_id", "brand_id")
        missing = [name for name in columns if name not in table]
        if missing:
            raise CodecError(f"the ad table lacks {', '.join(missing)}")
        order = np.argsort(table["adgroup_id"], kind="stable")
        ids, campaign, customer, cate, brand = (
            np.ascontiguousarray(table[name][order], dtype=np.int64) for name in columns
        )
        try:
            return cls.of(version, ids, campaign, customer, cate, brand)
        except ScoringDataError as error:
            raise CodecError(f"the ad table: {error}") from None

    @classmethod
    def empty(cls) -> AdCatalog:
        none = np.zeros(0, np.int64)
        return cls.of("", none, none, none, none, none)

    def lookup(self, ad_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each id's row (-1 for none) and whether the table has it."""
        rows = self.index.rows(ad_ids)
        return rows, rows >= 0

    def members_of(self, ad_ids: np.ndarray) -> dict[Scope, np.ndarray]:
        """Per cap scope, the member of each of `ad_ids` (the ads of the table alone for
        campaigns and customers)."""
        if not len(ad_ids):
            return {}
        rows = self.index.rows(ad_ids)
        rows = rows[rows >= 0]
        return {
            Scope.AD: ad_ids,
            Scope.CAMPAIGN: self.campaign[rows],
            Scope.CUSTOMER: self.customer[rows],
        }

    def members(self, level: Level) -> np.ndarray:
        if level is Level.ADGROUP:
            return self.ids
        column: np.ndarray = self.campaign if level is Level.CAMPAIGN else self.customer
        return column

    def rows_blocked(self, scope: Scope, members: np.ndarray) -> np.ndarray:
        """The rows of the ads a cap on `members` of `scope` holds back."""
        if scope is Scope.AD:
            rows = self.index.rows(members)
            return rows[rows >= 0]
        return (self.campaign_rows if scope is Scope.CAMPAIGN else self.customer_rows).rows_of(
            members
        )


def _member_of(values: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Whether each of `values` is one of the sorted `members` (np.isin, without its
    per-call overhead on the few members a request has)."""
    if not len(members):
        return np.zeros(len(values), bool)
    # np.minimum, not clip: clip costs more than the search on a few hundred values.
    found = members[np.minimum(members.searchsorted(values), len(members) - 1)]
    hit: np.ndarray = found == values
    return hit


#: The filter reasons a row can carry before the diversity limits, by precedence: a
#: candidate shows the highest that applies.
_PRECEDENCE = (CAPPED, PAUSED, UNKNOWN_AD, EXCLUDED)
#: Precedence (0: none) -> filter reason.
_REASON_OF_RANK = np.array((0, *_PRECEDENCE), np.int64)
_RANK = {reason: rank for rank, reason in enumerate(_PRECEDENCE, start=1)}


@dataclasses.dataclass(frozen=True, eq=False)
class PausedAds:
    """Which ads of a catalog a set of ad states pauses, until ``valid_until``."""

    catalog: AdCatalog
    seq: int
    #: One flag per row of the catalog.
    paused: np.ndarray
    #: When a start or end time of a state passes (Unix seconds); None: never.
    valid_until: float | None
    #: Whether any ad is paused.
    any: bool = False
    #: Per row the precedence of its filter reason (paused or none), then one more entry
    #: for an unknown ad (row -1). A request marks its excluded and capped rows here while
    #: it reads its candidates' reasons, and puts the entries back before returning, so one
    #: gather finds every reason; requests run one at a time on the event loop.
    marks: np.ndarray = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        marks = np.where(self.paused, _RANK[PAUSED], 0).astype(np.int8)
        object.__setattr__(self, "marks", np.append(marks, np.int8(_RANK[UNKNOWN_AD])))

    @classmethod
    def of(cls, catalog: AdCatalog, states: AdStates, now: float) -> PausedAds:
        paused = np.zeros(len(catalog.ids), bool)
        for level, ids in states.paused_ids(now).items():
            if len(ids):
                column = catalog.members(level)
                rows = np.searchsorted(ids, column).clip(0, len(ids) - 1)
                paused |= ids[rows] == column
        return cls(catalog, states.seq, paused, states.next_boundary(now), bool(paused.any()))

    def current(self, now: float) -> bool:
        return self.valid_until is None or now < self.valid_until


@dataclasses.dataclass(frozen=True)
class _Blocked:
    """A request's capped rows (with the precedence each then carries: paused stays
    paused), its excluded rows, and the entries all of them held before; excluded ids
    unknown to the catalog apart, as they have no row."""

    capped_rows: np.ndarray
    capped_ranks: np.ndarray
    excluded_rows: np.ndarray
    rows: np.ndarray
    held: np.ndarray
    unknown_excluded: np.ndarray

    @classmethod
    def of(
        cls, paused: PausedAds, excluded: np.ndarray, capped: dict[Scope, np.ndarray]
    ) -> _Blocked | None:
        if not len(excluded) and not capped:
            return None
        catalog = paused.catalog
        found = catalog.index.rows(excluded)
        excluded_rows = found[found >= 0]
        capped_rows = [catalog.rows_blocked(scope, members) for scope, members in capped.items()]
        # A row may repeat: every write to it is the same.
        rows = np.concatenate((*capped_rows, excluded_rows))
        held = paused.marks[rows]
        capped_count = len(rows) - len(excluded_rows)
        return cls(
            rows[:capped_count],
            np.maximum(held[:capped_count], np.int8(_RANK[CAPPED])),
            excluded_rows,
            rows,
            held,
            np.sort(excluded[found < 0]),
        )

    def mark(self, marks: np.ndarray) -> None:
        marks[self.capped_rows] = self.capped_ranks
        marks[self.excluded_rows] = _RANK[EXCLUDED]

    def unmark(self, marks: np.ndarray) -> None:
        marks[self.rows] = self.held


@dataclasses.dataclass(frozen=True)
class Limits:
    """A request's diversity limits, each 0 for none."""

    category: int = 0
    brand: int = 0
    customer: int = 0

    @property
    def any(self) -> bool:
        return bool(self.category or self.brand or self.customer)


@dataclasses.dataclass(frozen=True)
class RequestControls:
    """What one request asked of the controls, checked."""

    excluded: np.ndarray
    caps: tuple[Cap, ...]
    limits: Limits


def request_controls(
    checks: FieldChecks, request: gateway_pb2.RecommendRequest, settings: ControlSettings
) -> RequestControls:
    """The request's exclusions, caps (tightened by the server's) and limits; every bad
    field noted in `checks`."""
    excluded = request.exclude_ad_ids
    ids = np.asarray(excluded, dtype=np.int64)
    if len(ids) > MAX_EXCLUDED_ADS:
        checks.add(
            "exclude_ad_ids", f"holds {len(ids)} ids; at most {MAX_EXCLUDED_ADS} per request"
        )
    # Each bad id named; the common case, all good, checked at once.
    elif len(ids) and (ids.min() <= 0 or ids.max() > MAX_ID):
        for index, ad_id in enumerate(excluded):
            checks.positive_id(f"exclude_ad_ids[{index}]", ad_id)
    caps: list[Cap] = []
    if len(request.frequency_caps) > MAX_REQUEST_CAPS:
        checks.add(
            "frequency_caps",
            f"holds {len(request.frequency_caps)} caps; at most {MAX_REQUEST_CAPS}",
        )
    seen: dict[tuple[Scope, int], int] = {}
    for index, cap in enumerate(request.frequency_caps[:MAX_REQUEST_CAPS]):
        field = f"frequency_caps[{index}]"
        scope = _CAP_SCOPES.get(cap.scope)
        if scope is None:
            checks.add(f"{field}.scope", "must be CAP_SCOPE_AD, _CAMPAIGN or _CUSTOMER")
        if cap.max_impressions < 1:
            checks.add(
                f"{field}.max_impressions",
                f"must be at least 1, got {cap.max_impressions} "
                "(exclude_ad_ids leaves an ad out altogether)",
            )
        checks.in_range(f"{field}.window_hours", cap.window_hours, 1, adstate.MAX_CAP_WINDOW_HOURS)
        if scope is None:
            continue
        earlier = seen.setdefault((scope, cap.window_hours), index)
        if earlier != index:
            checks.add(
                field,
                f"contradicts frequency_caps[{earlier}]: a second limit for the same scope "
                f"and window ({cap.window_hours} h)",
            )
        caps.append(Cap(scope, cap.window_hours, cap.max_impressions))
    limits = []
    for name, default in (
        ("max_per_category", settings.max_per_category),
        ("max_per_brand", settings.max_per_brand),
        ("max_per_customer", settings.max_per_customer),
    ):
        value = getattr(request.diversity, name)
        if value < 0:
            checks.add(
                f"diversity.{name}", f"must be 0 (the server's default) or more, got {value}"
            )
        limits.append(value or default)
    return RequestControls(
        excluded=np.unique(ids),
        caps=adstate.tightest((*settings.caps, *caps)),
        limits=Limits(*limits),
    )


class ServedRecorder:
    """The ads a gateway served, written to Redis together a moment after each answer.

    One write per answer would cost each answer a Redis round trip; instead the answers of
    a few milliseconds share one (``SERVED_WRITE_DELAY_SECONDS``). Until their write has
    succeeded this process counts the waiting ads itself (:meth:`of`), so its next answer
    to the same user holds the caps at once; other replicas see them after the write.
    A failed write is logged and counted (adrec_redis_errors_total, op record_served) and
    its ads are not retried: the caps then rest on the reported impressions alone. A read
    answered while a write is in flight may find its ads in Redis and here both: counted
    twice for that instant, a cap errs on the side of holding early.
    """

    def __init__(
        self,
        reader: RedisReader,
        ads: adstate.ServedAds,
        warn: Callable[[str, Exception], None],
    ):
        self.reader = reader
        self.ads = ads
        self._warn = warn
        #: (user, slice) -> ad ids served and not yet written, then being written.
        self._waiting: dict[tuple[int, int], list[int]] = {}
        self._writing: dict[tuple[int, int], list[int]] = {}
        self._writer: asyncio.Task[None] | None = None
        self._closed = False

    def add(self, user_id: int, ad_ids: Sequence[int], now: float) -> None:
        key = (user_id, self.ads.slice_of(now))
        waiting = self._waiting.get(key)
        if waiting is None:
            if len(self._waiting) >= MAX_WAITING_SERVED_USERS:
                # Redis hangs or lags far behind: the caps rest on the impressions meanwhile.
                self.reader.metrics.redis_error(RedisOp.RECORD_SERVED)
                return
            waiting = self._waiting[key] = []
        waiting.extend(ad_ids)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_soon())

    def of(self, user_id: int, stored: Sequence[bytes | None], now: float) -> np.ndarray:
        """The ads served to `user_id` lately: those of the slices' `stored` values (raises
        CodecError on a damaged one) and those still waiting here."""
        ad_ids = self.ads.decode(stored)
        current = self.ads.slice_of(now)
        here = [
            ad_id
            for held in (self._waiting, self._writing)
            for slice_of in (current - 1, current)
            for ad_id in held.get((user_id, slice_of), ())
        ]
        if here:
            ad_ids = np.concatenate((ad_ids, np.asarray(here, dtype=np.int64)))
        return ad_ids

    async def _write_soon(self) -> None:
        try:
            await asyncio.sleep(SERVED_WRITE_DELAY_SECONDS)
            await self._write()
        finally:
            self._writer = None
            if self._waiting and not self._closed:
                self._writer = asyncio.get_running_loop().create_task(self._write_soon())

    async def _write(self) -> None:
        self._writing, self._waiting = self._waiting, {}
        commands = [
            command
            for (user_id, slice_of), ad_ids in self._writing.items()
            for command in self.ads.record_commands(user_id, slice_of, ad_ids)
        ]
        try:
            if commands:
                await self.reader.execute(
                    commands, RedisOp.RECORD_SERVED, SERVED_WRITE_TIMEOUT_SECONDS
                )
        except RedisError as error:
            self._warn("cannot record the ads served", error)
        finally:
            self._writing = {}

    async def flush(self) -> None:
        """Finish the write under way and write what waits."""
        writer = self._writer
        if writer is not None:
            await asyncio.gather(writer, return_exceptions=True)
        if self._waiting:
            await self._write()

    async def aclose(self) -> None:
        """Write what waits (a stopping gateway's last answers)."""
        self._closed = True
        await self.flush()


@dataclasses.dataclass
class UserCounts:
    """Per cap scope, the members whose caps the user has reached."""

    capped: dict[Scope, np.ndarray]


class AdControls:
    """The controls of one gateway process."""

    def __init__(
        self,
        reader: RedisReader,
        settings: ControlSettings,
        log: ServiceLogger,
        metrics_registry: Any,
    ):
        self.reader = reader
        self.settings = settings
        self.log = log
        self.catalog = AdCatalog.empty()
        self.states = AdStates.empty()
        self.paused = PausedAds.of(self.catalog, self.states, time.time())
        self._reload_lock = asyncio.Lock()
        self._failures = LogThrottle()
        self._served = (
            ServedRecorder(reader, adstate.ServedAds(settings.served_seconds), self._warn)
            if settings.served_seconds
            else None
        )
        filtered = Counter(
            "adrec_filtered_candidates_total",
            "Candidate ads the gateway's ad-serving controls removed from answers, by reason.",
            (SERVICE_LABEL, "reason"),
            registry=metrics_registry,
        )
        service = reader.metrics.service
        # At 0 from the start, as every reason is a closed set.
        self.filtered_counters = {
            reason: filtered.labels(service, name) for reason, name in FILTER_REASON_NAMES.items()
        }

    async def load_version(self, version: str) -> None:
        """Take the version's ad table; raises to be asked again (Redis failed)."""
        raw = await self.reader.get(
            keys.ADS.key(version), op=RedisOp.LOAD_ADS, timeout=LOAD_TIMEOUT_SECONDS
        )
        if raw is None:
            raise CodecError(f"data version {version} has no ad table")
        # Decoding a large table takes a while: keep answering meanwhile.
        catalog = await asyncio.to_thread(AdCatalog.decode, version, raw)
        async with self._reload_lock:
            self.catalog = catalog
            self.paused = PausedAds.of(catalog, self.states, time.time())

    async def prepare(self, user_id: int, controls: RequestControls, timeout: float) -> UserCounts:
        """Bring the ad states up to date and read what the caps count for `user_id`."""
        now = time.time()
        reads = [(keys.AD_STATE_SEQ, RedisOp.AD_STATE_SEQ)]
        if controls.caps:
            reads.append((keys.REALTIME_USER.key(user_id), RedisOp.REALTIME_STATE))
            if self._served is not None:
                reads += [
                    (key, RedisOp.SERVED_COUNTS) for key in self._served.ads.read_keys(user_id, now)
                ]
        try:
            replies = await self.reader.get_many(reads, timeout)
        except RedisError as error:
            self._warn("cannot read the ad states and counts; serving with the states held", error)
            replies = [None] * len(reads)
        counter = replies[0]
        if counter is not None and int(counter) > self.paused.seq:
            await self._reload(int(counter), timeout)
        elif not self.paused.current(now):
            async with self._reload_lock:
                if not self.paused.current(now):
                    self.paused = PausedAds.of(self.catalog, self.states, now)
        if not controls.caps:
            return UserCounts({})
        served: dict[Scope, np.ndarray] = {}
        if self._served is not None:
            try:
                ad_ids = self._served.of(user_id, replies[2:], now)
            except CodecError as error:
                self._warn("cannot decode the ads served; counting impressions alone", error)
            else:
                served = self.catalog.members_of(ad_ids)
        if not replies[1] and not served:
            return UserCounts({})
        return UserCounts(adstate.capped_members(controls.caps, replies[1], served, int(now)))

    async def _get(self, key: bytes, op: RedisOp, timeout: float) -> bytes | None:
        """One GET; None when Redis fails it, which is logged: the controls then go on with
        what they hold."""
        try:
            return await self.reader.get(key, op=op, timeout=timeout)
        except RedisError as error:
            self._warn(f"cannot read {op}; serving with the ad states held", error)
            return None

    async def _reload(self, counter: int, timeout: float) -> None:
        async with self._reload_lock:
            if self.paused.seq >= counter:
                return
            raw = await self._get(keys.AD_STATE, RedisOp.AD_STATE, timeout)
            if raw is None:
                return
            try:
                states = AdStates.decode(raw)
            except CodecError as error:
                self._warn("cannot decode the ad states; serving with the ones held", error)
                return
            self.states = states
            self.paused = PausedAds.of(self.catalog, states, time.time())
            self.log.info("ad states changed", extra={"change_id": states.seq})

    def record_served(self, user_id: int, ad_ids: Sequence[int], now: float) -> None:
        """Count the ads of an answer towards the user's caps: at once in this process,
        in Redis with the next write of served ads (:class:`ServedRecorder`)."""
        if self._served is not None and ad_ids:
            self._served.add(user_id, ad_ids, now)

    async def aclose(self) -> None:
        """Write the served ads still waiting."""
        if self._served is not None:
            await self._served.aclose()

    def _warn(self, message: str, error: Exception) -> None:
        held_back = self._failures.allow((message, type(error)))
        if held_back is not None:
            self.log.warning(
                message,
                extra={"error": type(error).__name__, "similar_failures_not_logged": held_back},
            )

    def selection(self, count: int, controls: RequestControls, counts: UserCounts) -> Selection:
        return Selection(self.paused, count, controls, counts)


class Selection:
    """One answer being built: the ads chosen so far and what was filtered, by reason."""

    def __init__(
        self, paused: PausedAds, count: int, controls: RequestControls, counts: UserCounts
    ):
        self.paused = paused
        self.catalog = paused.catalog
        self.count = count
        self.controls = controls
        self.capped = counts.capped
        self.ads: list[ScoredAd] = []
        self.chosen: set[int] = set()
        self.filtered: dict[int, int] = {}
        self._filtered_ids: set[int] = set()
        self._per_value: list[dict[int, int]] = [{}, {}, {}]
        self._blocked = _Blocked.of(paused, controls.excluded, self.capped)

    @property
    def full(self) -> bool:
        return len(self.ads) >= self.count

    @property
    def inert(self) -> bool:
        """Whether nothing but an ad unknown to the table could be filtered."""
        return (
            not self.paused.any
            and not len(self.controls.excluded)
            and not self.capped
            and not self.controls.limits.any
        )

    def _reasons(self, ad_ids: np.ndarray, checked: bool) -> tuple[np.ndarray, np.ndarray]:
        """Each candidate's filter reason (0: none) and row in the catalog (-1: none);
        unknown ads alone when the candidates were `checked` already (by
        :meth:`for_ranking`)."""
        rows = self.catalog.index.rows(ad_ids)
        if checked:
            return np.where(rows < 0, UNKNOWN_AD, 0), rows
        blocked = self._blocked
        if blocked is None:
            return _REASON_OF_RANK[self.paused.marks[rows]], rows
        marks = self.paused.marks
        blocked.mark(marks)
        try:
            ranks = marks[rows]
        finally:
            blocked.unmark(marks)
        reasons = _REASON_OF_RANK[ranks]
        if len(blocked.unknown_excluded):
            reasons[_member_of(ad_ids, blocked.unknown_excluded)] = EXCLUDED
        return reasons, rows

    def _note(self, ad_ids: list[int], reasons: list[int]) -> None:
        """Count each filtered ad once, under the first reason found for it."""
        fresh = set(ad_ids) - self._filtered_ids
        by_reason: dict[int, int] = {}
        if len(fresh) == len(ad_ids):
            for reason in reasons:
                by_reason[reason] = by_reason.get(reason, 0) + 1
        else:
            for ad_id, reason in zip(ad_ids, reasons, strict=True):
                if ad_id in fresh:
                    fresh.discard(ad_id)
                    by_reason[reason] = by_reason.get(reason, 0) + 1
                    self._filtered_ids.add(ad_id)
        self._filtered_ids.update(fresh)
        for reason, count in by_reason.items():
            self.filtered[reason] = self.filtered.get(reason, 0) + count

    def for_ranking(self, ad_ids: Sequence[int]) -> Any:
        """The candidates worth ranking: all but the excluded, paused and capped ones.

        Ads the gateway's table lacks are kept: ranking skips and counts them itself, and
        :meth:`offer` removes any it ranks (its version can be ahead of the gateway's).
        """
        if self.inert:
            return ad_ids
        ids = np.asarray(ad_ids, dtype=np.int64)
        reasons, _ = self._reasons(ids, checked=False)
        removed = (reasons != 0) & (reasons != UNKNOWN_AD)
        if not removed.any():
            return ad_ids
        self._note(ids[removed].tolist(), reasons[removed].tolist())
        return ids[~removed].tolist()

    def take_ranked(self, ads: Sequence[ScoredAd], version: str) -> bool:
        """Take ranking's answer as it is, when nothing could filter it: ranking of the
        catalog's own version returns only ads of its table. False when it must be offered."""
        if self.chosen or version != self.catalog.version or not self.inert:
            return False
        self.ads = list(ads[: self.count])
        self.chosen.update(ad.ad_id for ad in self.ads)
        return True

    def offer(self, ad_ids: Any, scores: AdScores | None = None, checked: bool = False) -> int:
        """Append the servable ads of `ad_ids`, in order, until the answer is full; each
        with its scores from `scores` when given. Returns how many were appended.

        `checked`: the ads are ranking's answer to :meth:`for_ranking`'s candidates, so
        only their table and the diversity limits remain to check.
        """
        if self.full or not len(ad_ids):
            return 0
        ids = np.asarray(ad_ids, dtype=np.int64)
        reasons, rows = self._reasons(ids, checked)
        limits = self.controls.limits
        chosen_before = len(self.ads)
        id_list = ids.tolist()
        reason_list = reasons.tolist()
        # Per limited dimension: each ad's value, the bound, the ads chosen per value.
        limited = [
            (column[rows].tolist(), bound, per_value)
            for column, bound, per_value in zip(
                (self.catalog.cate, self.catalog.brand, self.catalog.customer),
                (limits.category, limits.brand, limits.customer),
                self._per_value,
                strict=True,
            )
            if bound
        ]
        filtered_ids: list[int] = []
        filtered_reasons: list[int] = []
        for index, ad_id in enumerate(id_list):
            if ad_id in self.chosen:
                continue
            reason = reason_list[index]
            if not reason:
                for values, bound, per_value in limited:
                    value = values[index]
                    if value > 0 and per_value.get(value, 0) >= bound:
                        reason = DIVERSITY
                        break
            if reason:
                filtered_ids.append(ad_id)
                filtered_reasons.append(reason)
                continue
            for values, _, per_value in limited:
                value = values[index]
                per_value[value] = per_value.get(value, 0) + 1
            self.chosen.add(ad_id)
            self.ads.append(ScoredAd(ad_id=ad_id) if scores is None else scores.ad(index, ad_id))
            if len(self.ads) >= self.count:
                break
        if filtered_ids:
            self._note(filtered_ids, filtered_reasons)
        return len(self.ads) - chosen_before

    def filtered_counts(self) -> list[gateway_pb2.FilteredCount]:
        return [
            # The reasons are the enum's own values.
            gateway_pb2.FilteredCount(reason=reason, candidates=count)  # type: ignore[arg-type]
            for reason, count in sorted(self.filtered.items())
        ]
