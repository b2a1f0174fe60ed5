"""Real-time state in Redis: its value format, the one script that updates it, and its reads.

A user's state (``keys.REALTIME_USER``) and an ad's (``keys.REALTIME_AD``) are each one
JSON value: windowed counts by field name (names from :mod:`adrec.core.events`), category
interest scores, and the stream batch that last changed it. One value per member keeps a
request to a single GET (the services' fast path) and keeps every update a single-key
script, which Redis Cluster runs on the member's own node.

Updates are idempotent per stream batch: the stream job tags each with its checkpoint's
run id, the micro-batch id and the part of the batch (the Spark partition) it comes from,
and the script skips a value that already holds that part of that batch, or a later batch
of the same run. A batch replayed after a crash (the same events in the same parts)
therefore changes each value at most once, whichever values the first attempt reached,
and the parts of one batch need not meet in one task.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from adrec.core import events
from adrec.core.codecs import CodecError

#: Interest halves every half hour: a click still leads a user's candidates for the next
#: hour or two, then the batch job's long-term preferences take over again.
INTEREST_HALF_LIFE_SECONDS = 1800.0
#: Candidates real-time interest puts first in a user's list, as the course did for the
#: category of a click.
INTEREST_CANDIDATES = 50
#: Interest below this score (after decay) is dropped: a single click fades out of it after
#: about four half-lives.
MIN_INTEREST = 0.05
#: Categories of interest kept per user, strongest first.
MAX_INTEREST_CATEGORIES = 20
#: State outlives its longest window by an hour, then expires if nothing updates it.
STATE_TTL_SECONDS = (events.KEPT_BUCKETS + 1) * events.BUCKET_SECONDS

# KEYS[1]: the state value. ARGV: run, batch, ttl, oldest kept bucket, now, half-life,
# min interest, max interest categories, part, the number of counts n, n (field,
# increment) pairs, then (category, score, time) triples of interest to add. A value
# written before parts existed holds its whole batch (no `parts`). `pruned`: no count field
# is of an hour before it, so a write within the same hour checks only its new fields (a
# value without it is pruned whole).
# cjson keeps object keys as strings and numbers as doubles, exact below 2^53.
_APPLY_SCRIPT = """
local raw = redis.call('GET', KEYS[1])
local state = {}
if raw then state = cjson.decode(raw) end
local run, batch, part = ARGV[1], tonumber(ARGV[2]), ARGV[9]
local parts = {}
if state.run == run then
  local held = tonumber(state.batch)
  if held > batch then return 0 end
  if held == batch then
    if not state.parts then return 0 end
    for _, done in ipairs(state.parts) do
      if done == part then return 0 end
    end
    parts = state.parts
  end
end
table.insert(parts, part)
local ttl, oldest, now = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local half_life, min_interest = tonumber(ARGV[6]), tonumber(ARGV[7])
local max_categories, n = tonumber(ARGV[8]), tonumber(ARGV[10])
local kept = state.counts or {}
local any_count = next(kept) ~= nil
local pruned = tonumber(state.pruned)
if not pruned or pruned < oldest then
  -- Every held field of an older hour goes; otherwise all of them are of `pruned` or
  -- later (a state is written pruned), so only the new fields need their hour checked.
  local held = kept
  kept = {}
  any_count = false
  for field, value in pairs(held) do
    local bucket = tonumber(string.match(field, ':(%d+)$'))
    if bucket and bucket >= oldest then kept[field] = value; any_count = true end
  end
  pruned = oldest
end
for i = 0, n - 1 do
  local field = ARGV[11 + 2 * i]
  local bucket = tonumber(string.match(field, ':(%d+)$'))
  if bucket and bucket >= oldest then
    kept[field] = (kept[field] or 0) + tonumber(ARGV[12 + 2 * i])
    any_count = true
    if bucket < pruned then pruned = oldest end
  end
end
local interest = state.interest or {}
for i = 11 + 2 * n, #ARGV, 3 do
  local cate, score, at = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local old = interest[cate]
  if old then
    local t = math.max(old[2], at)
    score = old[1] * 0.5 ^ ((t - old[2]) / half_life) + score * 0.5 ^ ((t - at) / half_life)
    at = t
  end
  interest[cate] = {score, at}
end
local ranked = {}
for cate, value in pairs(interest) do
  local current = value[1] * 0.5 ^ (math.max(0, now - value[2]) / half_life)
  if current >= min_interest then table.insert(ranked, {cate, current, value}) end
