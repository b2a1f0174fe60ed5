"""Serving a full-size published version: ranking start, resident memory, load, hot reload.

Run: ``.venv/bin/python bench/bench_full_serving.py --redis redis://HOST:PORT/0`` against a
Redis whose active version the batch job published from the ``full`` preset (``adrec job
run --data <full data> --redis ...``: 1,141,729 users, 846,811 ads); nothing else is
needed. ``--quick`` shortens the load runs, ``--no-reload`` skips the hot reload and leaves
Redis as it was. A password comes from the URL or REDIS_PASSWORD, as the services take it.
The services run with their defaults (e.g. ADREC_RELOAD_INTERVAL_SECONDS) unless the
environment sets them.

Everything but Redis runs on this machine, all traffic to 127.0.0.1:

1. The active version's size: keys and estimated bytes per key family (one SCAN over the
   version and sampled ``MEMORY USAGE``, as the job reports it), the counts its metadata
   records, and Redis's ``used_memory`` (INFO memory).
2. The three services start as separate processes (``adrec serve recall|ranking|gateway``,
   as in bench_serving.py) on free ports, ranking first and alone: its start time runs from
   process start to health SERVING, which it reports once the model and the whole ad table
   are loaded. Each process's resident memory (VmRSS, and the peak VmHWM, from
   /proc/<pid>/status) is read after load-up, after the steady load and after the reload.
3. Open-loop ``Recommend`` load, REALTIME, count 10, at 100 rps for 30 s (10 s with
   ``--quick``) after a warm-up, from a generator in its own process that measures each
   latency from the request's intended send time (no coordinated omission); users are
   drawn from the version's recall lists (a bounded SCAN). Printed: p50/p99/max latency,
   answers by serving path and degradation reason, errors by code, and the CPU time each
   service spent per answer.
4. Hot reload under the same 100 rps load: the active version's keys are copied to a new
   version (DUMP/RESTORE in pipelined batches, key names built by ``adrec.core.keys``)
   inside an ``adrec.core.catalog.Publication`` and committed with the source's metadata
   content, so it becomes active exactly as a job's publish does. The reload time runs from
   the commit (the ``adrec:active`` switch) to the moment the ranking service swapped in the
   new version: the load timestamp its /metrics exports next to the data version gauge.
   The first Recommend answer ranked on the new version (the response's data_version) is
   shown too. Requests are counted per window: while the copy is written, from the switch
   until ranking serves the new version, and after; errors and degraded answers apart.

Redis needs room for a second copy of the version (checked against ``maxmemory`` when one
is set). The copy stays active afterwards (it holds the same data); the catalog is then
pruned to ``--keep-versions`` previous versions as a job's publish prunes it, and the
source version, kept for rollback, can be made active again with ``adrec publish
rollback``. Every wait is bounded: ``--serving-timeout``, ``--copy-timeout`` and
``--reload-timeout``.

Targets: ranking start <= 30 s; hot reload <= 30 s, with no Recommend errors from the
copy's start to the end; ``Recommend`` p99 at 100 rps <= 15 ms. Resident memory per service
is reported, not a target.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.util
import itertools
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from adrec.core import keys, settings, store
from adrec.core.catalog import (
    LockLostError,
    Publication,
    PublishLockedError,
    family_memory,
    prune,
    used_memory,
)
from adrec.core.metadata import VersionContent, VersionMeta
from adrec.core.redis_conn import RedisSettings, connect, redacted, validate_url
from jobs.config import JobConfig

if TYPE_CHECKING:
    import bench_serving as serving
else:

    def _sibling(name: str) -> Any:
        # By path: the benchmarks are scripts, not a package.
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {name}.py next to {__file__}")
        module = importlib.util.module_from_spec(spec)
        # Registered first, as an import would, for whatever looks itself up while loading.
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    serving = _sibling("bench_serving")

SERVICES = ("ranking", "recall", "gateway")
RATE = 100
DURATION_S = 30.0
QUICK_DURATION_S = 10.0
WARMUP_S = 3.0
PID = "430548_1007"
#: Users sampled from the recall lists; the generator cycles through this many requests.
SAMPLED_USERS = 4096
TARGET_START_S = 30.0
TARGET_RELOAD_S = 30.0
#: Load kept running once ranking serves the new version, so its first answers are seen.
TAIL_S = 5.0
QUICK_TAIL_S = 2.0
#: Each scrape costs the service some CPU; the ranking's reload time does not depend on it
#: (its /metrics says when it loaded the version), only the others' first sighting does.
METRICS_POLL_S = 0.25
#: Keys per DUMP and per RESTORE pipeline: a batch of recall lists stays a few MB.
COPY_BATCH = 1000
#: The bench's own Redis commands include multi-megabyte pipelines on a busy Redis.
COMMAND_TIMEOUT_S = 60.0
#: Head room left under maxmemory after the copy, for the services and the allocator.
MAXMEMORY_MARGIN = 0.9
GENERATOR_START_TIMEOUT_S = 60.0
GENERATOR_STOP_TIMEOUT_S = 30.0
MIB = 2**20


# ---------------------------------------------------------------- the version


def version_size(client: Any, version: str) -> dict[str, dict[str, int]]:
    """Print the version's key families, its metadata counts and Redis memory."""
    meta = store.read_meta(client, version)
    print(f"active version {version}", end="")
    if meta is not None:
        counts = meta.content.counts
        print(
            f": created {meta.created_at}, metadata counts users {counts.users:,}, "
            f"ads {counts.ads:,}, recall lists {counts.recall_lists:,}, "
            f"offline lists {counts.offline_lists:,}; written with "
            f"{meta.memory_bytes / MIB:,.0f} MiB of used_memory growth",
            end="",
        )
    print(flush=True)
    started_at = time.monotonic()
    families = family_memory(client, version)
    print(f"  {'family':<13} {'keys':>11} {'bytes (est.)':>15} {'per key':>9}")
    for family, row in sorted(families.items(), key=lambda item: -item[1]["bytes"]):
        print(
            f"  {family:<13} {row['keys']:>11,} {row['bytes']:>15,} "
            f"{row['bytes'] / row['keys']:>9,.0f}"
        )
    total_keys = sum(row["keys"] for row in families.values())
    total_bytes = sum(row["bytes"] for row in families.values())
    print(
        f"  {'total':<13} {total_keys:>11,} {total_bytes:>15,}  "
        f"(one SCAN, {time.monotonic() - started_at:.1f} s)"
    )
    info = client.info("memory")
    maxmemory = int(info.get("maxmemory", 0))
    print(
        f"Redis used_memory {used_memory(client) / MIB:,.1f} MiB "
        f"(peak {int(info.get('used_memory_peak', 0)) / MIB:,.1f} MiB, maxmemory "
        f"{f'{maxmemory / MIB:,.0f} MiB' if maxmemory else 'none'}), {client.dbsize():,} keys; "
        f"kept versions {', '.join(store.list_versions(client))}",
        flush=True,
    )
    return families


