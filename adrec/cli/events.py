"""`adrec events send FILE`: replay a `raw_sample` or `behavior_log` file into the event intake.

The file's format is told by its header, the published one of either table. Every
`raw_sample` row is an impression, and a click as well when its `clk` is 1; every
`behavior_log` row is one behaviour event. Rows the published format rejects (the
reasons of the batch job's loaders) are counted and left out; a row naming an id of 0 is
left out as `out_of_domain`, since the intake takes positive ids only.

Event ids are made from the file's name, the row's line number and the row's text, so
sending the same file again produces the same ids (the stream job counts each once),
while another data set's `raw_sample.csv` does not collide with this one's.

Times are rebased by default: every event moves by the same amount so that the file's
latest lands at now, keeping their spacing; the intake refuses events older than its
ADREC_EVENTS_MAX_AGE_SECONDS, so a file spanning more than that needs the setting raised
for the replay (a backfill). `--no-rebase-time` sends the times as written.

Batches go out over one HTTP/2 connection, several at once, so they may be logged out of
the file's order; the events of one batch keep theirs. A batch the intake refuses
(INVALID_ARGUMENT) stops the replay with the line of the first problem; UNAVAILABLE,
RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED are retried with backoff a bounded number of
times (a batch that was logged after all is counted once downstream, by its ids).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import hashlib
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from adrec.cli import UsageError
from adrec.core import settings as settings_mod
from adrec.core.dataset import (
    BEHAVIOR_LOG,
    BTAGS,
    NULL_BRAND,
    PIDS,
    RAW_SAMPLE,
    REJECT_REASONS,
    ColumnSpec,
    TableFormat,
)
from adrec.core.events import MAX_ID
from adrec.core.settings import setting
from services.runtime.settings import DEFAULT_EVENTS_PORT

if TYPE_CHECKING:
    import grpc

    from adrec.api.events.v1 import event_service_pb2

#: Batches in flight at once: enough to keep the intake busy while the next is built.
IN_FLIGHT = 4
#: Attempts of one batch the intake could not take (UNAVAILABLE and the like).
ATTEMPTS = 6
FIRST_BACKOFF_SECONDS = 0.2
MAX_BACKOFF_SECONDS = 5.0
#: Deadline of one ReportEvents call.
CALL_TIMEOUT_SECONDS = 30.0
#: Why a row is left out although the loaders accept it: an id of 0.
ZERO_ID = "out_of_domain"
_INDEX = re.compile(r"^events\[(\d+)\]")
#: How the intake says how many problems a batch had, when it lists only the first ones.
_TOTAL = re.compile(r"^(\d+) problems in all")
#: Trailing metadata holding a status's google.rpc.Status, details included.
STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclasses.dataclass(frozen=True)
class ClientSettings:
    events_address: str = setting(
        "ADREC_EVENTS_ADDRESS",
        f"127.0.0.1:{DEFAULT_EVENTS_PORT}",
        "gRPC target of the event intake: host:port, dns:///host:port, or http://host:port",
        aliases=("--events",),
    )


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "events",
        help="send events to the event intake",
        description="Report events to EventService.ReportEvents.",
    )
    commands = parser.add_subparsers(dest="events_command", required=True, metavar="SUBCOMMAND")
    send = commands.add_parser(
        "send",
        help="replay a raw_sample or behavior_log file as events",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    send.add_argument("file", type=Path, metavar="FILE", help="a raw_sample or behavior_log CSV")
    send.add_argument(
        "--rate", type=float, default=0, help="events per second at most (default: no limit)"
    )
    send.add_argument(
        "--batch", type=int, default=1000, help="events per ReportEvents call (default 1000)"
    )
    send.add_argument(
        "--limit", type=int, default=0, help="read at most this many rows (default: all)"
    )
    send.add_argument(
        "--rebase-time",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="move the times so that the file's latest event is now (default); "
        "--no-rebase-time sends them as written",
    )
    settings_mod.add_flags(ClientSettings, send)
    send.set_defaults(handler=_send)


# ------------------------------------------------------------------------------ the file


def _int_value(text: str, reason: str) -> int | str:
    """A non-negative int32 id, or why not (the loaders' rules)."""
    if text.isdigit():
        value = int(text)
        return value if value <= MAX_ID else reason
    if text.startswith("-") and text[1:].isdigit():
        return "negative_id"
    return reason


def _field(column: ColumnSpec, text: str) -> int | str | tuple[str]:
    """A column's value, or its reject reason wrapped in a tuple."""
    kind = column.kind
    if kind in ("id", "brand"):
        if kind == "brand" and text in ("", NULL_BRAND):
            return 0
        value = _int_value(text, "non_numeric_id")
        if isinstance(value, str):
            return (value,)
        if value == 0 and kind == "id":
            return (ZERO_ID,)
        return value
    if kind == "timestamp":
        return int(text) if text.isdigit() and int(text) > 0 else ("bad_timestamp",)
    if kind == "pid":
        return text if text in PIDS else ("unknown_pid",)
    if kind == "btag":
        return text if text in BTAGS else ("unknown_btag",)
    if kind == "label":
        if text in ("0", "1"):
            return int(text)
        return ("bad_label",) if text.isdigit() else ("non_numeric_value",)
    raise ValueError(f"{column.source}: no rule for columns of kind {kind}")


def parse_row(table: TableFormat, line: str) -> list[int | str] | str:
    """A row's values in column order, or the reason it is left out."""
    texts = line.split(",")
    if len(texts) != len(table.columns):
        return "wrong_field_count"
    values: list[int | str] = []
    for column, text in zip(table.columns, texts, strict=True):
        value = _field(column, text)
        if isinstance(value, tuple):
            return value[0]
        values.append(value)
    if table is RAW_SAMPLE and values[4] == values[5]:
        # nonclk and clk: exactly one of them is 1.
        return "bad_label"
    return values


def detect_table(header: str) -> TableFormat:
    for table in (RAW_SAMPLE, BEHAVIOR_LOG):
        if header == table.header:
            return table
    raise UsageError(
        f"the file starts with {header[:120]!r}, the header of neither raw_sample "
        f"({RAW_SAMPLE.header!r}) nor behavior_log ({BEHAVIOR_LOG.header!r})"
    )


@dataclasses.dataclass
class Reading:
    """What was read of the file so far."""

    rows: int = 0
    bad: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)