end
table.sort(ranked, function(a, b) return a[2] > b[2] end)
local strongest = {}
local any_interest = false
for i = 1, math.min(#ranked, max_categories) do
  strongest[ranked[i][1]] = ranked[i][3]; any_interest = true
end
if not any_count then kept = nil end
if not any_interest then strongest = nil end
local out = {run = run, batch = batch, parts = parts, pruned = pruned, counts = kept,
  interest = strongest}
redis.call('SET', KEYS[1], cjson.encode(out), 'EX', ttl)
return 1
"""


@dataclasses.dataclass(frozen=True)
class InterestUpdate:
    """Interest to add to a category: ``score`` as of ``time`` (unix seconds)."""

    cate_id: int
    score: float
    time: int


@dataclasses.dataclass(frozen=True)
class StateUpdate:
    """What one stream batch adds to one state value."""

    key: bytes
    counts: Sequence[tuple[str, int]] = ()
    interest: Sequence[InterestUpdate] = ()


@dataclasses.dataclass(frozen=True)
class StateSettings:
    half_life_seconds: float = INTEREST_HALF_LIFE_SECONDS
    ttl_seconds: int = STATE_TTL_SECONDS
    min_interest: float = MIN_INTEREST
    max_interest_categories: int = MAX_INTEREST_CATEGORIES


@dataclasses.dataclass(frozen=True)
class RealtimeState:
    """A decoded state value: counts by field name and interest by category."""

    counts: Mapping[str, int]
    interest: Mapping[int, tuple[float, int]]
    run: str = ""
    batch: int = -1

    def interest_ranking(self, now: int, half_life_seconds: float) -> list[tuple[int, float]]:
        """Categories by interest as of ``now``, strongest first, faded ones left out."""
        current = (
            (cate, events.decayed_interest(score, since, now, half_life_seconds))
            for cate, (score, since) in self.interest.items()
        )
        return sorted(
            ((cate, score) for cate, score in current if score >= MIN_INTEREST),
            key=lambda item: (-item[1], item[0]),
        )

    def window_counts(
        self, now: int, wanted: tuple[tuple[events.Kind, events.Scope], ...] | None = None
    ) -> dict[tuple[events.Kind, events.Scope, int], tuple[int, ...]]:
        return events.window_counts(self.counts.items(), now, wanted)


@dataclasses.dataclass(frozen=True, eq=False)
class CategoryAds:
    """A version's leading ads per category (``keys.CATEGORY_ADS``), held in memory."""

    cate_ids: np.ndarray  # int32, ascending
    offsets: np.ndarray  # int64, category i owns ad_ids[offsets[i]:offsets[i + 1]]
    ad_ids: np.ndarray  # int32

    @classmethod
    def from_table(cls, table: Mapping[str, np.ndarray]) -> CategoryAds:
        """From the job's table: one row per ad, grouped by ascending category, best first."""
        try:
            cates, ad_ids = table["cate_id"], table["ad_id"]
        except KeyError as missing:
            raise CodecError(f"category ads table lacks column {missing}") from None
        if len(cates) and bool(np.any(np.diff(cates) < 0)):
            raise CodecError("category ads table: categories are not in ascending order")
        cate_ids, starts = np.unique(cates, return_index=True)
        offsets = np.append(starts, len(cates)).astype(np.int64)
        return cls(cate_ids.astype(np.int32), offsets, np.asarray(ad_ids, dtype=np.int32))

    @classmethod
    def empty(cls) -> CategoryAds:
        return cls(np.zeros(0, np.int32), np.zeros(1, np.int64), np.zeros(0, np.int32))

    def for_category(self, cate_id: int) -> np.ndarray:
        index = int(np.searchsorted(self.cate_ids, cate_id))
        if index == len(self.cate_ids) or self.cate_ids[index] != cate_id:
            return self.ad_ids[:0]
        return self.ad_ids[self.offsets[index] : self.offsets[index + 1]]


def decode_state(raw: bytes) -> RealtimeState:
    """A state value; raises :class:`CodecError` on bytes that are not one."""
    try:
        value = json.loads(raw)
        counts = value.get("counts") or {}
        # JSON object keys are strings; the values are checked without a Python step per
        # field: a busy user's state holds thousands, and two services decode it per request.
        if not isinstance(counts, dict) or not set(map(type, counts.values())) <= {int}:
            raise ValueError("counts must map fields to integers")
        interest = {
            int(cate): (float(score), int(since))
            for cate, (score, since) in (value.get("interest") or {}).items()
        }
        return RealtimeState(counts, interest, str(value.get("run", "")), int(value["batch"]))
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise CodecError(f"real-time state: {error}") from None


#: State updates sent per round trip by default. Redis runs what it has read of a pipeline
#: back to back, so a long pipeline of state scripts delays the services' reads that arrive
#: during it; short round trips let them in between (docs/performance.md, "The stream
#: job's writes in short round trips").
WRITES_PER_ROUND_TRIP = 10


class StateWriter:
    """Applies stream batches' updates through one Redis (or Redis Cluster) client."""

    def __init__(
        self,
        client: Any,
        settings: StateSettings,
        writes_per_round_trip: int = WRITES_PER_ROUND_TRIP,
    ):
        self.client = client
        self.settings = settings
        self.writes_per_round_trip = writes_per_round_trip
        self._script = client.register_script(_APPLY_SCRIPT)

    def apply(
        self, run: str, batch: int, now: int, updates: Iterable[StateUpdate], part: int = 0
    ) -> int:
        """Apply every update of part ``part`` of batch ``batch`` of ``run``; returns how many
        values changed."""
        oldest = events.bucket_of(now) - events.KEPT_BUCKETS + 1
        common = (
            run,
            batch,
            self.settings.ttl_seconds,
            oldest,
            now,
            self.settings.half_life_seconds,
            self.settings.min_interest,
            self.settings.max_interest_categories,
            str(part),
        )
        changed = 0
        pending: list[StateUpdate] = []
        for update in updates:
            pending.append(update)
            if len(pending) >= self.writes_per_round_trip:
                changed += self._flush(common, pending)
                pending = []
        if pending:
            changed += self._flush(common, pending)
        return changed

    def _flush(self, common: tuple[Any, ...], updates: list[StateUpdate]) -> int:
        pipe = self.client.pipeline(transaction=False)
        for update in updates:
            args: list[Any] = [*common, len(update.counts)]
            for field, increment in update.counts:
                args.extend((field, increment))
            for interest in update.interest:
                args.extend((interest.cate_id, repr(interest.score), interest.time))
            self._script(keys=[update.key], args=args, client=pipe)
        return sum(int(result) for result in pipe.execute())