def sample_users(client: Any, version: str, wanted: int = SAMPLED_USERS) -> list[int]:
    """Up to `wanted` users with a recall list; the SCAN stops once it has them."""
    pattern = keys.RECALL.key(version, "*")
    found = client.scan_iter(match=pattern, count=1000)
    return [int(key.rsplit(b":", 1)[1]) for key in itertools.islice(found, wanted)]


_FAMILIES = {family.name: family for family in keys.VERSIONED_FAMILIES}


def copy_version(client: Any, publication: Publication, source: str, deadline: float) -> int:
    """Copy every key of `source` but its metadata under `publication`'s version; returns the
    keys restored. SCAN can return a key twice, so a repeat overwrites its first copy."""
    prefix = len(keys.version_pattern(source)) - 1
    # The commit writes the new version's own metadata.
    meta = keys.META.key(source)
    restored = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=keys.version_pattern(source), count=COPY_BATCH):
        if key != meta:
            batch.append(key)
        if len(batch) >= COPY_BATCH:
            restored += _copy_batch(client, publication, prefix, batch)
            batch = []
            if time.monotonic() > deadline:
                raise TimeoutError("copying the version took longer than --copy-timeout")
    return restored + (_copy_batch(client, publication, prefix, batch) if batch else 0)


def _copy_batch(client: Any, publication: Publication, prefix: int, batch: list[bytes]) -> int:
    # The writer refuses once the publish lock is lost, which must stop the copy too.
    target = publication.writer.version
    pipe = client.pipeline(transaction=False)
    for key in batch:
        pipe.dump(key)
    dumps = pipe.execute()
    pipe = client.pipeline(transaction=False)
    restored = 0
    for key, dumped in zip(batch, dumps, strict=True):
        if dumped is None:
            continue
        pipe.restore(_target_key(key[prefix:].decode(), target), 0, dumped, replace=True)
        restored += 1
    pipe.execute()
    return restored


