"""`adrec demo`: the whole system on one machine, in a few minutes.

Generates the `small` synthetic data set, starts a private redis-server (unless
REDIS_URL is set), runs the batch job on local Spark, starts the services (`serve all`),
asks the gateway for five users in both modes and prints the answers. Then it starts the
stream job, reports a click and two carts of one user on a category new to them, and
prints that user's candidates and realtime answer before and after. It stops everything
it started (unless --keep-running).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from adrec.cli import UsageError

JAVA_HINT = (
    "Java 17 is needed to run Spark: install it (Debian/Ubuntu: "
    "`apt-get install openjdk-17-jre-headless`, macOS: `brew install openjdk@17`) "
    "or set JAVA_HOME."
)
DEMO_USERS = 5
SERVICE_START_TIMEOUT = 120.0
#: The stream job starts a JVM before its first batch.
STREAM_START_TIMEOUT = 180.0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the whole system locally on synthetic data", description=__doc__
    )
    parser.add_argument("--preset", default="small", help="synthetic data size (default small)")
    parser.add_argument("--seed", type=int, default=7, help="synthetic data seed (default 7)")
    parser.add_argument(
        "--data-dir",
        type=pathlib.Path,
        help="where to write the data (default: a temporary folder)",
    )
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="leave Redis and the services running until Ctrl-C",
    )
    parser.set_defaults(handler=_demo)


def _say(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


def _demo(args: argparse.Namespace) -> int:
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        raise UsageError(JAVA_HINT)
    with contextlib.ExitStack() as stack:
        redis_url = _redis(stack)
        data_dir = args.data_dir or pathlib.Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="adrec-demo-"))
        )
        _generate(args.preset, args.seed, data_dir)
        version = _run_job(data_dir, redis_url)
        addresses = _start_services(stack, redis_url)
        gateway = addresses["gateway"]
        _show_recommendations(gateway, redis_url, version)
        _show_real_time_interest(stack, addresses, redis_url, version)
        if args.keep_running:
            _say(f"running: gateway {gateway}, REDIS_URL={redis_url}; Ctrl-C stops everything")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
        _say("stopping the services and Redis")
    return 0


def _redis(stack: contextlib.ExitStack) -> str:
    from adrec.core.redis_server import RedisServerError, private_redis

    if url := os.environ.get("REDIS_URL"):
        _say(f"using REDIS_URL {url}")
        return url
    try:
        server = stack.enter_context(private_redis())
    except RedisServerError as exc:
        raise UsageError(str(exc)) from None
    _say(f"started a private redis-server on {server.url}")
    return server.url


def _generate(preset: str, seed: int, data_dir: pathlib.Path) -> None:
    from adrec.core.dataset import MANIFEST_FILE
    from adrec.synthetic import generate

    if (data_dir / MANIFEST_FILE).exists():
        _say(f"reusing the data in {data_dir}")
        return
    _say(f"generating the {preset!r} synthetic data set into {data_dir}")
    generate(preset, seed, data_dir, progress=False)


def _run_job(data_dir: pathlib.Path, redis_url: str) -> str:
    from adrec.core.redis_conn import RedisSettings
    from adrec.core.settings import load
    from jobs.config import JobConfig
    from jobs.pipeline import run_job

    # The behaviour feature set reads each user's real-time counts, so the real-time step
    # shows a click reaching the ranking as well as the candidates.
    _say("running the batch job on local Spark (serving the `behaviour` feature set)")
    config = load(
        JobConfig, env={"ADREC_JOB_DATA": str(data_dir), "ADREC_JOB_FEATURE_SET": "behaviour"}
    )
    result = run_job(config, load(RedisSettings, env={"REDIS_URL": redis_url}))
    print(result.report_text(), flush=True)
    # The default stages end with publish, which always yields a version.
    if result.version is None:
        raise RuntimeError("the batch job published no data version")
    return result.version


def _start_services(stack: contextlib.ExitStack, redis_url: str) -> dict[str, str]:
    _say("starting the recall, ranking, gateway and event intake services")
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "ADREC_HOST": "127.0.0.1",
        "ADREC_RECALL_PORT": "0",
        "ADREC_RANKING_PORT": "0",
        "ADREC_GATEWAY_PORT": "0",
        "ADREC_EVENTS_PORT": "0",
        "ADREC_METRICS_PORT": "0",
        "ADREC_LOG_LEVEL": "warning",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "adrec", "serve", "all"], env=env, stdout=subprocess.PIPE, text=True
    )
    stack.callback(_stop, process)
    if process.stdout is None:
        raise RuntimeError("the services' output pipe was not opened")
    deadline = time.monotonic() + SERVICE_START_TIMEOUT
    addresses: dict[str, str] = {}
    for line in process.stdout:
        if line.startswith("metrics listening on "):
            break
        if " listening on " in line:
            addresses[line.split()[0]] = line.split()[-1]
        if time.monotonic() > deadline:
            break
    gateway = addresses.get("gateway")
    if gateway is None or "events" not in addresses or "recall" not in addresses:
        raise UsageError("the services did not start; run `adrec serve all` to see why")
    from services.runtime.health import wait_until_serving

    if not wait_until_serving(gateway, deadline - time.monotonic()):
        raise UsageError(f"the gateway at {gateway} did not become SERVING")
    _say(f"gateway listening on {gateway}, event intake on {addresses['events']}")
    return addresses


def _stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def _demo_users(redis_url: str, version: str) -> list[int]:
    """Four users with a recall list, and one the data has never seen."""
    import redis

    client = redis.Redis.from_url(redis_url)
    users = []
    for key in client.scan_iter(match=f"adrec:{version}:recall:*", count=1000):
        users.append(int(key.rsplit(b":", 1)[1]))
        if len(users) == 4 * DEMO_USERS:
            break
    client.close()
    return [*sorted(users)[: DEMO_USERS - 1], max(users, default=0) + 10_000_000]


def _show_recommendations(gateway: str, redis_url: str, version: str) -> None:
    import grpc
    from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

    from adrec.api.gateway.v1 import gateway_service_pb2 as pb
    from adrec.api.gateway.v1 import gateway_service_pb2_grpc

    def name(enum: EnumTypeWrapper, value: int) -> str:
        return enum.Name(value).split("_", 2)[-1].lower()

    rows = [("user", "mode", "served by", "ms", "top ads (id:ctr)")]
    with grpc.insecure_channel(gateway) as channel:
        # The gRPC code generator writes no annotations.
        stub = gateway_service_pb2_grpc.GatewayServiceStub(channel)  # type: ignore[no-untyped-call]
        for user in _demo_users(redis_url, version):
            for mode in (pb.RECOMMEND_MODE_REALTIME, pb.RECOMMEND_MODE_OFFLINE):
                started = time.perf_counter()
                response = stub.Recommend(
                    pb.RecommendRequest(user_id=user, pid="430548_1007", count=5, mode=mode),
                    timeout=2.0,
                )
                elapsed = (time.perf_counter() - started) * 1000
                ads = " ".join(
                    f"{ad.ad_id}:{ad.ctr:.3f}" if ad.HasField("ctr") else str(ad.ad_id)
                    for ad in response.ads
                )
                rows.append(
                    (
                        str(user),
                        name(pb.RecommendMode, mode),
                        name(pb.ServingPath, response.serving_path),
                        f"{elapsed:.1f}",
                        ads,
                    )
                )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print()
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
            + "  "
            + row[4]
        )


def _show_real_time_interest(
    stack: contextlib.ExitStack, addresses: dict[str, str], redis_url: str, version: str
) -> None:
    """A click and two carts of one user on a category new to them, and what changes."""
    import grpc
    import numpy as np
    import redis

    from adrec.api.events.v1 import event_service_pb2 as ev
    from adrec.api.events.v1 import event_service_pb2_grpc
    from adrec.api.gateway.v1 import gateway_service_pb2 as pb
    from adrec.api.gateway.v1 import gateway_service_pb2_grpc
    from adrec.api.recall.v1 import recall_service_pb2, recall_service_pb2_grpc
    from adrec.core import keys, store

    client = redis.Redis.from_url(redis_url)
    user = _demo_users(redis_url, version)[0]
    ads = store.read(client, keys.ADS, version)
    recall_list = store.read_recall_list(client, version, user)
    if ads is None or recall_list is None:
        _say("skipping the real-time step: the version has no ad table or recall lists")
        return
    known = set(ads["cate_id"][np.isin(ads["adgroup_id"], recall_list[:100])].tolist())
    fresh = ads["cate_id"] != 0
    for cate in known:
        fresh &= ads["cate_id"] != cate
    ad_id, cate_id = int(ads["adgroup_id"][fresh][0]), int(ads["cate_id"][fresh][0])

    _say("starting the stream job (Spark Structured Streaming on the event log)")
    checkpoint = stack.enter_context(tempfile.TemporaryDirectory(prefix="adrec-stream-"))
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "ADREC_STREAM_CHECKPOINT": checkpoint,
        "ADREC_STREAM_METRICS_PORT": "0",
    }
    stream = subprocess.Popen(
        [sys.executable, "-m", "adrec", "stream", "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    stack.callback(_stop, stream)

    def lead() -> tuple[list[int], int, list[int]]:
        with grpc.insecure_channel(addresses["recall"]) as channel:
            recall = recall_service_pb2_grpc.RecallServiceStub(channel)  # type: ignore[no-untyped-call]
            got = recall.GetCandidates(
                recall_service_pb2.GetCandidatesRequest(user_id=user, limit=8), timeout=2.0
            )
        with grpc.insecure_channel(addresses["gateway"]) as channel:
            gateway = gateway_service_pb2_grpc.GatewayServiceStub(channel)  # type: ignore[no-untyped-call]
            answer = gateway.Recommend(
                pb.RecommendRequest(user_id=user, pid="430548_1007", count=5), timeout=2.0
            )
        return list(got.ad_ids), got.interest_count, [ad.ad_id for ad in answer.ads]

    before = lead()
    now = int(time.time())
    batch = ev.ReportEventsRequest(
        events=[
            ev.Event(
                event_id=f"demo-click-{now}",
                user_id=user,
                time=now,
                click=ev.Click(ad_id=ad_id, pid="430548_1007"),
            ),
            *(
                ev.Event(
                    event_id=f"demo-cart-{now}-{i}",
                    user_id=user,
                    time=now,
                    behavior=ev.Behavior(type=ev.BEHAVIOR_TYPE_CART, cate_id=cate_id),
                )
                for i in range(2)
            ),
        ]
    )
    with grpc.insecure_channel(addresses["events"]) as channel:
        intake = event_service_pb2_grpc.EventServiceStub(channel)  # type: ignore[no-untyped-call]
        intake.ReportEvents(batch, timeout=5.0)
    _say(f"reported: user {user} clicked ad {ad_id} and carted twice in category {cate_id}")
    deadline = time.monotonic() + STREAM_START_TIMEOUT
    while time.monotonic() < deadline and client.get(keys.REALTIME_USER.key(user)) is None:
        time.sleep(0.5)
    client.close()
    if time.monotonic() >= deadline:
        _say("the stream job did not apply the events in time; run `adrec stream run` to see why")
        return
    after = lead()
    print()
    for label, (candidates, interest, answer) in (("before", before), ("after", after)):
        print(
            f"  {label:>6}: candidates {' '.join(map(str, candidates))} "
            f"({interest} from real-time interest); realtime answer {' '.join(map(str, answer))}"
        )
    print()
