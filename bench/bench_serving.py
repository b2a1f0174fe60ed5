"""Serving latency and throughput: Recommend REALTIME against a bare echo and the course's Spark.

Run: ``.venv/bin/python bench/bench_serving.py`` (run time in docs/performance.md;
``--quick`` halves the step durations; ``--cpu-limit gateway=0.5`` holds a service to the
CPU of its pod's request, which is what sizing a pod needs).

One run, everything on this machine, all traffic to 127.0.0.1:

1. A private redis-server gets a realistic version through the real writer: 10k users with
   500-id recall lists and profiles with ALS factors, 100k ads, 5k categories and a
   full-feature-set CTR model with random weights (timing does not depend on their values).
2. The three services start as separate processes (``adrec serve recall|ranking|gateway``),
   and so do a bare one-hop grpc.aio echo service and, for reference, Recommend's skeleton
   without its work: a bare front server calling two bare servers in turn (three processes,
   three hops, the same message sizes and per-call deadlines as the gateway's).
3. An open-loop load generator, in its own process, sends at fixed rates for a bounded time
   and measures each latency from the request's intended send time, so a stall is charged
   to every request it delays (no coordinated omission). Recommend: REALTIME, 500
   candidates, count 10, random users. A rate is sustained when its p99 is at most 50 ms,
   at least 99% of the answers are realtime-ranked and the generator kept up; a step that
   misses is run once more (other work on a shared machine can stall one), and both
   attempts are printed. Each step also reports the CPU time (user + system, from
   /proc/<pid>/stat) each service process and the generator spent per answered request:
   unlike latency, that does not depend on what else the machine is running.
4. The course's way of scoring, in this process: a Spark ML LogisticRegressionModel
   ``transform`` over a per-request DataFrame of 500 candidates, median of 20 requests.

Targets (2 cores): Recommend p99 <= 15 ms at 100 rps; >= 600 rps sustained; sustained rate
at least 0.2 of the echo's. The chain's rate is reported, not a target: it shows how much of
Recommend's cost is the three gRPC hops themselves.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
ADREC = (sys.executable, "-c", "import sys; from adrec.cli import main; sys.exit(main())")

USERS = 10_000
ADS = 100_000
CATEGORIES = 5_000
ALS_RANK = 10
CANDIDATES = 500
COUNT = 10
P99_LIMIT_S = 0.050
TARGET_P99_AT_100_S = 0.015
TARGET_SUSTAINED_RPS = 600
TARGET_ECHO_RATIO = 0.2
# Steps of Recommend and of its bare skeleton, reaching past the highest rate the skeleton
# has sustained (docs/performance.md).
THREE_HOP_RATES = (
    100,
    200,
    300,
    400,
    500,
    600,
    700,
    800,
    900,
    1000,
    1200,
    1400,
    1600,
    2000,
    2500,
    3000,
)
ECHO_RATES = (500, 1000, 1500, 2000, 2500, 3000, 3500, 4000, 5000, 6000, 7000, 8000)
REQUEST_TIMEOUT_S = 1.0
STEP_ATTEMPTS = 2
ECHO_METHOD = "/adrec.bench.Echo/Echo"
#: One load step's results, as the generator prints them (a JSON object).
Step = dict[str, Any]


# ---------------------------------------------------------------- data


def publish(redis_url: str, seed: int = 1, feature_set: str = "full") -> list[int]:
    """Publish the benchmark version; returns the user ids that have recall lists.

    ``feature_set`` names the CTR model's feature set; the category leaders real-time
    interest reads are the first ads of each category.
    """
    import redis

    from adrec.core import features, keys
    from adrec.core.catalog import Publication
    from adrec.core.codecs import UserFeatures
    from adrec.core.dataset import PIDS
    from adrec.core.metadata import VersionContent, VersionCounts
    from adrec.core.model import CtrModel

    rng = np.random.default_rng(seed)
    ad_ids = np.sort(rng.choice(np.arange(1, 1_000_000), ADS, replace=False)).astype(np.int32)
    cate_ids = np.arange(1, CATEGORIES + 1, dtype=np.int32)
    # Zipf-like category sizes, as in the real data.
    cate_weights = 1.0 / np.arange(1, CATEGORIES + 1) ** 0.9
    ad_table = {
        "adgroup_id": ad_ids,
        "cate_id": rng.choice(cate_ids, ADS, p=cate_weights / cate_weights.sum()),
        "campaign_id": rng.integers(1, 400_000, ADS).astype(np.int32),
        "customer_id": rng.integers(1, 250_000, ADS).astype(np.int32),
        "brand_id": rng.integers(1, 99_000, ADS).astype(np.int32),
        "price": np.exp(rng.normal(4.5, 1.5, ADS)).astype(np.float32),
        "ctr_ad": rng.beta(2, 38, ADS).astype(np.float32),
        "ctr_cate": rng.beta(5, 95, ADS).astype(np.float32),
        "ctr_brand": rng.beta(5, 95, ADS).astype(np.float32),
    }
    spec = features.feature_spec(feature_set)
    model = CtrModel(spec, rng.normal(0, 0.5, spec.dim), -3.0, trained_at="bench")
    user_ids = np.arange(1, USERS + 1)
    levels = {
        "cms_segid": 97,
        "cms_group_id": 13,
        "gender": 3,
        "age_level": 7,
        "pvalue_level": 4,
        "shopping_level": 4,
        "occupation": 2,
        "new_user_class_level": 5,
    }
    profiles = [
        UserFeatures(
            {field: float(rng.integers(0, top)) for field, top in levels.items()},
            rng.normal(0, 0.3, ALS_RANK),
        )
        for _ in user_ids
    ]
    client = redis.Redis.from_url(redis_url)
    with Publication(client, keep_versions=1) as publication:
        writer = publication.writer
        writer.put_ad_table(ad_table)
        leaders = np.argsort(ad_table["cate_id"], kind="stable")
        writer.put_category_ads(
            {"cate_id": ad_table["cate_id"][leaders], "ad_id": ad_table["adgroup_id"][leaders]}
        )
        writer.put_cate_factors(cate_ids, rng.normal(0, 0.3, (CATEGORIES, ALS_RANK)))
        writer.put_model(model)
        writer.put_user_features(user_ids, profiles)
        writer.put_recall_lists(
            user_ids, (rng.choice(ad_ids, CANDIDATES, replace=False) for _ in user_ids)
        )
        for scope in (keys.POPULAR_ALL, *PIDS):
            writer.put_popular(scope, ad_ids[:500])
        publication.commit(VersionContent(counts=VersionCounts(users=USERS, ads=ADS)))
    client.close()
    return user_ids.tolist()


# ---------------------------------------------------------------- processes


def free_port() -> int:
    from adrec.core.redis_server import free_port as pick

    return pick()


@contextlib.contextmanager
def started(
    args: list[str], env: dict[str, str], cpu_limit: float | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `args` for the duration; with `cpu_limit`, held to that many CPUs."""
    with contextlib.ExitStack() as stack:
        group = stack.enter_context(cpu_cgroup(cpu_limit)) if cpu_limit is not None else None
        process = subprocess.Popen(
            args,
            env={**os.environ, **env},
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            if group is not None:
                (group / "cgroup.procs").write_text(str(process.pid))
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


CFS_PERIOD_US = 100_000


@contextlib.contextmanager
def cpu_cgroup(cores: float) -> Iterator[Path]:
    """A cgroup whose processes share `cores` CPUs, by the CFS quota a Kubernetes CPU limit
    sets (Linux, as root; cgroup v2, or v1's cpu controller). Removed on exit, once the
    processes moved into it have ended."""
    name = f"adrec-bench-{os.getpid()}-{time.monotonic_ns()}"
    quota = max(1000, int(cores * CFS_PERIOD_US))
    unified = Path("/sys/fs/cgroup")
    controllers = unified / "cgroup.subtree_control"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        group = unified / name
        group.mkdir()
        (group / "cpu.max").write_text(f"{quota} {CFS_PERIOD_US}")
    else:
        group = unified / "cpu" / name
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
        (group / "cpu.cfs_quota_us").write_text(str(quota))
    try:
        yield group
    finally:
        group.rmdir()


def wait_serving(port: int, timeout: float = 60) -> None:
    from services.runtime.health import wait_until_serving

    if not wait_until_serving(f"127.0.0.1:{port}", timeout):
        raise RuntimeError(f"service on port {port} did not become SERVING in {timeout} s")


def downstream_reply_sizes() -> tuple[int, int]:
    """Serialized sizes of a recall answer of CANDIDATES ids and a ranking answer of COUNT
    scored ads, so the bare chain carries Recommend's payloads."""
    from adrec.api.common.v1 import common_pb2
    from adrec.api.ranking.v1 import ranking_service_pb2
    from adrec.api.recall.v1 import recall_service_pb2

    version = "20260101T000000Z-0000"
    # Ids as publish() draws them: their varints take as many bytes.
    candidates = np.random.default_rng(0).integers(1, 1_000_000, CANDIDATES).tolist()
    recalled = recall_service_pb2.GetCandidatesResponse(
        ad_ids=candidates, source=common_pb2.CANDIDATE_SOURCE_PERSONAL, data_version=version
    )
    ranked = ranking_service_pb2.RankCandidatesResponse(
        ads=[common_pb2.ScoredAd(ad_id=ad, ctr=0.05) for ad in candidates[:COUNT]],
        model_version=f"{version}/full",
        data_version=version,
        user_profile_found=True,
    )
    return recalled.ByteSize(), ranked.ByteSize()


def echo_server(port: int, reply_bytes: int = 0, chain: tuple[int, ...] = ()) -> None:
    """A bare grpc.aio server answering one unary method.

    Alone it answers with the request's bytes, or with `reply_bytes` bytes. With `chain`
    (ports of other such servers) it is Recommend's skeleton without its work: it sends the
    request to the first, that answer to the next, and so on, each call with a deadline as
    the gateway's, and answers with the last answer.
    """
    reply = b"x" * reply_bytes

    async def serve() -> None:
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{hop}") for hop in chain]
        hops: list[grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = [
            channel.unary_unary(ECHO_METHOD) for channel in channels
        ]

        async def echo(request: bytes, context: Any) -> bytes:
            for hop in hops:
                request = await hop(request, timeout=REQUEST_TIMEOUT_S)
            return reply or request

        server = grpc.aio.server()
        handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(echo)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("adrec.bench.Echo", {"Echo": handler}),)
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    from services.runtime import loop

    loop.run(serve())


# ---------------------------------------------------------------- CPU time

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time process `pid` has used so far (Linux /proc)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces and parentheses; the fields after it do not.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


# ---------------------------------------------------------------- load generator


def load(
    kind: str,
    port: int,
    rates: list[int],
    duration: float,
    users: int,
    cpu_pids: dict[str, int],
) -> None:
    """Open-loop steps at each rate, one JSON line per step; stops after the first failure."""
    from services.runtime import loop

    loop.run(_load(kind, port, rates, duration, users, {**cpu_pids, "generator": os.getpid()}))


async def _load(
    kind: str,
    port: int,
    rates: list[int],
    duration: float,
    users: int,
    cpu_pids: dict[str, int],
) -> None:
    from adrec.api.gateway.v1 import gateway_service_pb2 as gateway_pb2
    from adrec.api.gateway.v1 import gateway_service_pb2_grpc

    rng = np.random.default_rng(0)
    requests: list[gateway_pb2.RecommendRequest] | list[bytes]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        if kind == "recommend":
            # The gRPC code generator writes no annotations.
            stub = gateway_service_pb2_grpc.GatewayServiceStub(channel)  # type: ignore[no-untyped-call]
            requests = [
                gateway_pb2.RecommendRequest(
                    user_id=int(user),
                    pid="430548_1007",
                    count=COUNT,
                    mode=gateway_pb2.RECOMMEND_MODE_REALTIME,
                )
                for user in rng.integers(1, users + 1, 4096)
            ]
            call = stub.Recommend

            def outcome(response: Any) -> str:
                return gateway_pb2.ServingPath.Name(response.serving_path)
        else:
            call = channel.unary_unary(ECHO_METHOD)
            requests = [
                gateway_pb2.RecommendRequest(
                    user_id=int(user), pid="430548_1007", count=COUNT
                ).SerializeToString()
                for user in rng.integers(1, users + 1, 4096)
            ]

            def outcome(response: Any) -> str:
                return "ECHO"

        await _step(
            call, requests, outcome, rate=min(rates[0], 200), duration=2.0, cpu_pids={}
        )  # warm-up
        for rate in rates:
            # Other work on a shared machine can stall one step; a rate fails on two misses.
            for _ in range(STEP_ATTEMPTS):
                result = await _step(
                    call, requests, outcome, rate=rate, duration=duration, cpu_pids=cpu_pids
                )
                print(json.dumps(result), flush=True)
                if result["sustained"]:
                    break
            if not result["sustained"]:
                break


async def _step(
    call: Any,
    requests: list[Any],
    outcome: Any,
    rate: int,
    duration: float,
    cpu_pids: dict[str, int],
) -> dict[str, Any]:
    """One open-loop step; with the CPU ms per answered request of each of `cpu_pids`."""
    # uvloop's loop.time() counts whole milliseconds: latencies need a finer clock.
    clock = time.perf_counter
    total = int(rate * duration)
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()
    start = clock() + 0.05
    lag = 0.0

    async def send(request: Any, intended: float) -> None:
        try:
            response = await call(request, timeout=REQUEST_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            outcomes[error.code().name] += 1
            return
        latencies.append(clock() - intended)
        outcomes[outcome(response)] += 1

    tasks = []
    cpu_before = cpu_snapshot(cpu_pids)
    for i in range(total):
        intended = start + i / rate
        delay = intended - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            lag = max(lag, -delay)
        tasks.append(asyncio.ensure_future(send(requests[i % len(requests)], intended)))
    await asyncio.gather(*tasks)
    elapsed = clock() - start
    cpu_after = cpu_snapshot(cpu_pids)
    answered_count = len(latencies)
    cpu_ms = {
        name: (cpu_after[name] - cpu_before[name]) * 1000 / answered_count
        if answered_count
        else float("nan")
        for name in cpu_pids
    }

    answered = sorted(latencies)
    p50 = _percentile(answered, 50)
    p99 = _percentile(answered, 99)
    primary = max(outcomes.get("SERVING_PATH_REALTIME_RANKED", 0), outcomes.get("ECHO", 0))
    kept_up = elapsed <= duration * 1.05 + REQUEST_TIMEOUT_S
    return {
        "rate": rate,
        "requests": total,
        "p50_ms": p50 * 1000,
        "p99_ms": p99 * 1000,
        "max_ms": (answered[-1] if answered else float("nan")) * 1000,
        "primary_share": primary / total,
        "outcomes": dict(outcomes),
        "achieved_rps": total / elapsed,
        "max_send_lag_ms": lag * 1000,
        "sustained": p99 <= P99_LIMIT_S and primary >= 0.99 * total and kept_up,
        "cpu_ms_per_request": cpu_ms,
    }


def _percentile(sorted_values: list[float], percent: float) -> float:
    if not sorted_values:
        return float("inf")
    index = min(len(sorted_values) - 1, int(np.ceil(percent / 100 * len(sorted_values))) - 1)
    return sorted_values[max(index, 0)]


def run_load(
    kind: str, port: int, rates: tuple[int, ...], duration: float, cpu_pids: dict[str, int]
) -> list[Step]:
    """Run the generator's steps, printing each; `cpu_pids` names the processes whose CPU
    time per request is measured (the generator's own is always added)."""
    args = [
        sys.executable,
        __file__,
        "load",
        "--kind",
        kind,
        "--port",
        str(port),
        "--rates",
        ",".join(map(str, rates)),
        "--duration",
        str(duration),
        "--users",
        str(USERS),
        "--cpu-pids",
        ",".join(f"{name}={pid}" for name, pid in cpu_pids.items()),
    ]
    steps: list[Step] = []
    with subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT) as process:
        if process.stdout is None:
            raise RuntimeError("the load generator's output pipe was not opened")
        for line in process.stdout:
            step = json.loads(line)
            steps.append(step)
            print(
                f"  {kind:9} {step['rate']:>5} rps  p50 {step['p50_ms']:6.2f} ms  "
                f"p99 {step['p99_ms']:7.2f} ms  achieved {step['achieved_rps']:7.1f}  "
                f"{step['outcomes']}  {'ok' if step['sustained'] else 'NOT sustained'}",
                flush=True,
            )
            print(f"  {'':9} {'':>5}      CPU ms/request: {_cpu_text(step)}", flush=True)
    return steps


def _cpu_text(step: Step) -> str:
    cpu = step["cpu_ms_per_request"]
    services = [name for name in cpu if name != "generator"]
    parts = [f"{name} {cpu[name]:.2f}" for name in services]
    if len(services) > 1:
        parts.append(f"services total {sum(cpu[name] for name in services):.2f}")
    parts.append(f"generator {cpu['generator']:.2f}")
    return ", ".join(parts)


# ---------------------------------------------------------------- the course's way


def spark_transform_latency(requests: int = 20) -> float:
    """Median seconds of one request scored the course's way: a per-request DataFrame of 500
    candidates through a Spark ML LogisticRegressionModel's transform, collected and sorted
    for the top 10."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.linalg import Vectors
    from pyspark.sql import SparkSession

    from adrec.core import features

    spark = (
        SparkSession.builder.master("local[2]")
        .appName("adrec-bench-serving")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    try:
        rng = np.random.default_rng(0)
        dim = features.FULL.dim
        training = spark.createDataFrame(
            [
                (Vectors.dense(row), float(label))
                for row, label in zip(rng.random((2000, dim)), rng.random(2000) < 0.05, strict=True)
            ],
            ["features", "label"],
        )
        model = LogisticRegression(maxIter=10).fit(training)
        timings = []
        for i in range(requests + 3):
            candidates = rng.integers(1, 1_000_000, CANDIDATES)
            rows = rng.random((CANDIDATES, dim))
            started_at = time.perf_counter()
            frame = spark.createDataFrame(
                [(int(ad), Vectors.dense(row)) for ad, row in zip(candidates, rows, strict=True)],
                ["adgroup_id", "features"],
            )
            scored = model.transform(frame).select("adgroup_id", "probability").collect()
            top = sorted(scored, key=lambda row: row.probability[1], reverse=True)[:COUNT]
            assert len(top) == COUNT
            if i >= 3:  # the first requests warm the JVM up
                timings.append(time.perf_counter() - started_at)
        return statistics.median(timings)
    finally:
        spark.stop()


# ---------------------------------------------------------------- the run


def run(quick: bool, cpu_limits: dict[str, float]) -> int:
    from adrec.core.redis_server import private_redis

    duration = 4.0 if quick else 8.0
    print(
        "machine load average (1, 5, 15 min) at the start: "
        + ", ".join(f"{load:.1f}" for load in os.getloadavg()),
        flush=True,
    )
    for name, cores in cpu_limits.items():
        print(f"{name} held to {cores:g} CPU (CFS quota, as a Kubernetes limit)", flush=True)
    with private_redis() as redis_server:
        print(f"publishing {USERS} users x {CANDIDATES} candidates, {ADS} ads ...", flush=True)
        started_at = time.monotonic()
        publish(redis_server.url)
        print(f"  published in {time.monotonic() - started_at:.1f} s", flush=True)

        ports = {
            name: free_port()
            for name in ("recall", "ranking", "gateway", "echo", "chain", "chain_a", "chain_b")
        }
        common = {
            "REDIS_URL": redis_server.url,
            "ADREC_HOST": "127.0.0.1",
            "ADREC_LOG_LEVEL": "warning",
        }
        services = {
            name: {
                **common,
                f"ADREC_{name.upper()}_PORT": str(ports[name]),
                "ADREC_METRICS_PORT": str(free_port()),
            }
            for name in ("recall", "ranking", "gateway")
        }
        services["gateway"].update(
            {
                "ADREC_RECALL_ADDRESS": f"127.0.0.1:{ports['recall']}",
                "ADREC_RANKING_ADDRESS": f"127.0.0.1:{ports['ranking']}",
            }
        )
        with contextlib.ExitStack() as stack:
            pids = {
                name: stack.enter_context(
                    started([*ADREC, "serve", name], env, cpu_limits.get(name))
                ).pid
                for name, env in services.items()
            }
            recall_bytes, ranking_bytes = downstream_reply_sizes()
            bare = {
                "echo": [],
                "chain_a": ["--reply-bytes", str(recall_bytes)],
                "chain_b": ["--reply-bytes", str(ranking_bytes)],
                "chain": ["--chain", f"{ports['chain_a']},{ports['chain_b']}"],
            }
            for name, options in bare.items():
                pids[name] = stack.enter_context(
                    started(
                        [
                            sys.executable,
                            __file__,
                            "echo-server",
                            "--port",
                            str(ports[name]),
                            *options,
                        ],
                        {},
                    )
                ).pid
            for name in ("recall", "ranking", "gateway"):
                wait_serving(ports[name])
            print("Recommend REALTIME, 500 candidates, count 10:", flush=True)
            recommend = run_load(
                "recommend",
                ports["gateway"],
                THREE_HOP_RATES,
                duration,
                {name: pids[name] for name in ("gateway", "recall", "ranking")},
            )
            print("bare grpc.aio echo:", flush=True)
            echo = run_load("echo", ports["echo"], ECHO_RATES, duration, {"echo": pids["echo"]})
            print("bare grpc.aio chain of three hops, Recommend's skeleton:", flush=True)
            chain = run_load(
                "chain",
                ports["chain"],
                THREE_HOP_RATES,
                duration,
                {name: pids[name] for name in ("chain", "chain_a", "chain_b")},
            )

    print(
        "the course's way: Spark LR transform over a 500-row DataFrame per request ...", flush=True
    )
    spark_seconds = spark_transform_latency()
    return report(recommend, echo, chain, spark_seconds)


def _best_sustained(steps: list[Step]) -> int:
    return max((step["rate"] for step in steps if step["sustained"]), default=0)


def _ratio(rate: int, reference: int) -> float:
    return rate / reference if reference else float("nan")


def _total_cpu_ms(step: Step) -> float:
    cpu_ms: dict[str, float] = step["cpu_ms_per_request"]
    return sum(cpu_ms.values())


def _best_attempt(steps: list[Step], rate: int) -> Step:
    return min((step for step in steps if step["rate"] == rate), key=lambda s: s["p99_ms"])


def report(recommend: list[Step], echo: list[Step], chain: list[Step], spark_seconds: float) -> int:
    at_100 = _best_attempt(recommend, 100)
    sustained = _best_sustained(recommend)
    echo_sustained = _best_sustained(echo)
    ratio = _ratio(sustained, echo_sustained)
    spark_ratio = spark_seconds / (at_100["p50_ms"] / 1000)
    checks = [
        (
            f"Recommend p99 at 100 rps: {at_100['p99_ms']:.2f} ms (p50 {at_100['p50_ms']:.2f} ms)",
            at_100["p99_ms"] <= TARGET_P99_AT_100_S * 1000,
            f"<= {TARGET_P99_AT_100_S * 1000:g} ms",
        ),
        (
            f"Recommend highest sustained rate (p99 <= 50 ms): {sustained} rps",
            sustained >= TARGET_SUSTAINED_RPS,
            f">= {TARGET_SUSTAINED_RPS} rps",
        ),
        (
            f"echo highest sustained rate: {echo_sustained} rps; Recommend/echo = {ratio:.2f}",
            ratio >= TARGET_ECHO_RATIO,
            f">= {TARGET_ECHO_RATIO}",
        ),
    ]
    print()
    print(
        "machine load average (1, 5, 15 min) at the end: "
        + ", ".join(f"{load:.1f}" for load in os.getloadavg())
        + f" on {os.cpu_count()} cores"
    )
    print("CPU ms per answered Recommend (user + system, per process):")
    for step in recommend:
        print(f"  {step['rate']:>5} rps: {_cpu_text(step)}")
    print("CPU ms per answered echo call:")
    for step in echo:
        print(f"  {step['rate']:>5} rps: {_cpu_text(step)}")
    print("CPU ms per answered call of the bare chain:")
    for step in chain:
        print(f"  {step['rate']:>5} rps: {_cpu_text(step)}")
    for text, passed, target in checks:
        print(f"{'PASS' if passed else 'FAIL'}  {text}  (target {target})")
    chain_sustained = _best_sustained(chain)
    print(
        f"INFO  bare three-hop chain highest sustained rate: {chain_sustained} rps; "
        f"chain/echo = {_ratio(chain_sustained, echo_sustained):.2f}, "
        f"Recommend/chain = {_ratio(sustained, chain_sustained):.2f}"
    )
    if sustained and echo_sustained and chain_sustained:
        # Every run ends where the two cores run out, so the CPU one answer costs predicts
        # the rate ratios with less noise from whatever else the machine is running.
        cpu = {
            name: _total_cpu_ms(_best_attempt(steps, rate))
            for name, steps, rate in (
                ("Recommend", recommend, sustained),
                ("echo", echo, echo_sustained),
                ("chain", chain, chain_sustained),
            )
        }
        print(
            "INFO  CPU per answer at the highest sustained rate (every process, the "
            "generator's included): "
            + ", ".join(f"{name} {ms:.2f} ms" for name, ms in cpu.items())
            + f"; echo/Recommend = {cpu['echo'] / cpu['Recommend']:.2f}, "
            f"echo/chain = {cpu['echo'] / cpu['chain']:.2f}"
        )
    print(
        f"INFO  the course's Spark LR transform: median {spark_seconds * 1000:.1f} ms per "
        f"request = {spark_ratio:.0f}x Recommend's p50 (which includes recall, Redis and "
        f"three gRPC hops)"
    )
    return 0 if all(passed for _, passed, _ in checks) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter steps")
    parser.add_argument(
        "--cpu-limit",
        action="append",
        default=[],
        metavar="SERVICE=CPUS",
        help="hold a service process (recall, ranking, gateway) to CPUS cores, e.g. its "
        "pod's CPU request, with a cgroup CPU quota (Linux, as root); repeatable",
    )
    commands = parser.add_subparsers(dest="command")
    echo = commands.add_parser("echo-server", help="(internal) the bare echo service")
    echo.add_argument("--port", type=int, required=True)
    echo.add_argument("--reply-bytes", type=int, default=0)
    echo.add_argument("--chain", default="", help="ports to call in turn, comma-separated")
    generator = commands.add_parser("load", help="(internal) the load generator")
    generator.add_argument("--kind", choices=("recommend", "echo", "chain"), required=True)
    generator.add_argument("--port", type=int, required=True)
    generator.add_argument("--rates", required=True)
    generator.add_argument("--duration", type=float, required=True)
    generator.add_argument("--users", type=int, required=True)
    generator.add_argument(
        "--cpu-pids", default="", help="name=pid,... of processes to measure CPU time of"
    )
    args = parser.parse_args()
    if args.command == "echo-server":
        echo_server(
            args.port, args.reply_bytes, tuple(int(port) for port in args.chain.split(",") if port)
        )
        return 0
    if args.command == "load":
        cpu_pids = {
            name: int(pid)
            for name, _, pid in (item.partition("=") for item in args.cpu_pids.split(",") if item)
        }
        load(
            args.kind,
            args.port,
            [int(r) for r in args.rates.split(",")],
            args.duration,
            args.users,
            cpu_pids,
        )
        return 0
    cpu_limits = {}
    for item in args.cpu_limit:
        name, _, cores = item.partition("=")
        try:
            cpu_limits[name] = float(cores)
        except ValueError:
            cpu_limits[name] = 0.0
        if name not in ("recall", "ranking", "gateway") or not cpu_limits[name] > 0:
            parser.error(f"--cpu-limit {item}: expected recall|ranking|gateway=CPUS, CPUS > 0")
    return run(args.quick, cpu_limits)


if __name__ == "__main__":
    sys.exit(main())