def _target_key(name: str, version: str) -> bytes:
    family_name, _, member = name.partition(":")
    family = _FAMILIES.get(family_name)
    if family is None:
        raise ValueError(f"key family {family_name!r} is unknown to adrec.core.keys")
    return family.key(version, member if family.member is not None else None)


# ---------------------------------------------------------------- processes


def memory_status(pid: int) -> tuple[int, int]:
    """Resident and peak resident bytes of process `pid` (VmRSS, VmHWM)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


@dataclasses.dataclass(frozen=True)
class Scrape:
    """What one /metrics scrape says about the loaded data version."""

    versions: tuple[str, ...]
    loaded_at: float | None


def scrape(port: int) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
        text = answer.read().decode()
    versions: list[str] = []
    loaded_at = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "adrec_data_version_info" and sample.value == 1:
                versions.append(sample.labels["version"])
            elif sample.name == "adrec_data_version_loaded_timestamp_seconds":
                loaded_at = sample.value
    return Scrape(tuple(versions), loaded_at)


@dataclasses.dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    start_s: float = 0.0


def start_services(
    stack: contextlib.ExitStack, redis_url: str, timeout: float
) -> dict[str, Service]:
    """Ranking first and alone, so its start time is its own; then recall and the gateway."""
    ports = {name: serving.free_port() for name in SERVICES}
    common = {"REDIS_URL": redis_url, "ADREC_HOST": "127.0.0.1", "ADREC_LOG_LEVEL": "warning"}
    env = {
        name: {
            **common,
            f"ADREC_{name.upper()}_PORT": str(ports[name]),
            "ADREC_METRICS_PORT": str(serving.free_port()),
        }
        for name in SERVICES
    }
    env["gateway"].update(
        {
            "ADREC_RECALL_ADDRESS": f"127.0.0.1:{ports['recall']}",
            "ADREC_RANKING_ADDRESS": f"127.0.0.1:{ports['ranking']}",
        }
    )
    services: dict[str, Service] = {}
    for group in (("ranking",), ("recall", "gateway")):
        started_at = time.monotonic()
        for name in group:
            process = stack.enter_context(
                serving.started([*serving.ADREC, "serve", name], env[name])
            )
            services[name] = Service(
                name, process, ports[name], int(env[name]["ADREC_METRICS_PORT"])
            )
        for name in group:
            remaining = max(timeout - (time.monotonic() - started_at), 1.0)
            try:
                serving.wait_serving(ports[name], remaining)
            except RuntimeError:
                code = services[name].process.poll()
                state = f"exited with code {code}" if code is not None else "still running"
                raise RuntimeError(
                    f"the {name} service was not SERVING within {timeout:g} s ({state}); "
                    f"run `adrec serve {name}` against the same Redis to see its log"
                ) from None
            services[name].start_s = time.monotonic() - started_at
    return services


def print_memory(services: dict[str, Service], when: str) -> dict[str, tuple[int, int]]:
    readings = {name: memory_status(service.process.pid) for name, service in services.items()}
    print(
        f"resident memory {when}: "
        + ", ".join(
            f"{name} {rss / MIB:,.0f} MiB (peak {peak / MIB:,.0f})"
            for name, (rss, peak) in readings.items()
        ),
        flush=True,
    )
    return readings


# ---------------------------------------------------------------- load generator


def load(port: int, rate: int, seconds: float, warmup: float, users_file: str, out: str) -> None:
    """Open-loop Recommend until `seconds` pass or SIGUSR1 arrives, after a warm-up; prints
    one line when the recorded run starts and writes every request's record to `out`."""
    from services.runtime import loop

    loop.run(_load(port, rate, seconds, warmup, users_file, out))