def _rows(source: TextIO, table: TableFormat, limit: int, reading: Reading) -> Iterator[Any]:
    """(line number, raw line, values) of each good row; bad ones are counted in `reading`."""
    for number, raw in enumerate(source, start=2):
        if limit and reading.rows >= limit:
            return
        line = raw.rstrip("\r\n")
        reading.rows += 1
        values = parse_row(table, line)
        if isinstance(values, str):
            reading.bad[values] += 1
            continue
        yield number, line, values


@dataclasses.dataclass
class Batch:
    request: event_service_pb2.ReportEventsRequest
    #: The file's line of each event, for naming the row of a refused one.
    lines: list[int]


def _batches(
    path: Path, table: TableFormat, limit: int, size: int, offset: int, reading: Reading
) -> Iterator[Batch]:
    from adrec.api.events.v1 import event_service_pb2 as pb

    behaviour = {
        "pv": pb.BEHAVIOR_TYPE_PAGE_VIEW,
        "cart": pb.BEHAVIOR_TYPE_CART,
        "fav": pb.BEHAVIOR_TYPE_FAVORITE,
        "buy": pb.BEHAVIOR_TYPE_BUY,
    }
    name = path.name.encode()
    events: list[Any] = []
    lines: list[int] = []
    with _open(path) as source:
        next(source)
        for number, line, values in _rows(source, table, limit, reading):
            tag = hashlib.blake2b(b"%b\n%b" % (name, line.encode()), digest_size=8).hexdigest()
            if table is RAW_SAMPLE:
                user, stamp, ad_id, pid, _, clicked = values
                shown = {"ad_id": ad_id, "pid": pid}
                events.append(
                    pb.Event(
                        event_id=f"imp-{number}-{tag}",
                        user_id=user,
                        time=int(stamp) + offset,
                        impression=pb.Impression(**shown),
                    )
                )
                lines.append(number)
                if clicked:
                    events.append(
                        pb.Event(
                            event_id=f"clk-{number}-{tag}",
                            user_id=user,
                            time=int(stamp) + offset,
                            click=pb.Click(**shown),
                        )
                    )
                    lines.append(number)
            else:
                user, stamp, btag, cate, brand = values
                events.append(
                    pb.Event(
                        event_id=f"{btag}-{number}-{tag}",
                        user_id=user,
                        time=int(stamp) + offset,
                        behavior=pb.Behavior(
                            type=behaviour[str(btag)], cate_id=cate, brand_id=brand
                        ),
                    )
                )
                lines.append(number)
            if len(events) >= size:
                yield Batch(pb.ReportEventsRequest(events=events[:size]), lines[:size])
                events, lines = events[size:], lines[size:]
    if events:
        yield Batch(pb.ReportEventsRequest(events=events), lines)


