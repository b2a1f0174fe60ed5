"""Real-time events: what an ad server reports, how it is checked, logged and counted.

Three kinds of event arrive through ``ReportEvents``: an impression (an ad was shown), a click,
and behaviour (a page view, cart, favourite or purchase of an item of some category and
brand): the fields of the data set's ``raw_sample`` and ``behavior_log``. Each event is
checked here (:func:`check_event`), appended to the event log as one text line
(:func:`encode_event`, :func:`decode_event`), and folded into per-user and per-ad state by the
stream job. The window and bucket definitions that state uses live here too, so the stream
job that maintains the counts, the batch job that recomputes them for training and the
ranking service that reads them agree on what "the last day" means.

Windows are counted in whole clock hours (UTC buckets of :data:`BUCKET_SECONDS`): the count
of a window of ``h`` hours at time ``t`` is the number of events strictly before ``t``
whose bucket is one of the ``h`` buckets ending with ``t``'s own. The one-hour window is
therefore "since the start of this hour", the one-day window the current hour and the 23
before it.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
from collections.abc import Iterable

from adrec.core.codecs import CodecError
from adrec.core.dataset import PIDS

#: The largest id the data set's int32 columns and Redis keys hold.
MAX_ID = 2**31 - 1
#: Longest event id: enough for a UUID, a ULID or ``<host>-<sequence>``.
MAX_EVENT_ID_LENGTH = 64
#: Longest request id, as for ``Recommend``.
MAX_REQUEST_ID_LENGTH = 128
#: Longest model version an impression or click may carry (``<data version>/<spec id>``).
MAX_MODEL_VERSION_LENGTH = 128
#: The serving paths a Recommend answer names (its ``serving_path``, lower case), which an
#: impression or click echoes back so the online CTR can be told apart by path.
SERVING_PATHS = ("realtime_ranked", "offline_ranked", "recall_order", "popular")
#: Event and request ids are printable ASCII without spaces, so a log line splits cleanly.
_TOKEN_RE = re.compile(r"[!-~]+")

BUCKET_SECONDS = 3600


class Kind(enum.StrEnum):
    """An event's kind; the four behaviour kinds are the data set's ``btag`` values."""

    IMPRESSION = "imp"
    CLICK = "clk"
    PAGE_VIEW = "pv"
    CART = "cart"
    FAVOURITE = "fav"
    BUY = "buy"

    @property
    def is_behaviour(self) -> bool:
        return self in BEHAVIOUR_KINDS

    @property
    def names_an_ad(self) -> bool:
        return self in (Kind.IMPRESSION, Kind.CLICK)


BEHAVIOUR_KINDS = frozenset({Kind.PAGE_VIEW, Kind.CART, Kind.FAVOURITE, Kind.BUY})

#: How strongly each kind signals interest in the category it names; a page view is a
#: glance, the others are deliberate (the course reacted to clicks only).
INTEREST_WEIGHTS: dict[Kind, float] = {
    Kind.CLICK: 1.0,
    Kind.CART: 2.0,
    Kind.FAVOURITE: 1.5,
    Kind.BUY: 2.0,
}


@dataclasses.dataclass(frozen=True)
class Window:
    """A counting window of ``hours`` whole clock hours, named as in feature and field names."""

    name: str
    hours: int

    def buckets(self, now: int) -> range:
        last = bucket_of(now)
        return range(last - self.hours + 1, last + 1)


WINDOWS: tuple[Window, ...] = (Window("1h", 1), Window("1d", 24), Window("3d", 72))
#: Buckets older than the longest window are never read again.
KEPT_BUCKETS = max(window.hours for window in WINDOWS)


def bucket_of(unix_seconds: int) -> int:
    return unix_seconds // BUCKET_SECONDS


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One reported event. Ids that do not apply to the kind are 0, strings empty.

    ``time`` is the moment it happened, in unix seconds. ``ad_id`` and ``pid`` belong to
    impressions and clicks (``request_id`` links an impression to the ``Recommend`` answer
    that chose it, ``serving_path`` and ``model_version`` are what that answer said, empty
    when not known); ``cate_id`` and ``brand_id`` to behaviour (brand 0: the item has none).
    """

    kind: Kind
    event_id: str
    user_id: int
    time: int
    ad_id: int = 0
    pid: str = ""
    request_id: str = ""
    cate_id: int = 0
    brand_id: int = 0
    serving_path: str = ""
    model_version: str = ""


