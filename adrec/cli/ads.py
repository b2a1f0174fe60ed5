"""`adrec ads pause|resume|show|history`: the ad states, through the admin API.

    adrec ads pause --campaign 5 --reason "budget spent"
    adrec ads pause --adgroup 17 --reason "review" --start 2024-06-01T00:00Z --end 2024-06-02
    adrec ads resume --campaign 5 --reason "budget topped up"
    adrec ads resume --customer 9 --reason "flight" --end 2024-07-01T00:00Z
    adrec ads show --adgroup 17       # its state and its campaign's and customer's
    adrec ads show                    # every state set
    adrec ads history --campaign 5    # the changes, newest first

A paused adgroup, campaign or customer is never served from the moment the command returns;
pausing a campaign pauses all its adgroups, a customer all its campaigns. With --start or
--end a pause holds only between them, and a resume serves only between them (paused
outside). Times are Unix seconds or ISO 8601; one without a time zone is UTC.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from adrec.cli import UsageError
from adrec.core import adstate
from adrec.core import settings as settings_mod
from adrec.core.settings import in_range, parse_float, setting
from services.runtime.settings import DEFAULT_ADMIN_PORT

if TYPE_CHECKING:
    from adrec.api.admin.v1 import admin_service_pb2

LEVELS = ("adgroup", "campaign", "customer")
#: The request's field names -> this command's flags, for the server's errors.
_FLAGS = {
    "reason": "--reason",
    "start_time": "--start",
    "end_time": "--end",
    "limit": "--limit",
}
STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclasses.dataclass(frozen=True)
class ClientSettings:
    admin_address: str = setting(
        "ADREC_ADMIN_ADDRESS",
        f"127.0.0.1:{DEFAULT_ADMIN_PORT}",
        "gRPC target of the admin service",
        aliases=("--admin",),
    )
    timeout_seconds: float = setting(
        "ADREC_ADMIN_TIMEOUT_SECONDS",
        10.0,
        "Deadline of each admin call",
        parse=parse_float,
        check=in_range(0.001, 600.0),
        aliases=("--timeout",),
    )


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "ads",
        help="pause, resume and show ads (adgroups, campaigns, customers)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="ads_command", required=True, metavar="SUBCOMMAND")
    for name, help_text in (
        ("pause", "stop serving an adgroup, campaign or customer"),
        ("resume", "serve an adgroup, campaign or customer again"),
    ):
        change = commands.add_parser(name, help=help_text, description=help_text)
        _target_flags(change, required=True)
        change.add_argument("--reason", required=True, help="why, for the record (required)")
        change.add_argument("--start", help="from when (Unix seconds or ISO 8601; default now)")
        change.add_argument("--end", help="until when (Unix seconds or ISO 8601; default none)")
        _common_flags(change)
        change.set_defaults(handler=_change, status=name)
    show = commands.add_parser(
        "show",
        help="show the state of one target, or every state set",
        description="Show one adgroup's, campaign's or customer's state with the levels "
        "above it, and whether it is paused now; without a target, every state set.",
    )
    _target_flags(show, required=False)
    _common_flags(show)
    show.set_defaults(handler=_show)
    history = commands.add_parser(
        "history",
        help="list the recorded changes, newest first",
        description="List the recorded changes of ad states, newest first: all of them, or "
        "one target's.",
    )
    _target_flags(history, required=False)
    history.add_argument(
        "--limit", type=int, default=50, help="changes to list, 1..1000 (default 50)"
    )
    _common_flags(history)
    history.set_defaults(handler=_history)


def _target_flags(parser: argparse.ArgumentParser, *, required: bool) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    for level in LEVELS:
        group.add_argument(
            f"--{level}",
            type=int,
            metavar="ID",
            help=f"an {level} id" if level == "adgroup" else f"a {level} id",
        )


def _common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the response as JSON")
    settings_mod.add_flags(ClientSettings, parser)


def _client(args: argparse.Namespace) -> ClientSettings:
    try:
        return settings_mod.load(ClientSettings, flags=args)
    except settings_mod.SettingsError as error:
        raise UsageError(str(error)) from None


def _target(args: argparse.Namespace) -> tuple[str, int] | None:
    for level in LEVELS:
        value = getattr(args, level)
        if value is not None:
            if value <= 0:
                raise UsageError(f"--{level}: must be a positive id, got {value}")
            return level, value
    return None


def parse_time(flag: str, text: str | None) -> int:
    """Unix seconds from `text` (Unix seconds or ISO 8601, UTC unless it says); 0 for none."""
    if text is None:
        return 0
    if text.strip().isdigit():
        return int(text)
    try:
        moment = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"{flag}: {text!r} is neither Unix seconds nor an ISO 8601 time "
            "(e.g. 2024-06-01T12:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp())


def _call(args: argparse.Namespace, method: str, request: Any) -> Any:
    """The admin API's answer; a refusal becomes a usage error naming the flags."""
    import grpc

    from adrec.api.admin.v1 import admin_service_pb2_grpc

    client = _client(args)
    with grpc.insecure_channel(client.admin_address) as channel:
        # The gRPC code generator writes no annotations.
        stub = admin_service_pb2_grpc.AdminServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            return getattr(stub, method)(request, timeout=client.timeout_seconds)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise UsageError(_violations(error, args)) from None
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                problem = f"cannot use the admin service at {client.admin_address}"
            else:
                problem = (
                    f"the admin service at {client.admin_address} failed ({error.code().name})"
                )
            print(f"adrec ads: error: {problem}: {error.details()}", file=sys.stderr)
            raise SystemExit(1) from None