async def _load(
    port: int, rate: int, seconds: float, warmup: float, users_file: str, out: str
) -> None:
    from adrec.api.gateway.v1 import gateway_service_pb2 as gateway_pb2
    from adrec.api.gateway.v1 import gateway_service_pb2_grpc

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, stop.set)
    users = json.loads(Path(users_file).read_text())
    rng = np.random.default_rng(0)
    requests = [
        gateway_pb2.RecommendRequest(
            user_id=int(user),
            pid=PID,
            count=serving.COUNT,
            mode=gateway_pb2.RECOMMEND_MODE_REALTIME,
        )
        for user in rng.choice(users, SAMPLED_USERS)
    ]
    records: dict[str, list[Any]] = {
        field: [] for field in ("sent", "latency", "outcome", "degradation", "version")
    }

    def record(
        response: Any, error: grpc.aio.AioRpcError | None, sent: float, latency: float
    ) -> None:
        records["sent"].append(sent)
        records["latency"].append(latency if error is None else None)
        if error is not None:
            records["outcome"].append(f"error {error.code().name}")
            records["degradation"].append("")
            records["version"].append("")
            return
        records["outcome"].append(gateway_pb2.ServingPath.Name(response.serving_path))
        records["degradation"].append(
            "+".join(gateway_pb2.DegradationReason.Name(r) for r in response.degradation_reasons)
        )
        records["version"].append(response.data_version)

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        # The gRPC code generator writes no annotations.
        stub = gateway_service_pb2_grpc.GatewayServiceStub(channel)  # type: ignore[no-untyped-call]
        await _open_loop(stub.Recommend, requests, rate, warmup, asyncio.Event(), None)
        print(json.dumps({"started_at": time.time()}), flush=True)
        lag = await _open_loop(stub.Recommend, requests, rate, seconds, stop, record)
    Path(out).write_text(json.dumps({**records, "max_send_lag_ms": lag * 1000}))