@dataclasses.dataclass(frozen=True)
class TimeBounds:
    """How far from the receiver's clock an event's time may be."""

    max_age_seconds: int
    max_ahead_seconds: int


def check_event(event: Event, now: int, bounds: TimeBounds) -> list[tuple[str, str]]:
    """Every problem of one event as (field, problem); empty when it can be logged."""
    problems: list[tuple[str, str]] = []

    def need(ok: bool, field: str, problem: str) -> None:
        if not ok:
            problems.append((field, problem))

    if not event.event_id:
        problems.append(("event_id", "is required (it makes a resent event count once)"))
    else:
        need(
            len(event.event_id) <= MAX_EVENT_ID_LENGTH,
            "event_id",
            f"holds {len(event.event_id)} characters; at most {MAX_EVENT_ID_LENGTH}",
        )
        need(
            bool(_TOKEN_RE.fullmatch(event.event_id)),
            "event_id",
            "must be printable ASCII without spaces",
        )
    need(0 < event.user_id <= MAX_ID, "user_id", f"must be a positive id, got {event.user_id}")
    oldest, newest = now - bounds.max_age_seconds, now + bounds.max_ahead_seconds
    need(
        oldest <= event.time <= newest,
        "time",
        f"{event.time} is outside the accepted range {oldest}..{newest} "
        f"(at most {bounds.max_age_seconds} s old, {bounds.max_ahead_seconds} s ahead)",
    )
    if event.kind.names_an_ad:
        need(0 < event.ad_id <= MAX_ID, "ad_id", f"must be a positive id, got {event.ad_id}")
        need(
            event.pid in PIDS,
            "pid",
            f"{_excerpt(event.pid) if event.pid else 'empty'} is not a known placement; "
            f"known: {', '.join(PIDS)}",
        )
        if event.request_id:
            need(
                len(event.request_id) <= MAX_REQUEST_ID_LENGTH,
                "request_id",
                f"holds {len(event.request_id)} characters; at most {MAX_REQUEST_ID_LENGTH}",
            )
            need(
                bool(_TOKEN_RE.fullmatch(event.request_id)),
                "request_id",
                "must be printable ASCII without spaces",
            )
        need(
            not event.serving_path or event.serving_path in SERVING_PATHS,
            "serving_path",
            f"{_excerpt(event.serving_path)} is not a serving path; "
            f"known: {', '.join(SERVING_PATHS)}",
        )
        if event.model_version:
            need(
                len(event.model_version) <= MAX_MODEL_VERSION_LENGTH,
                "model_version",
                f"holds {len(event.model_version)} characters; at most {MAX_MODEL_VERSION_LENGTH}",
            )
            need(
                bool(_TOKEN_RE.fullmatch(event.model_version)),
                "model_version",
                "must be printable ASCII without spaces",
            )
    else:
        need(0 < event.cate_id <= MAX_ID, "cate_id", f"must be a positive id, got {event.cate_id}")
        need(
            0 <= event.brand_id <= MAX_ID,
            "brand_id",
            f"must be a positive id or 0 (no brand), got {event.brand_id}",
        )
    return problems


def _excerpt(text: str, limit: int = 40) -> str:
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}..."


# ---------------------------------------------------------------- the event log's lines

#: Format tag of the lines written; a reader refuses lines of a format it does not know.
#: Format 1 (the first ten fields) is still read: a log keeps lines older releases wrote.
LINE_FORMAT = b"2"
#: The one field of each entry of the event log (``keys.EVENT_LOG``, a Redis stream):
#: its value is the event's line. A byte string in keys.py would count as a key there.
LOG_FIELD = b"e"
#: Fields of a line, by format.
LINE_FIELDS = {b"1": 10, b"2": 12}


def encode_event(event: Event) -> bytes:
    """One log line, tab-separated: format, kind, event id, user, time, ad, pid, request id,
    cate, brand, serving path, model version.

    Ids that do not apply are written empty, so a line holds only what was reported.
    Only events that passed :func:`check_event` are encoded: their strings hold no tabs.
    """

    def number(value: int) -> str:
        return str(value) if value else ""

    return b"\t".join(
        (
            LINE_FORMAT,
            event.kind.value.encode(),
            event.event_id.encode(),
            str(event.user_id).encode(),
            str(event.time).encode(),
            number(event.ad_id).encode(),
            event.pid.encode(),
            event.request_id.encode(),
            number(event.cate_id).encode(),
            number(event.brand_id).encode(),
            event.serving_path.encode(),
            event.model_version.encode(),
        )
    )