def _open(path: Path) -> TextIO:
    # Undecodable bytes stay in the row (and make it a bad row) instead of stopping the read.
    return path.open(encoding="utf-8", errors="surrogateescape", newline="")


def _latest_time(path: Path, table: TableFormat, limit: int) -> int | None:
    """The latest time among the rows that will be sent; None when there are none."""
    stamp = table.columns.index(next(c for c in table.columns if c.kind == "timestamp"))
    latest = None
    with _open(path) as source:
        next(source)
        for _, _, values in _rows(source, table, limit, Reading()):
            value = int(values[stamp])
            if latest is None or value > latest:
                latest = value
    return latest


# ------------------------------------------------------------------------------ sending


@dataclasses.dataclass
class Sent:
    events: int = 0
    rejected: int = 0
    #: Calls sent again after UNAVAILABLE and the like.
    retries: int = 0
    #: Why the replay stopped early, as one line; None when it did not.
    failure: str | None = None


def _target(address: str) -> str:
    for scheme in ("http://", "grpc://"):
        if address.startswith(scheme):
            return address.removeprefix(scheme).rstrip("/")
    if "://" in address and not address.startswith(("dns:", "unix:", "ipv4:", "ipv6:")):
        raise UsageError(
            f"--events {address!r}: give host:port, dns:///host:port or http://host:port "
            "(the intake speaks plaintext gRPC)"
        )
    return address


