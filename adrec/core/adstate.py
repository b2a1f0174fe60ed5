"""Ad-serving controls: the paused and scheduled ads, their change log, and frequency caps.

An operator sets a state on an adgroup, a campaign or a customer (the ad table's hierarchy):
active or paused, each optionally bounded by a start and an end time. An ad is served only
while its adgroup, its campaign and its customer are all unpaused at the moment of the
request, so pausing a campaign pauses all its adgroups and pausing a customer all its
campaigns.

The states live in Redis outside every data version (``keys.AD_STATE``), so a publish or a
rollback never undoes a pause. One JSON value holds them all with the id of the change that
produced it; :class:`AdStateStore` replaces it only if nobody changed it meanwhile (a
compare-and-set script on that one key), then appends the change to the change log
(``keys.AD_STATE_HISTORY``, a stream whose entry ids are the change ids) and finally
raises the change counter (``keys.AD_STATE_SEQ``). The gateways read the counter on every
request and reload the states when it moved, so a change is in force for every request
that starts after :meth:`AdStateStore.apply` returned. Each key is touched by its own
single-key command, so all of it runs on Redis Cluster. A change whose log entry or counter
write failed raises to its caller, and gateways do not apply it until the counter moves:
the retry, or any next change, first completes it (:meth:`AdStateStore.apply` settles the
stored state before changing it).

Frequency caps bound the impressions of one ad, campaign or customer per user and window.
Impressions come from the user's real-time state (the ``imp:<scope><id>:<hour>`` counts of
:mod:`adrec.core.realtime`), plus what the gateway itself returned lately
(``keys.served_key``): the stream job counts an impression seconds after it happened, and
a cap must hold meanwhile. An ad served and already counted by the stream counts twice
until its served entry ages out, so a cap errs on the side of holding early.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from redis.exceptions import ResponseError

from adrec.core import codecs, events, keys
from adrec.core.codecs import CodecError
from adrec.core.events import Scope

#: Format of the stored state value; a reader refuses any other.
STATE_FORMAT = 1
#: Longest reason kept with a change.
MAX_REASON_LENGTH = 200
#: Changes the log keeps (trimmed approximately on every append).
HISTORY_LENGTH = 100_000
#: The one field of each change log entry: the change as JSON.
HISTORY_FIELD = b"c"
#: Attempts of a change that other changes keep overtaking.
APPLY_ATTEMPTS = 8
#: The longest window a cap may count over: the real-time state keeps no older hours.
MAX_CAP_WINDOW_HOURS = events.KEPT_BUCKETS
#: Latest start or end time accepted (Unix seconds, in the year 2286): far beyond any
#: schedule, and a bound on what a typo can store.
MAX_TIME = 10_000_000_000
_REASON_RE = re.compile(r"[^\x00-\x1f\x7f]*")


class Level(enum.StrEnum):
    """A level of the ad table's hierarchy, named as its id column."""

    ADGROUP = "adgroup"
    CAMPAIGN = "campaign"
    CUSTOMER = "customer"

    @property
    def column(self) -> str:
        return f"{self.value}_id"


#: Levels from the narrowest up; an ad's state is decided by all three.
LEVELS = (Level.ADGROUP, Level.CAMPAIGN, Level.CUSTOMER)


class Status(enum.StrEnum):
    ACTIVE = "active"
    PAUSED = "paused"


@dataclasses.dataclass(frozen=True)
class AdState:
    """The state set on one adgroup, campaign or customer.

    ``start`` and ``end`` (Unix seconds, end exclusive; None when unbounded) bound when
    ``status`` holds: a paused state pauses only inside them, an active one serves only
    inside them and pauses outside.
    """

    level: Level
    id: int
    status: Status
    reason: str
    changed_at_ms: int
    change_id: int
    start: int | None = None
    end: int | None = None

    def inside(self, now: float) -> bool:
        return (self.start is None or self.start <= now) and (self.end is None or now < self.end)

    def paused_at(self, now: float) -> bool:
        inside = self.inside(now)
        return inside if self.status is Status.PAUSED else not inside

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level.value,
            "id": self.id,
            "status": self.status.value,
            "start": self.start,
            "end": self.end,
            "reason": self.reason,
            "changed_at_ms": self.changed_at_ms,
            "change_id": self.change_id,
        }

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> AdState:
        return cls(
            level=Level(value["level"]),
            id=int(value["id"]),
            status=Status(value["status"]),
            start=None if value.get("start") is None else int(value["start"]),
            end=None if value.get("end") is None else int(value["end"]),
            reason=str(value["reason"]),
            changed_at_ms=int(value["changed_at_ms"]),
            change_id=int(value["change_id"]),
        )


