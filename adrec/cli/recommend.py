"""`adrec recommend USER`: ask the gateway for recommendations and print them as a table."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import TYPE_CHECKING

from adrec.cli import UsageError
from adrec.core import settings as settings_mod
from adrec.core.dataset import PIDS
from adrec.core.settings import in_range, parse_float, setting
from services.runtime.settings import DEFAULT_GATEWAY_PORT

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

    from adrec.api.gateway.v1.gateway_service_pb2 import RecommendResponse

MODES = ("realtime", "offline")


@dataclasses.dataclass(frozen=True)
class ClientSettings:
    gateway_address: str = setting(
        "ADREC_GATEWAY_ADDRESS",
        f"127.0.0.1:{DEFAULT_GATEWAY_PORT}",
        "gRPC target of the gateway service",
        aliases=("--gateway",),
    )
    timeout_seconds: float = setting(
        "ADREC_RECOMMEND_TIMEOUT_SECONDS",
        2.0,
        "Deadline of the Recommend call",
        parse=parse_float,
        check=in_range(0.001, 600.0),
        aliases=("--timeout",),
    )


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "recommend",
        help="ask the gateway for a user's ads and print them",
        description="Calls GatewayService.Recommend and prints the ads with their CTRs, the "
        "serving path, degradation reasons, data and model versions and the request id.",
    )
    parser.add_argument("user_id", type=int, metavar="USER", help="user id (positive)")
    parser.add_argument(
        "--pid", default=PIDS[0], help=f"placement, one of {', '.join(PIDS)} (default: %(default)s)"
    )
    parser.add_argument("--count", type=int, default=10, help="ads wanted, 1..500 (default 10)")
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="realtime",
        help="realtime: recall and rank now; offline: the job's ranked list (default: %(default)s)",
    )
    parser.add_argument(
        "--request-id", default="", help="request id to send (default: the gateway generates one)"
    )
    parser.add_argument("--json", action="store_true", help="print the response as JSON")
    settings_mod.add_flags(ClientSettings, parser)
    parser.set_defaults(handler=_recommend)


def _recommend(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format

    from adrec.api.gateway.v1 import gateway_service_pb2, gateway_service_pb2_grpc
    from services.runtime.requests import FieldChecks, InvalidArgumentError

    try:
        client = settings_mod.load(ClientSettings, flags=args)
        checks = FieldChecks()
        checks.positive_id("USER", args.user_id)
        checks.known_pid("--pid", args.pid, required=True)
        checks.in_range("--count", args.count, 1, 500)
        checks.raise_if_any()
    except (settings_mod.SettingsError, InvalidArgumentError) as error:
        raise UsageError(str(error)) from None

    request = gateway_service_pb2.RecommendRequest(
        user_id=args.user_id,
        pid=args.pid,
        count=args.count,
        request_id=args.request_id,
        mode=f"RECOMMEND_MODE_{args.mode.upper()}",
    )
    with grpc.insecure_channel(client.gateway_address) as channel:
        # The gRPC code generator writes no annotations.
        stub = gateway_service_pb2_grpc.GatewayServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            response = stub.Recommend(request, timeout=client.timeout_seconds)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise UsageError(error.details()) from None
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                problem = f"cannot reach the gateway at {client.gateway_address}"
            else:
                problem = f"the gateway at {client.gateway_address} failed ({error.code().name})"
            print(f"adrec recommend: error: {problem}: {error.details()}", file=sys.stderr)
            return 1

    if args.json:
        print(json.dumps(json_format.MessageToDict(response), indent=2))
    else:
        print(_table(response))
    return 0


def _table(response: RecommendResponse) -> str:
    from adrec.api.gateway.v1 import gateway_service_pb2 as pb

    def name(enum: EnumTypeWrapper, value: int) -> str:
        return enum.Name(value).split("_", 2)[-1].lower()

    reasons = [name(pb.DegradationReason, reason) for reason in response.degradation_reasons]
    lines = [
        f"path {name(pb.ServingPath, response.serving_path)}"
        f"  mode {name(pb.RecommendMode, response.mode)}"
        f"  degraded: {', '.join(reasons) if reasons else 'no'}",
        f"data {response.data_version or '-'}  model {response.model_version or '-'}"
        f"  request {response.request_id}",
        f"{'rank':>4}  {'ad id':>10}  {'ctr':>8}",
    ]
    for rank, ad in enumerate(response.ads, start=1):
        ctr = f"{ad.ctr:.5f}" if ad.HasField("ctr") else "-"
        lines.append(f"{rank:>4}  {ad.ad_id:>10}  {ctr:>8}")
    if not response.ads:
        lines.append("(no ads)")
    return "\n".join(lines)