def decode_event(line: bytes) -> Event:
    """The event of one log line; raises :class:`CodecError` on anything else."""
    parts = line.split(b"\t")
    if LINE_FIELDS.get(parts[0]) != len(parts):
        expected = " or ".join(f"{f.decode()} with {n} fields" for f, n in LINE_FIELDS.items())
        raise CodecError(
            f"event line: expected format {expected}, "
            f"got {len(parts)} fields starting {parts[0][:8]!r}"
        )
    extra = parts[10:] or [b"", b""]
    try:
        kind = Kind(parts[1].decode())
        return Event(
            kind=kind,
            event_id=parts[2].decode("ascii"),
            user_id=int(parts[3]),
            time=int(parts[4]),
            ad_id=int(parts[5] or 0),
            pid=parts[6].decode("ascii"),
            request_id=parts[7].decode("ascii"),
            cate_id=int(parts[8] or 0),
            brand_id=int(parts[9] or 0),
            serving_path=extra[0].decode("ascii"),
            model_version=extra[1].decode("ascii"),
        )
    except (ValueError, UnicodeDecodeError) as error:
        raise CodecError(f"event line: {error}") from None


# ---------------------------------------------------------------- count field names
#
# The counts of a real-time state value (adrec/core/realtime.py) are named
# "<kind>:<scope><id>:<bucket>", scope letters as in :class:`Scope`, e.g.
# "cart:c6513:492811" is the user's carts of category 6513 in hour bucket 492811.


class Scope(enum.StrEnum):
    """What a count is of: the event's category, brand, ad, campaign or customer."""

    CATEGORY = "c"
    BRAND = "b"
    AD = "a"
    CAMPAIGN = "g"
    CUSTOMER = "u"


def count_field(kind: Kind, scope: Scope, member: int, bucket: int) -> str:
    return f"{kind.value}:{scope.value}{member}:{bucket}"


#: (kind, scope) of every "<kind>:<scope>" a count field's name may start with.
_FIELD_HEADS: dict[tuple[str, str], tuple[Kind, Scope]] = {
    (kind.value, scope.value): (kind, scope) for kind in Kind for scope in Scope
}


@functools.cache
def _heads_of(wanted: tuple[tuple[Kind, Scope], ...]) -> dict[tuple[str, str], tuple[Kind, Scope]]:
    return {text: pair for text, pair in _FIELD_HEADS.items() if pair in wanted}


def window_counts(
    fields: Iterable[tuple[str, int]],
    now: int,
    wanted: tuple[tuple[Kind, Scope], ...] | None = None,
) -> dict[tuple[Kind, Scope, int], tuple[int, ...]]:
    """Per (kind, scope, member), its count in each of :data:`WINDOWS` at ``now``; only
    the `wanted` (kind, scope) pairs when given.

    A name that is not ``<kind>:<scope><member>:<bucket>`` is skipped. The parts are
    looked up in a table rather than by enum calls: a ranking request reads every field of
    the user's state.
    """
    heads = _FIELD_HEADS if wanted is None else _heads_of(wanted)
    current = bucket_of(now)
    hours = [window.hours for window in WINDOWS]
    counts: dict[tuple[Kind, Scope, int], list[int]] = {}
    for name, value in fields:
        kind_text, _, rest = name.partition(":")
        member_text, _, bucket_text = rest.partition(":")
        pair = heads.get((kind_text, member_text[:1]))
        if pair is None or ":" in bucket_text:
            continue
        try:
            member, bucket = int(member_text[1:]), int(bucket_text)
        except ValueError:
            continue
        age = current - bucket
        if age < 0:
            continue
        key = (pair[0], pair[1], member)
        per_window = counts.get(key)
        if per_window is None:
            per_window = counts[key] = [0] * len(hours)
        for index, window_hours in enumerate(hours):
            if age < window_hours:
                per_window[index] += value
    return {key: tuple(values) for key, values in counts.items()}


def decayed_interest(score: float, since: int, now: int, half_life_seconds: float) -> float:
    """An interest score recorded at ``since``, as of ``now``."""
    age = max(0, now - since)
    return float(score * 0.5 ** (age / half_life_seconds))