def _violations(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    """(field, description) of each problem in the error's google.rpc.BadRequest details."""
    from google.rpc import error_details_pb2, status_pb2

    violations = []
    for key, value in error.trailing_metadata() or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        for detail in status_pb2.Status.FromString(value).details:
            bad_request = error_details_pb2.BadRequest()
            if detail.Unpack(bad_request):
                violations += [(v.field, v.description) for v in bad_request.field_violations]
    return violations


def _refusal(error: grpc.aio.AioRpcError, batch: Batch) -> str:
    """One line naming the file line of the first problem the intake found in `batch`."""
    violations = _violations(error)
    if not violations:
        return f"the intake refused a batch: {error.details()}"
    field, description = violations[0]
    total = sum(1 for name, _ in violations if _INDEX.match(name))
    for name, text in violations:
        counted = _TOTAL.match(text) if name == "events" else None
        if counted is not None:
            total = int(counted.group(1))
    more = f" (and {total - 1} more problems in its batch)" if total > 1 else ""
    match = _INDEX.match(field)
    if match is None:
        first, last = batch.lines[0], batch.lines[-1]
        return f"the intake refused the batch of lines {first}..{last}: {field}: {description}"
    line = batch.lines[int(match.group(1))]
    return f"the intake refused line {line}: {field}: {description}{more}"


async def _deliver(stub: Any, batch: Batch, address: str, sent: Sent) -> str | None:
    """Send one batch, retrying what may pass later; why it failed, or None."""
    import grpc

    retried = {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
    backoff = FIRST_BACKOFF_SECONDS
    for attempt in range(1, ATTEMPTS + 1):
        try:
            await stub.ReportEvents(batch.request, timeout=CALL_TIMEOUT_SECONDS)
            return None
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                return _refusal(error, batch)
            if "larger than max" in (error.details() or ""):
                # The message size limit: the same batch will never pass.
                return (
                    f"a batch of {len(batch.lines)} events is larger than the intake at "
                    f"{address} takes ({error.details()}); send smaller ones with --batch"
                )
            if error.code() not in retried or attempt == ATTEMPTS:
                return (
                    f"the intake at {address} did not take a batch after {attempt} "
                    f"attempts ({error.code().name}): {error.details()}"
                )
        sent.retries += 1
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
    raise AssertionError("unreachable: the last attempt returns")


async def _send_all(batches: Iterator[Batch], address: str, rate: float) -> Sent:
    import grpc

    from adrec.api.events.v1 import event_service_pb2_grpc

    sent = Sent()
    async with grpc.aio.insecure_channel(_target(address)) as channel:
        # The gRPC code generator writes no annotations.
        stub = event_service_pb2_grpc.EventServiceStub(channel)  # type: ignore[no-untyped-call]
        in_flight: dict[asyncio.Task[str | None], Batch] = {}

        def settle(done: set[asyncio.Task[str | None]]) -> None:
            for task in done:
                batch = in_flight.pop(task)
                failure = task.result()
                if failure is None:
                    sent.events += len(batch.lines)
                else:
                    sent.rejected += len(batch.lines)
                    sent.failure = sent.failure or failure

        start = time.monotonic()
        submitted = 0
        for batch in batches:
            if rate:
                await asyncio.sleep(max(0.0, start + submitted / rate - time.monotonic()))
            while len(in_flight) >= IN_FLIGHT:
                done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                settle(done)
            if sent.failure is not None:
                break
            in_flight[asyncio.create_task(_deliver(stub, batch, address, sent))] = batch
            submitted += len(batch.lines)
        if in_flight:
            done, _ = await asyncio.wait(in_flight)
            settle(done)
    return sent


def _send(args: argparse.Namespace) -> int:
    from services.runtime import loop

    try:
        client = settings_mod.load(ClientSettings, flags=args)
    except settings_mod.SettingsError as error:
        raise UsageError(str(error)) from None
    problems = []
    if not 1 <= args.batch <= 100_000:
        problems.append(f"--batch: must be between 1 and 100000, got {args.batch}")
    if args.rate < 0:
        problems.append(f"--rate: must be 0 (no limit) or more, got {args.rate:g}")
    if args.limit < 0:
        problems.append(f"--limit: must be 0 (all rows) or more, got {args.limit}")
    if problems:
        raise UsageError("; ".join(problems))
    _target(client.events_address)
    path: Path = args.file
    try:
        with _open(path) as source:
            header = source.readline().rstrip("\r\n")
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror or error}") from None
    table = detect_table(header)

    offset = 0
    if args.rebase_time:
        latest = _latest_time(path, table, args.limit)
        if latest is not None:
            offset = int(time.time()) - latest
    reading = Reading()
    start = time.monotonic()
    sent = loop.run(
        _send_all(
            _batches(path, table, args.limit, args.batch, offset, reading),
            client.events_address,
            args.rate,
        )
    )
    seconds = max(time.monotonic() - start, 1e-6)
    if reading.bad:
        reasons = ", ".join(
            f"{reason} {reading.bad[reason]:,}"
            for reason in REJECT_REASONS
            if reason in reading.bad
        )
        print(f"bad rows: {sum(reading.bad.values()):,} not sent ({reasons})")
    print(
        f"{table.name}: rows read {reading.rows:,}, events sent {sent.events:,}, "
        f"rejected {sent.rejected:,}, retried calls {sent.retries:,}, {seconds:.2f} s, "
        f"{sent.events / seconds:,.0f} events/s"
    )
    if sent.failure is not None:
        print(f"adrec events send: error: {sent.failure}", file=sys.stderr)
        return 1
    return 0