async def _open_loop(
    call: Any,
    requests: list[Any],
    rate: int,
    seconds: float,
    stop: asyncio.Event,
    record: Callable[[Any, grpc.aio.AioRpcError | None, float, float], None] | None,
) -> float:
    """Send at `rate` until `seconds` pass or `stop` is set; returns the largest send lag.
    Each record carries the request's intended send time as Unix time."""
    # uvloop's loop.time() counts whole milliseconds: latencies need a finer clock.
    clock = time.perf_counter
    start = clock() + 0.05
    wall_offset = time.time() - clock()
    pending: set[asyncio.Future[None]] = set()
    lag = 0.0

    async def send(request: Any, intended: float) -> None:
        try:
            response = await call(request, timeout=serving.REQUEST_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            if record is not None:
                record(None, error, intended + wall_offset, 0.0)
            return
        if record is not None:
            record(response, None, intended + wall_offset, clock() - intended)

    for i in itertools.count():
        intended = start + i / rate
        if intended - start >= seconds or stop.is_set():
            break
        delay = intended - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            lag = max(lag, -delay)
        task = asyncio.ensure_future(send(requests[i % len(requests)], intended))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        # Each call ends within its own deadline.
        await asyncio.wait(pending)
    return lag


@dataclasses.dataclass
class Records:
    """Every recorded request of one generator run, by intended send time (Unix)."""

    sent: np.ndarray
    latency: np.ndarray
    outcome: list[str]
    degradation: list[str]
    version: list[str]
    max_send_lag_ms: float
    started_at: float

    @classmethod
    def read(cls, path: Path, started_at: float) -> Records:
        raw = json.loads(path.read_text())
        return cls(
            sent=np.array(raw["sent"], dtype=np.float64),
            latency=np.array(
                [np.nan if value is None else value for value in raw["latency"]], dtype=np.float64
            ),
            outcome=raw["outcome"],
            degradation=raw["degradation"],
            version=raw["version"],
            max_send_lag_ms=raw["max_send_lag_ms"],
            started_at=started_at,
        )

    def window(self, low: float = -np.inf, high: float = np.inf) -> Window:
        chosen = np.flatnonzero((self.sent >= low) & (self.sent < high))
        latencies = self.latency[chosen]
        answered = sorted(latencies[~np.isnan(latencies)].tolist())
        outcomes = Counter(self.outcome[i] for i in chosen)
        return Window(
            requests=len(chosen),
            answered=len(answered),
            p50_ms=serving._percentile(answered, 50) * 1000,
            p99_ms=serving._percentile(answered, 99) * 1000,
            max_ms=(answered[-1] if answered else float("nan")) * 1000,
            paths=Counter({k: v for k, v in outcomes.items() if not k.startswith("error ")}),
            errors=Counter(
                {k.removeprefix("error "): v for k, v in outcomes.items() if k.startswith("error ")}
            ),
            degradations=Counter(self.degradation[i] for i in chosen if self.degradation[i]),
            seconds=(min(high, self.sent[-1]) - max(low, self.started_at)) if len(self.sent) else 0,
        )

    def first_ranked_on(self, version: str) -> float | None:
        """Intended send time of the first realtime-ranked answer from `version`."""
        for sent, outcome, answered_version in zip(
            self.sent, self.outcome, self.version, strict=True
        ):
            if outcome == "SERVING_PATH_REALTIME_RANKED" and answered_version == version:
                return float(sent)
        return None


@dataclasses.dataclass(frozen=True)
class Window:
    requests: int
    answered: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    paths: Counter[str]
    errors: Counter[str]
    degradations: Counter[str]
    seconds: float

    @property
    def degraded(self) -> int:
        return self.answered - self.paths.get("SERVING_PATH_REALTIME_RANKED", 0)

    def describe(self, name: str) -> str:
        paths = {k.removeprefix("SERVING_PATH_"): v for k, v in self.paths.items()}
        reasons = {k.replace("DEGRADATION_REASON_", ""): v for k, v in self.degradations.items()}
        return (
            f"  {name:<34} {self.requests:>6} requests over {self.seconds:6.1f} s: "
            f"p50 {self.p50_ms:6.2f} ms, p99 {self.p99_ms:7.2f} ms, max {self.max_ms:7.1f} ms\n"
            f"  {'':<34} answers {paths or '{}'}, degraded {self.degraded}"
            f"{f' {reasons}' if reasons else ''}, errors {dict(self.errors) or 0}"
        )


@contextlib.contextmanager
def generator(
    port: int, seconds: float, users_file: Path, workdir: Path, name: str
) -> Iterator[tuple[subprocess.Popen[str], Path, float]]:
    """A load generator run, yielded once its recorded run has started (with the Unix time it
    did); on exit it is stopped (SIGUSR1, then killed if it does not end)."""
    out = workdir / f"{name}.json"
    args = [
        sys.executable,
        __file__,
        "load",
        "--port",
        str(port),
        "--rate",
        str(RATE),
        "--seconds",
        str(seconds),
        "--warmup",
        str(WARMUP_S),
        "--users-file",
        str(users_file),
        "--out",
        str(out),
    ]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=serving.REPO_ROOT)
    try:
        if process.stdout is None:
            raise RuntimeError("the load generator's output pipe was not opened")
        ready, _, _ = select.select([process.stdout], [], [], GENERATOR_START_TIMEOUT_S)
        line = process.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(
                f"the load generator did not start within {GENERATOR_START_TIMEOUT_S:.0f} s "
                f"(exit code {process.poll()})"
            )
        yield process, out, float(json.loads(line)["started_at"])
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGUSR1)
        try:
            process.wait(timeout=GENERATOR_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def finished(
    process: subprocess.Popen[str], out: Path, started_at: float, timeout: float
) -> Records:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the load generator did not finish within {timeout:.0f} s") from None
    if process.returncode != 0 or not out.exists():
        raise RuntimeError(f"the load generator failed (exit code {process.returncode})")
    return Records.read(out, started_at)


def steady_load(
    services: dict[str, Service], users_file: Path, workdir: Path, duration: float
) -> tuple[Window, dict[str, float]]:
    pids = {name: service.process.pid for name, service in services.items()}
    with generator(services["gateway"].port, duration, users_file, workdir, "steady") as (
        process,
        out,
        started_at,
    ):
        cpu_before = serving.cpu_snapshot(pids)
        records = finished(process, out, started_at, duration + GENERATOR_STOP_TIMEOUT_S)
        cpu_after = serving.cpu_snapshot(pids)
    window = records.window()
    cpu_ms = {
        name: (cpu_after[name] - cpu_before[name]) * 1000 / max(window.answered, 1) for name in pids
    }
    print(f"Recommend REALTIME at {RATE} rps, {serving.COUNT} ads, random users:")
    print(window.describe("steady load"))
    print(
        "  CPU ms per answer: "
        + ", ".join(f"{name} {ms:.2f}" for name, ms in cpu_ms.items())
        + f"; generator's largest send lag {records.max_send_lag_ms:.1f} ms",
        flush=True,
    )
    return window, cpu_ms


# ---------------------------------------------------------------- hot reload


@dataclasses.dataclass
class Reload:
    source: str
    target: str
    copy_s: float
    restored: int
    dbsize_growth: int
    commit_s: float
    switch_at: float
    #: When each service's metrics first showed the new version (Unix), None when never.
    seen_at: dict[str, float | None]
    #: The ranking service's own load timestamp of the new version.
    ranking_loaded_at: float | None
    first_ranked_at: float | None
    windows: dict[str, Window]
    whole: Window
    max_send_lag_ms: float
    removed: list[str]

    @property
    def reload_s(self) -> float | None:
        if self.ranking_loaded_at is None:
            return None
        return self.ranking_loaded_at - self.switch_at


def has_room(client: Any, families: dict[str, dict[str, int]]) -> str | None:
    """Why Redis cannot take a second copy of the version, or None when it can."""
    info = client.info("memory")
    maxmemory = int(info.get("maxmemory", 0))
    needed = sum(row["bytes"] for row in families.values())
    used = used_memory(client)
    if maxmemory and used + needed > MAXMEMORY_MARGIN * maxmemory:
        return (
            f"the copy needs about {needed / MIB:,.0f} MiB more, used_memory is "
            f"{used / MIB:,.0f} MiB of maxmemory {maxmemory / MIB:,.0f} MiB"
        )
    return None


def hot_reload(
    client: Any,
    source: str,
    services: dict[str, Service],
    users_file: Path,
    workdir: Path,
    args: argparse.Namespace,
) -> Reload:
    meta = store.read_meta(client, source)
    tail = QUICK_TAIL_S if args.quick else TAIL_S
    budget = args.copy_timeout + args.reload_timeout + tail + 60
    kept = [version for version in store.list_versions(client) if version != source]
    with generator(services["gateway"].port, budget, users_file, workdir, "reload") as (
        process,
        out,
        started_at,
    ):
        dbsize = client.dbsize()
        copy_started = time.monotonic()
        # Nothing is pruned inside the commit, so the switch is all the commit times; the
        # catalog is pruned once the load has stopped.
        with Publication(client, keep_versions=len(kept) + 1) as publication:
            target = publication.version
            print(f"copying {source} to {target} under {RATE} rps ...", flush=True)
            restored = copy_version(client, publication, source, copy_started + args.copy_timeout)
            copy_s = time.monotonic() - copy_started
            dbsize_growth = client.dbsize() - dbsize
            print(f"  {restored:,} keys copied in {copy_s:.1f} s; committing", flush=True)
            switch_at = time.time()
            publication.commit(_copy_content(meta, source))
            commit_s = time.time() - switch_at
        seen_at = _wait_for_version(services, target, args.reload_timeout)
        ranking_loaded_at = None
        if seen_at["ranking"] is not None:
            with contextlib.suppress(OSError):
                ranking_loaded_at = scrape(services["ranking"].metrics_port).loaded_at
        time.sleep(tail)
        process.send_signal(signal.SIGUSR1)
        records = finished(process, out, started_at, GENERATOR_STOP_TIMEOUT_S)
    served_at = ranking_loaded_at if ranking_loaded_at is not None else np.inf
    windows = {
        f"while {source} is copied": records.window(high=switch_at),
        "switch -> ranking serves it": records.window(switch_at, served_at),
        "after": records.window(served_at),
    }
    return Reload(
        source=source,
        target=target,
        copy_s=copy_s,
        restored=restored,
        dbsize_growth=dbsize_growth,
        commit_s=commit_s,
        switch_at=switch_at,
        seen_at=seen_at,
        ranking_loaded_at=ranking_loaded_at,
        first_ranked_at=records.first_ranked_on(target),
        windows=windows,
        whole=records.window(),
        max_send_lag_ms=records.max_send_lag_ms,
        removed=prune(client, args.keep_versions, grace=0),
    )


def _copy_content(meta: VersionMeta | None, source: str) -> VersionContent:
    content = meta.content if meta is not None else VersionContent()
    # The report is free-form: it tells an operator this version is a benchmark's copy.
    return dataclasses.replace(
        content, report={**content.report, "copied_from": source, "copied_by": Path(__file__).name}
    )


def _wait_for_version(
    services: dict[str, Service], version: str, timeout: float
) -> dict[str, float | None]:
    seen: dict[str, float | None] = dict.fromkeys(services)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(at is None for at in seen.values()):
        for name, service in services.items():
            if seen[name] is None:
                with contextlib.suppress(OSError):
                    if version in scrape(service.metrics_port).versions:
                        seen[name] = time.time()
        time.sleep(METRICS_POLL_S)
    return seen


def print_reload(reload: Reload) -> None:
    print(
        f"  commit (metadata, switch of adrec:active) {reload.commit_s * 1000:.1f} ms; "
        f"{reload.restored:,} keys restored, Redis grew by {reload.dbsize_growth:,} keys"
    )
    for name, at in reload.seen_at.items():
        shown = f"{at - reload.switch_at:.2f} s" if at is not None else "never"
        print(f"  {name} metrics show {reload.target}: {shown} after the switch")
    if reload.reload_s is not None:
        print(f"  ranking swapped in {reload.target} {reload.reload_s:.2f} s after the switch")
    if reload.first_ranked_at is not None:
        print(
            f"  first answer ranked on {reload.target}: sent "
            f"{reload.first_ranked_at - reload.switch_at:.2f} s after the switch"
        )
    for name, window in reload.windows.items():
        print(window.describe(name))
    print(f"  generator's largest send lag {reload.max_send_lag_ms:.1f} ms")
    print(
        f"  {reload.target} (a copy of {reload.source}, the same data) is left active; "
        f"pruned {', '.join(reload.removed) or 'nothing'}; `adrec publish rollback "
        f"{reload.source}` makes {reload.source} active again",
        flush=True,
    )


# ---------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> int:
    problem = validate_url(args.redis)
    if problem:
        print(f"--redis {redacted(args.redis)} {problem}", file=sys.stderr)
        return 2
    redis_settings = dataclasses.replace(
        settings.load(RedisSettings), url=args.redis, socket_timeout_s=COMMAND_TIMEOUT_S
    )
    client = connect(redis_settings)
    source = store.active_version(client)
    if source is None:
        print(f"{redacted(args.redis)} has no active version: publish one with `adrec job run`")
        return 2
    print(
        "machine load average (1, 5, 15 min) at the start: "
        + ", ".join(f"{load:.1f}" for load in os.getloadavg())
        + f" on {os.cpu_count()} cores; Redis {redacted(args.redis)}",
        flush=True,
    )
    families = version_size(client, source)
    users = sample_users(client, source)
    if not users:
        print(f"version {source} has no recall lists to draw users from", file=sys.stderr)
        return 2
    print(f"{len(users):,} users drawn from {source}'s recall lists", flush=True)
    duration = QUICK_DURATION_S if args.quick else DURATION_S
    reload: Reload | None = None
    #: Why the hot reload was not measured; None when it was or is still to be.
    missed = None if args.no_reload else has_room(client, families)
    with tempfile.TemporaryDirectory(prefix="adrec-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        users_file = workdir / "users.json"
        users_file.write_text(json.dumps(users))
        try:
            services = start_services(stack, args.redis, args.serving_timeout)
        except RuntimeError as error:
            print(f"FAIL  {error}", file=sys.stderr)
            return 1
        print(
            "started: "
            + ", ".join(f"{name} SERVING {s.start_s:.1f} s" for name, s in services.items())
            + " after process start (ranking alone, then recall and the gateway together)",
            flush=True,
        )
        loaded = scrape(services["ranking"].metrics_port).versions
        if source not in loaded:
            print(f"ranking reports version {loaded}, not {source}", file=sys.stderr)
            return 1
        memory = {"after load-up": print_memory(services, "after load-up")}
        steady, _ = steady_load(services, users_file, workdir, duration)
        memory["after the steady load"] = print_memory(services, "after the steady load")
        if missed is None and not args.no_reload:
            try:
                reload = hot_reload(client, source, services, users_file, workdir, args)
            except (PublishLockedError, LockLostError, TimeoutError) as error:
                # The publication removed its partial copy; the source stays active.
                missed = str(error)
        if reload is not None:
            print(f"hot reload {reload.source} -> {reload.target}:")
            print_reload(reload)
            memory["after the reload"] = print_memory(services, "after the reload")
        elif missed is not None:
            print(f"hot reload not measured: {missed}", flush=True)
    client.close()
    return report(services, steady, reload, missed, memory)


def report(
    services: dict[str, Service],
    steady: Window,
    reload: Reload | None,
    missed: str | None,
    memory: dict[str, dict[str, tuple[int, int]]],
) -> int:
    ranking_start = services["ranking"].start_s
    checks = [
        (
            f"ranking start (process start -> SERVING, model and ad table loaded): "
            f"{ranking_start:.1f} s",
            ranking_start <= TARGET_START_S,
            f"<= {TARGET_START_S:g} s",
        ),
        (
            f"Recommend p99 at {RATE} rps: {steady.p99_ms:.2f} ms "
            f"(p50 {steady.p50_ms:.2f} ms, {steady.errors.total()} errors, "
            f"{steady.degraded} degraded of {steady.requests})",
            steady.p99_ms <= serving.TARGET_P99_AT_100_S * 1000 and not steady.errors,
            f"<= {serving.TARGET_P99_AT_100_S * 1000:g} ms, no errors",
        ),
    ]
    if reload is not None:
        during = reload.windows["switch -> ranking serves it"]
        seconds = reload.reload_s
        checks += [
            (
                f"hot reload (switch -> ranking serves {reload.target}): "
                + (f"{seconds:.2f} s" if seconds is not None else "not within --reload-timeout"),
                seconds is not None and seconds <= TARGET_RELOAD_S,
                f"<= {TARGET_RELOAD_S:g} s",
            ),
            (
                f"errors under the reload: {during.errors.total()} of {during.requests} requests "
                f"from the switch until ranking served {reload.target} ({during.degraded} "
                f"degraded answers), {reload.whole.errors.total()} of {reload.whole.requests} "
                f"from the copy's start to the end ({reload.whole.degraded} degraded)",
                not reload.whole.errors,
                "0",
            ),
        ]
    if missed is not None:
        checks.append((f"hot reload not measured: {missed}", False, f"<= {TARGET_RELOAD_S:g} s"))
    print()
    print(
        "machine load average (1, 5, 15 min) at the end: "
        + ", ".join(f"{load:.1f}" for load in os.getloadavg())
    )
    for text, passed, target in checks:
        print(f"{'PASS' if passed else 'FAIL'}  {text}  (target {target})")
    print("INFO  resident memory per service, MiB (VmRSS / peak VmHWM):")
    for when, readings in memory.items():
        print(
            f"        {when:<22} "
            + ", ".join(
                f"{name} {rss / MIB:,.0f} / {peak / MIB:,.0f}"
                for name, (rss, peak) in readings.items()
            )
        )
    return 0 if all(passed for _, passed, _ in checks) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", help="URL of the Redis holding the published version")
    parser.add_argument("--quick", action="store_true", help="shorter load runs")
    parser.add_argument("--no-reload", action="store_true", help="skip the hot reload")
    parser.add_argument(
        "--keep-versions",
        type=int,
        default=JobConfig.keep_versions,
        help="previous versions the catalog keeps after the reload (default: the job's, "
        "%(default)s)",
    )
    parser.add_argument("--serving-timeout", type=float, default=120.0, metavar="SECONDS")
    parser.add_argument("--copy-timeout", type=float, default=900.0, metavar="SECONDS")
    parser.add_argument("--reload-timeout", type=float, default=120.0, metavar="SECONDS")
    commands = parser.add_subparsers(dest="command")
    generator_args = commands.add_parser("load", help="(internal) the load generator")
    generator_args.add_argument("--port", type=int, required=True)
    generator_args.add_argument("--rate", type=int, required=True)
    generator_args.add_argument("--seconds", type=float, required=True)
    generator_args.add_argument("--warmup", type=float, required=True)
    generator_args.add_argument("--users-file", required=True)
    generator_args.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.command == "load":
        load(args.port, args.rate, args.seconds, args.warmup, args.users_file, args.out)
        return 0
    if not args.redis:
        parser.error("--redis is required")
    if args.keep_versions < 0:
        parser.error("--keep-versions must be 0 or more")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