@dataclasses.dataclass(frozen=True)
class Change:
    """One recorded change: the state set, and the target's status before it."""

    state: AdState
    previous_status: Status | None

    @property
    def change_id(self) -> int:
        return self.state.change_id

    def to_json(self) -> bytes:
        previous = self.previous_status.value if self.previous_status else None
        return json.dumps({**self.state.to_dict(), "previous_status": previous}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Change:
        try:
            value = json.loads(raw)
            previous = value.get("previous_status")
            return cls(AdState.from_dict(value), Status(previous) if previous else None)
        except (ValueError, TypeError, KeyError) as error:
            raise CodecError(f"ad state change: {error!r}") from None


@dataclasses.dataclass(frozen=True)
class AdStates:
    """Every state set, as of change ``seq`` (0: none ever), and that change itself."""

    seq: int
    states: Mapping[tuple[Level, int], AdState]
    last: Change | None = None

    @classmethod
    def empty(cls) -> AdStates:
        return cls(0, {})

    def get(self, level: Level, id: int) -> AdState | None:
        return self.states.get((level, id))

    def with_state(
        self,
        level: Level,
        id: int,
        status: Status,
        reason: str,
        start: int | None,
        end: int | None,
        now_ms: int,
    ) -> AdStates:
        """These states with the target's replaced, as change ``seq + 1``."""
        previous = self.states.get((level, id))
        state = AdState(level, id, status, reason, now_ms, self.seq + 1, start, end)
        states = {**self.states, (level, id): state}
        return AdStates(self.seq + 1, states, Change(state, previous.status if previous else None))

    def paused_ids(self, now: float) -> dict[Level, np.ndarray]:
        """The ids paused at ``now``, sorted, per level."""
        paused: dict[Level, list[int]] = {level: [] for level in LEVELS}
        for state in self.states.values():
            if state.paused_at(now):
                paused[state.level].append(state.id)
        return {level: np.unique(np.asarray(ids, dtype=np.int64)) for level, ids in paused.items()}

    def next_boundary(self, now: float) -> float | None:
        """The first start or end time after ``now``: when :meth:`paused_ids` may change."""
        upcoming = [
            bound
            for state in self.states.values()
            for bound in (state.start, state.end)
            if bound is not None and bound > now
        ]
        return min(upcoming, default=None)

    def encode(self) -> bytes:
        ordered = sorted(self.states.values(), key=lambda s: (LEVELS.index(s.level), s.id))
        last = json.loads(self.last.to_json()) if self.last else None
        return json.dumps(
            {
                "format": STATE_FORMAT,
                "seq": self.seq,
                "states": [state.to_dict() for state in ordered],
                "last": last,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, raw: bytes) -> AdStates:
        """The stored value; raises :class:`CodecError` on anything else."""
        try:
            value = json.loads(raw)
            if value.get("format") != STATE_FORMAT:
                raise CodecError(f"ad states: format {value.get('format')!r}, expected 1")
            states = [AdState.from_dict(each) for each in value["states"]]
            last = value.get("last")
            return cls(
                int(value["seq"]),
                {(state.level, state.id): state for state in states},
                Change.from_json(json.dumps(last).encode()) if last else None,
            )
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise CodecError(f"ad states: {error!r}") from None


@dataclasses.dataclass(frozen=True, eq=False)
class AdHierarchy:
    """One version's ad table reduced to its hierarchy: each adgroup's campaign and
    customer, sorted by adgroup id, and the campaigns and customers that exist."""

    adgroups: np.ndarray
    campaign_of: np.ndarray
    customer_of: np.ndarray
    campaigns: np.ndarray
    customers: np.ndarray

    @classmethod
    def from_table(cls, table: Mapping[str, np.ndarray]) -> AdHierarchy:
        missing = [level.column for level in LEVELS if level.column not in table]
        if missing:
            raise CodecError(f"the ad table lacks {', '.join(missing)}")
        order = np.argsort(table[Level.ADGROUP.column], kind="stable")
        adgroups, campaign_of, customer_of = (
            np.asarray(table[level.column][order], dtype=np.int64) for level in LEVELS
        )
        return cls(
            adgroups, campaign_of, customer_of, np.unique(campaign_of), np.unique(customer_of)
        )

    def knows(self, level: Level, id: int) -> bool:
        ids = {
            Level.ADGROUP: self.adgroups,
            Level.CAMPAIGN: self.campaigns,
            Level.CUSTOMER: self.customers,
        }[level]
        index = int(np.searchsorted(ids, id))
        return index < len(ids) and int(ids[index]) == id

    def parents(self, level: Level, id: int) -> list[tuple[Level, int]]:
        """The levels above a target: an adgroup's campaign and customer, and a campaign's
        customer when all its adgroups share one."""
        if level is Level.ADGROUP:
            index = int(np.searchsorted(self.adgroups, id))
            if index == len(self.adgroups) or int(self.adgroups[index]) != id:
                return []
            return [
                (Level.CAMPAIGN, int(self.campaign_of[index])),
                (Level.CUSTOMER, int(self.customer_of[index])),
            ]
        if level is Level.CAMPAIGN:
            customers = np.unique(self.customer_of[self.campaign_of == id])
            if len(customers) == 1:
                return [(Level.CUSTOMER, int(customers[0]))]
        return []


def check_reason(reason: str) -> str | None:
    """Why `reason` cannot be recorded; None when it can."""
    if not reason.strip():
        return "is required: say why, for the record"
    if len(reason) > MAX_REASON_LENGTH:
        return f"holds {len(reason)} characters; at most {MAX_REASON_LENGTH}"
    if not _REASON_RE.fullmatch(reason):
        return "must not hold control characters"
    return None


def check_window(start: int | None, end: int | None, now: float) -> list[tuple[str, str]]:
    """The problems of a state's start and end times, as (which, problem)."""
    problems = []
    for name, value in (("start_time", start), ("end_time", end)):
        if value is not None and not 0 < value <= MAX_TIME:
            problems.append((name, f"must be a Unix time in seconds, got {value}"))
    if start is not None and end is not None and end <= start:
        problems.append(("end_time", f"{end} is not after start_time {start}"))
    elif end is not None and end <= now:
        problems.append(("end_time", f"{end} is already past (now {int(now)})"))
    return problems


class ConflictError(RuntimeError):
    """Other changes kept replacing the states between this change's read and its write."""


# KEYS[1]: the state value. ARGV[1]: the change id it must hold (0: none), ARGV[2]: the
# new value. Returns 1 when written, 0 when another change came first.
_COMPARE_AND_SET = """
local raw = redis.call('GET', KEYS[1])
local seq = 0
if raw then seq = tonumber(cjson.decode(raw).seq) end
if seq ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""
# KEYS[1]: the change counter. Raises it to ARGV[1], never lowers it.
_RAISE_COUNTER = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return current
"""


class AdStateStore:
    """Reads and changes the ad states through an asyncio Redis (or Redis Cluster) client."""

    def __init__(self, client: Any, history_length: int = HISTORY_LENGTH):
        self.client = client
        self.history_length = history_length
        self._compare_and_set = client.register_script(_COMPARE_AND_SET)
        self._raise_counter = client.register_script(_RAISE_COUNTER)
        #: The states this store last read or wrote, with their bytes: a run of changes
        #: through one store decodes the whole set once, not once per change.
        self._held: tuple[bytes, AdStates] | None = None

    async def read(self) -> AdStates:
        raw = await self.client.get(keys.AD_STATE)
        if raw is None:
            return AdStates.empty()
        if self._held is not None and self._held[0] == raw:
            return self._held[1]
        states = AdStates.decode(raw)
        self._held = (raw, states)
        return states

    async def apply(
        self,
        level: Level,
        id: int,
        status: Status,
        reason: str,
        start: int | None = None,
        end: int | None = None,
    ) -> Change:
        """Set one target's state; returns once every gateway applies it per request."""
        for _ in range(APPLY_ATTEMPTS):
            current = await self.read()
            await self._settle(current)
            changed = current.with_state(
                level, id, status, reason, start, end, int(time.time() * 1000)
            )
            encoded = changed.encode()
            written = await self._compare_and_set(keys=[keys.AD_STATE], args=[current.seq, encoded])
            if int(written):
                self._held = (encoded, changed)
                await self._settle(changed)
                assert changed.last is not None
                return changed.last
        raise ConflictError(f"{APPLY_ATTEMPTS} other changes came first; retry")

    async def _settle(self, states: AdStates) -> None:
        """Log the states' last change and raise the counter to it, if not yet done."""
        if states.last is None:
            return
        try:
            # The entry id is the change id, so a change is logged once however often
            # this runs: Redis refuses an id not above the last.
            await self.client.xadd(
                keys.AD_STATE_HISTORY,
                {HISTORY_FIELD: states.last.to_json()},
                id=f"{states.seq}-1",
                maxlen=self.history_length,
                approximate=True,
            )
        except ResponseError as error:
            if "equal or smaller" not in str(error):
                raise
        await self._raise_counter(keys=[keys.AD_STATE_SEQ], args=[states.seq])

    async def history(self, limit: int, target: tuple[Level, int] | None = None) -> list[Change]:
        """The last `limit` changes (of `target` only, when given), newest first."""
        found: list[Change] = []
        end = b"+"
        page = max(limit, 100) if target else limit
        while len(found) < limit:
            entries = await self.client.xrevrange(keys.AD_STATE_HISTORY, max=end, count=page)
            for _, fields in entries:
                change = Change.from_json(fields[HISTORY_FIELD])
                if target is None or (change.state.level, change.state.id) == target:
                    found.append(change)
                    if len(found) == limit:
                        break
            if len(entries) < page:
                break
            end = b"(" + entries[-1][0]
        return found


async def read_counter(client: Any) -> int:
    raw = await client.get(keys.AD_STATE_SEQ)
    return int(raw) if raw is not None else 0


# ---------------------------------------------------------------- frequency caps

#: Scopes a frequency cap may count.
CAP_SCOPES = {"ad": Scope.AD, "campaign": Scope.CAMPAIGN, "customer": Scope.CUSTOMER}


@dataclasses.dataclass(frozen=True, order=True)
class Cap:
    """At most ``max_impressions`` impressions per user of one member of ``scope`` within
    the last ``window_hours`` clock hours (as :data:`events.WINDOWS` count them)."""

    scope: Scope
    window_hours: int
    max_impressions: int

    def __str__(self) -> str:
        name = next(name for name, scope in CAP_SCOPES.items() if scope is self.scope)
        return f"{name}:{self.max_impressions}/{self.window_hours}h"


def parse_caps(text: str) -> tuple[Cap, ...]:
    """Caps written as ``ad:3/24h,campaign:10/24h`` (scope, impressions, hours)."""
    caps: dict[tuple[Scope, int], Cap] = {}
    for part in filter(None, (item.strip() for item in text.split(","))):
        match = re.fullmatch(r"(\w+):(\d+)/(\d+)h", part)
        if match is None or match.group(1) not in CAP_SCOPES:
            raise ValueError(
                f"{part!r} is not a cap like 'ad:3/24h' (scopes {', '.join(CAP_SCOPES)})"
            )
        cap = Cap(CAP_SCOPES[match.group(1)], int(match.group(3)), int(match.group(2)))
        if not 1 <= cap.window_hours <= MAX_CAP_WINDOW_HOURS:
            raise ValueError(f"{part!r}: the window must be 1..{MAX_CAP_WINDOW_HOURS} hours")
        if cap.max_impressions < 1:
            raise ValueError(f"{part!r}: at least 1 impression must be allowed")
        if (cap.scope, cap.window_hours) in caps:
            raise ValueError(f"{part!r}: a second cap for the same scope and window")
        caps[(cap.scope, cap.window_hours)] = cap
    return tuple(sorted(caps.values()))


def tightest(caps: Iterable[Cap]) -> tuple[Cap, ...]:
    """One cap per scope and window, the lowest limit given for it."""
    kept: dict[tuple[Scope, int], Cap] = {}
    for cap in caps:
        known = kept.get((cap.scope, cap.window_hours))
        if known is None or cap.max_impressions < known.max_impressions:
            kept[(cap.scope, cap.window_hours)] = cap
    return tuple(sorted(kept.values()))


#: An impression count field of a real-time state value, as JSON holds it: scope letter,
#: member, hour bucket, count (the field names are events.count_field's).
_IMPRESSION_FIELD = re.compile(rb'"imp:[agu]\d+:\d+":\d+')
#: The fields' scopes, as numbers for :func:`_impression_table`.
_SCOPE_CODES = {Scope.AD: 1, Scope.CAMPAIGN: 2, Scope.CUSTOMER: 3}
_SEPARATORS = bytes.maketrans(b'":,', b"   ")
#: Each scope's field head and the number it becomes.
_SCOPE_HEADS = tuple(
    (b'"imp:' + scope.value.encode(), b"%d " % code) for scope, code in _SCOPE_CODES.items()
)


def _impression_table(raw_state: bytes) -> np.ndarray | None:
    """The state's impression fields as rows of (scope code, member, hour bucket, count),
    parsed as one text by numpy: a request cannot afford a Python step per field."""
    fields = b",".join(_IMPRESSION_FIELD.findall(raw_state))
    if not fields:
        return None
    for head, code in _SCOPE_HEADS:
        fields = fields.replace(head, code)
    numbers = np.fromstring(fields.translate(_SEPARATORS), dtype=np.int64, sep=" ")
    return numbers.reshape(-1, 4)


#: Bits of a member id in the keys that group impressions by (scope code, member).
_MEMBER_BITS = 40


def capped_members(
    caps: Sequence[Cap], raw_state: bytes | None, served: Mapping[Scope, np.ndarray], now: int
) -> dict[Scope, np.ndarray]:
    """Per scope, the sorted members whose impressions have reached one of `caps` at `now`.

    Impressions are read straight from the real-time state value `raw_state`, as the stream
    job stores it (a cap needs these fields alone, and a request cannot afford to decode
    the rest): those of the clock hours of a cap's window, none of an hour ahead of the
    clock. `served` holds, per scope, the member of each ad the gateway served lately
    (:class:`ServedAds`), each one impression in every window. The caps of one window are
    counted together, in one sort, whatever their scopes.
    """
    # Rows of (scope code, member, age in hours, impressions).
    parts = []
    table = _impression_table(raw_state) if raw_state else None
    if table is not None:
        table[:, 2] = events.bucket_of(now) - table[:, 2]
        parts.append(table)
    for scope, seen in served.items():
        if len(seen) and scope in _SCOPE_CODES:
            rows = np.zeros((len(seen), 4), np.int64)
            rows[:, 0], rows[:, 1], rows[:, 3] = _SCOPE_CODES[scope], seen, 1
            parts.append(rows)
    if not parts or not caps:
        return {}
    rows = np.concatenate(parts) if len(parts) > 1 else parts[0]
    rows = rows[(rows[:, 2] >= 0) & (rows[:, 1] < 1 << _MEMBER_BITS)]
    found: dict[Scope, np.ndarray] = {}
    for window in sorted({cap.window_hours for cap in caps}):
        # Per scope code, the limit of this window's cap (0: none).
        limits = np.zeros(len(_SCOPE_CODES) + 1, np.int64)
        for cap in caps:
            if cap.window_hours == window:
                limits[_SCOPE_CODES[cap.scope]] = cap.max_impressions
        inside = rows[(rows[:, 2] < window) & (limits[rows[:, 0]] > 0)]
        if not len(inside):
            continue
        grouped = (inside[:, 0] << _MEMBER_BITS) | inside[:, 1]
        order = np.argsort(grouped, kind="stable")
        grouped = grouped[order]
        starts = np.flatnonzero(np.concatenate(([True], grouped[1:] != grouped[:-1])))
        totals = np.add.reduceat(inside[order, 3], starts)
        distinct = grouped[starts]
        reached = distinct[totals >= limits[distinct >> _MEMBER_BITS]]
        if not len(reached):
            continue
        # Sorted by scope code, then member: each scope's members are one sorted run.
        ends = reached.searchsorted(
            np.arange(1, len(limits) + 1, dtype=np.int64) << _MEMBER_BITS
        ).tolist()
        for scope, code in _SCOPE_CODES.items():
            members = reached[ends[code - 1] : ends[code]] & ((1 << _MEMBER_BITS) - 1)
            if len(members):
                earlier = found.get(scope)
                found[scope] = members if earlier is None else np.union1d(earlier, members)
    return found


class ServedAds:
    """What the gateway returned to each user lately, one key per slice of `seconds`.

    An answer's ad ids are appended to the key of its slice (``keys.served_key``), which
    lives twice the slice; a reader takes the current slice and the one before: an ad
    counts for at least `seconds` after it was served, at most twice that.
    """

    def __init__(self, seconds: int):
        self.seconds = seconds

    def slice_of(self, now: float) -> int:
        return int(now) // self.seconds

    def read_keys(self, user_id: int, now: float) -> list[bytes]:
        """The keys of the slices still read at `now`."""
        current = self.slice_of(now)
        return [keys.served_key(user_id, current - 1), keys.served_key(user_id, current)]

    def record_commands(
        self, user_id: int, slice_of: int, ad_ids: Sequence[int]
    ) -> list[tuple[str, bytes, bytes | int]]:
        """The commands adding `ad_ids` to what `user_id` was served in slice `slice_of`."""
        key = keys.served_key(user_id, slice_of)
        return [
            ("APPEND", key, codecs.encode_served_ads(list(ad_ids))),
            ("EXPIRE", key, 2 * self.seconds),
        ]

    @staticmethod
    def decode(values: Sequence[bytes | None]) -> np.ndarray:
        """The ad ids of the slices' values, a served ad once per time it was served."""
        parts = [codecs.decode_served_ads(value) for value in values if value]
        if not parts:
            return np.zeros(0, np.int64)
        return np.concatenate(parts).astype(np.int64)