def _violations(error: Any, args: argparse.Namespace) -> str:
    """The server's field violations, each named by this command's flag; `error` is a
    failed call (a grpc.RpcError that is also a grpc.Call)."""
    from google.rpc import error_details_pb2, status_pb2

    target = _target(args)
    flags = {**_FLAGS, **({"target.id": f"--{target[0]}"} if target else {})}
    found = []
    for key, value in error.trailing_metadata() or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        for detail in status_pb2.Status.FromString(value).details:
            bad_request = error_details_pb2.BadRequest()
            if detail.Unpack(bad_request):
                found += [
                    f"{flags.get(v.field, v.field)}: {v.description}"
                    for v in bad_request.field_violations
                ]
    return "; ".join(found) or str(error.details())


def _ref(target: tuple[str, int] | None) -> admin_service_pb2.AdRef:
    from adrec.api.admin.v1 import admin_service_pb2 as pb

    if target is None:
        return pb.AdRef()
    return pb.AdRef(level=f"AD_LEVEL_{target[0].upper()}", id=target[1])


def _change(args: argparse.Namespace) -> int:
    from adrec.api.admin.v1 import admin_service_pb2 as pb

    target = _target(args)
    start, end = parse_time("--start", args.start), parse_time("--end", args.end)
    problems = [
        f"{_FLAGS[field]}: {problem}"
        for field, problem in adstate.check_window(start or None, end or None, time.time())
    ]
    if (problem := adstate.check_reason(args.reason)) is not None:
        problems.insert(0, f"--reason: {problem}")
    if problems:
        raise UsageError("; ".join(problems))
    status = pb.AD_STATUS_PAUSED if args.status == "pause" else pb.AD_STATUS_ACTIVE
    response = _call(
        args,
        "SetAdState",
        pb.SetAdStateRequest(
            target=_ref(target),
            status=status,
            reason=args.reason,
            start_time=start,
            end_time=end,
        ),
    )
    if args.json:
        return _print_json(response)
    print(f"change {response.change.change_id}: {_describe(response.change.state)}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from adrec.api.admin.v1 import admin_service_pb2 as pb

    target = _target(args)
    if target is None:
        listed = _call(args, "ListAdStates", pb.ListAdStatesRequest())
        if args.json:
            return _print_json(listed)
        for state in listed.states:
            print(_describe(state))
        if not listed.states:
            print("(no states set: every ad is served)")
        return 0
    response = _call(args, "GetAdState", pb.GetAdStateRequest(target=_ref(target)))
    if args.json:
        return _print_json(response)
    level, id = target
    parents = [
        f"{name} {value}"
        for name, value in (("campaign", response.campaign_id), ("customer", response.customer_id))
        if value
    ]
    print(
        f"{level} {id}: {'PAUSED' if response.paused else 'served'} now"
        + (f" (under {', '.join(parents)})" if parents else "")
    )
    for state in response.states:
        print(f"  {_describe(state)}")
    if not response.states:
        print("  no state set on it or above it")
    return 0


def _history(args: argparse.Namespace) -> int:
    from adrec.api.admin.v1 import admin_service_pb2 as pb

    if not 1 <= args.limit <= 1000:
        raise UsageError(f"--limit: must be between 1 and 1000, got {args.limit}")
    response = _call(
        args,
        "ListAdStateChanges",
        pb.ListAdStateChangesRequest(target=_ref(_target(args)), limit=args.limit),
    )
    if args.json:
        return _print_json(response)
    for change in response.changes:
        print(f"change {change.change_id}: {_describe(change.state)}")
    if not response.changes:
        print("(no changes recorded)")
    return 0


def _describe(state: admin_service_pb2.AdState) -> str:
    from adrec.api.admin.v1 import admin_service_pb2 as pb

    level = pb.AdLevel.Name(state.target.level).removeprefix("AD_LEVEL_").lower()
    status = pb.AdStatus.Name(state.status).removeprefix("AD_STATUS_").lower()
    window = ""
    if state.start_time or state.end_time:
        window = f" from {_shown(state.start_time)} until {_shown(state.end_time)}"
    changed = _shown(state.changed_at_ms // 1000)
    now = "paused now" if state.paused_now else "served now"
    return f"{level} {state.target.id} {status}{window} ({now}); set {changed}: {state.reason}"


def _shown(unix_seconds: int) -> str:
    if not unix_seconds:
        return "-"
    return dt.datetime.fromtimestamp(unix_seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _print_json(message: Any) -> int:
    from google.protobuf import json_format

    print(json.dumps(json_format.MessageToDict(message), indent=2))
    return 0
