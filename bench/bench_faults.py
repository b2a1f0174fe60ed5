"""Serving under faults: what callers of Recommend see while Redis, a service or a run breaks.

Run: ``.venv/bin/python bench/bench_faults.py`` (run time in docs/performance.md);
``--quick`` for a run of about two minutes, ``--cases a,b`` for some cases only, ``--list``
for the cases.

Everything runs on this machine, every connection to 127.0.0.1:

1. The data: the batch job (``adrec job run``) on the synthetic ``tiny`` data set publishes
   into a private redis-server. ``--quick`` (or ``--no-job``) publishes the test suite's
   version instead (``tests/service_data.py``: the same writers and the job's own offline
   scoring, without Spark). Redis keeps an append-only file, so a killed Redis comes back
   with its data as a persistent one does; the case that restarts it empty removes the
   file first. The Redis Cluster cases copy the same keys into a private three-node cluster.
2. The three services run as separate processes (``adrec serve recall|ranking|gateway``)
   with their default settings (unless the environment sets them) on free ports, so each
   can be killed, stopped or sent SIGTERM on its own, and restarted on its port.
3. A load generator in its own process sends Recommend (REALTIME, 10 ads, users with a
   recall list) open-loop at a fixed rate with a 500 ms caller deadline: every request
   goes out on schedule whether or not earlier ones have been answered. After the last one
   it waits the deadline plus 3 s; a request not resolved either way by then is *lost*.
4. Each case applies one fault under that load, puts things back, and the next case starts
   once the services are SERVING and answer realtime-ranked again. A health poller asks
   every service's readiness, liveness and data health every 0.25 s throughout.

Printed per case: requests sent, answered, degraded (with the degradation reasons of the
answers), errors (by gRPC code), lost, and late (answered OK after the caller's deadline,
by the latency the client measured from the send), then the case's own checks.

Targets: in every case 0 lost and 0 late; where a fallback exists, also no error codes but
the ones the case expects (RESOURCE_EXHAUSTED for calls shed in a burst, INVALID_ARGUMENT
for bad requests) and no empty answers; the checks of each case (readiness, data-loss
detection, the catalog's state after a publishing fault, ...) pass; and no service logs a
traceback. The exit status is 1 when any target is missed, with a line naming the case.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import functools
import importlib.util
import itertools
import json
import math
import os
import queue
import random
import shutil
import signal
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import redis
import redis.cluster
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from redis.crc import key_slot

from adrec.api.gateway.v1 import gateway_service_pb2 as gateway_pb2
from adrec.core import keys, store
from adrec.core.catalog import LockLostError, Publication, PublishLockedError, rollback
from adrec.core.dataset import PIDS
from adrec.core.metadata import VersionContent
from adrec.core.redis_server import (
    PrivateCluster,
    PrivateRedis,
    free_port,
    private_cluster,
    private_redis,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
ADREC = (sys.executable, "-c", "import sys; from adrec.cli import main; sys.exit(main())")
SERVICES = ("recall", "ranking", "gateway")
RECOMMEND = "/adrec.gateway.v1.GatewayService/Recommend"
PID = PIDS[0]
COUNT = 10
RATE, QUICK_RATE = 200, 100
SECONDS, QUICK_SECONDS = 8.0, 3.0
DEADLINE_S = 0.5
#: How long after the last send a request may still resolve before it counts as lost.
LOST_GRACE_S = 3.0
#: The load generators time their own event loop with sleeps this long; a stall is a wake-up
#: later than that again, and explains a late answer seen within STALL_WINDOW_S of its end.
LOOP_TICK_S = 0.002
STALL_WINDOW_S = 0.1
#: Share of the load window at which a fault starts, and at which it is undone.
FAULT_AT, RECOVER_AT = 0.25, 0.65
#: Bursts of concurrent calls (the issue's 2,000 and 3,000), at these shares of the window.
BURSTS = ((0.3, 2000), (0.6, 3000))
USERS_SAMPLED = 2000
#: Keys the bench keeps in Redis: a killed Redis restarts with them.
AOF_DIR = "aof"
AOF_ARGS = ("--appendonly", "yes", "--appenddirname", AOF_DIR)
KEEP_VERSIONS = 2
#: The bench's publishes keep a replaced version this long (the job keeps it
#: DEFAULT_PRUNE_GRACE_SECONDS): above the services' 2 s poll, yet short enough for the
#: rollback case to wait it out and race a prune that does delete the version it asks for.
PRUNE_GRACE_S = 5.0
#: A run paused past this lease loses the publish lock (the bench's paused run only).
LOCK_TTL_S = 1.0
ROLLBACK_ROUNDS = 3
#: Longest time for a service to leave rotation when Redis goes away (readiness polls
#: every ADREC_RELOAD_INTERVAL_SECONDS, 2 s by default).
READINESS_S = 5.0
#: Longest time for a loss of data in Redis to show in some service's health.
LOSS_DETECTION_S = 10.0
#: A readiness answer this long after Redis came back reflects a poll of the Redis that
#: came back, not of the moment it was away (the poll interval plus the Redis timeout).
STALE_POLL_S = 3.5
#: Longest time for ranked answers to come back once Redis is: recall and ranking report
#: SERVING at their next readiness poll, and the gateway calls them again once they do.
RECOVERY_S = 5.0
#: Longest time for every service to be SERVING again once Redis is back.
REJOIN_S = 15.0
SERVING_TIMEOUT_S = 60.0
JOB_TIMEOUT_S = 1800.0
#: A refused `adrec job run` stops before Spark starts, in the time Python takes to import it.
JOB_REFUSAL_S = 30.0
HEALTH_POLL_S = 0.25
OVERSIZED = 900_000
#: Bad requests take every this-many-th send of the bad-input case.
INTERLEAVE_EVERY = 10
MAX_ERROR_DETAILS = 300
MAX_LOG_LINE = 16 * 1024
#: Ad ids no published ad table holds (the generators draw ids below 2,100,000).
UNKNOWN_ADS = np.arange(2_000_000_001, 2_000_000_021)
SECRET = "bench-secret-password"
BENCH_CLIENT = "adrec-bench"
OK = "OK"
LOST = "LOST"
RANKED = "REALTIME_RANKED"


# ---------------------------------------------------------------- outcomes and counts


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How one request ended, as its caller saw it."""

    tag: str
    #: OK, a gRPC status code name, or LOST.
    code: str
    #: From the send to the answer or error; NaN when lost.
    latency_s: float
    path: str = ""
    reasons: tuple[str, ...] = ()
    ads: int = 0
    data_version: str = ""
    #: Intended send time (Unix).
    sent_at: float = 0.0
    #: When the caller's code got the answer or error (Unix); NaN when lost.
    done_at: float = math.nan


@dataclasses.dataclass
class Counts:
    sent: int = 0
    answered: int = 0
    degraded: int = 0
    reasons: Counter[str] = dataclasses.field(default_factory=Counter)
    errors: Counter[str] = dataclasses.field(default_factory=Counter)
    lost: int = 0
    late: int = 0
    #: Of the late answers, those the caller's own event loop held back: gRPC enforces the
    #: deadline in the caller's transport, so an OK there came in time, and the caller's
    #: code saw it only after a stall of its loop at least as long as the lateness.
    late_own: int = 0
    empty: int = 0
    paths: Counter[str] = dataclasses.field(default_factory=Counter)
    latencies: list[float] = dataclasses.field(default_factory=list)

    def percentile_ms(self, percent: float) -> float:
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        index = min(len(ordered) - 1, max(math.ceil(percent / 100 * len(ordered)) - 1, 0))
        return ordered[index] * 1000


#: Counted as a reason when a non-realtime answer names none.
NO_REASON_GIVEN = "NONE_GIVEN"
NO_RECALL_SET = "NO_RECALL_SET"
#: Degradations a loaded machine causes by itself: a downstream's deadline exceeded, and
#: what follows it (the offline list is read only after another degradation, and it may
#: live where the fault is).
MACHINE_NOISE = frozenset(
    {"RECALL_DEADLINE_EXCEEDED", "RANKING_DEADLINE_EXCEEDED", "NO_OFFLINE_LIST"}
)


def count(
    outcomes: Iterable[Outcome], deadline_s: float, stalls: Sequence[tuple[float, float]] = ()
) -> Counts:
    """Sent, answered, degraded (by reason), errors (by code), lost and late requests.

    An answer is degraded when it is not realtime-ranked or names a degradation reason; it
    is late when its latency exceeds `deadline_s` though it came back OK, and its caller's
    own when one of `stalls` (end time, length) of the caller's event loop ended within
    STALL_WINDOW_S of the answer and lasted at least its lateness.
    """
    counts = Counts()
    for outcome in outcomes:
        counts.sent += 1
        if outcome.code == LOST:
            counts.lost += 1
        elif outcome.code != OK:
            counts.errors[outcome.code] += 1
        else:
            counts.answered += 1
            counts.paths[outcome.path] += 1
            counts.latencies.append(outcome.latency_s)
            if outcome.latency_s > deadline_s:
                counts.late += 1
                lateness = outcome.latency_s - deadline_s
                if any(
                    abs(ended - outcome.done_at) <= STALL_WINDOW_S and length >= lateness
                    for ended, length in stalls
                ):
                    counts.late_own += 1
            if outcome.reasons or outcome.path != RANKED:
                counts.degraded += 1
                counts.reasons.update(outcome.reasons or (NO_REASON_GIVEN,))
            if not outcome.ads:
                counts.empty += 1
    return counts


@dataclasses.dataclass(frozen=True)
class Expectation:
    """What a group of requests of a case must get, besides 0 lost and 0 late."""

    #: Error codes that are the right answer here (the rest miss the target).
    allowed_errors: frozenset[str] = frozenset()
    #: Every request must end with this code (bad requests: INVALID_ARGUMENT).
    only_code: str | None = None
    #: Users a fault does not touch: no answer may be degraded for another reason than
    #: MACHINE_NOISE, which a busy machine causes now and then without any fault (the
    #: baseline case shows how often).
    untouched: bool = False
    #: A fallback exists, so every answer must hold ads.
    fallback: bool = True
    #: Every user the load asks for has a recall list, so an answer saying NO_RECALL_SET
    #: means Redis lost it or a reader followed a version being deleted.
    recall_sets: bool = True
    #: A caller whose own event loop is saturated (a burst of thousands of calls): its
    #: late answers held back by its own loop (Counts.late_own) are not the server's.
    own_stalls_excused: bool = False


def misses(counts: Counts, expected: Expectation) -> list[str]:
    """Why `counts` misses the targets `expected` sets, one phrase each; [] when it meets them."""
    found = []
    if counts.lost:
        found.append(f"{counts.lost} lost")
    late = counts.late - counts.late_own if expected.own_stalls_excused else counts.late
    if late:
        found.append(f"{late} answered after the deadline")
    if expected.only_code is not None:
        matched = counts.answered if expected.only_code == OK else counts.errors[expected.only_code]
        other = counts.sent - counts.lost - matched
        if other:
            found.append(f"{other} not {expected.only_code}")
        return found
    unexpected = Counter(
        {code: n for code, n in counts.errors.items() if code not in expected.allowed_errors}
    )
    if unexpected:
        found.append(f"errors {by_name(unexpected)}")
    if expected.fallback and counts.empty:
        found.append(f"{counts.empty} empty answers")
    if expected.recall_sets and counts.reasons[NO_RECALL_SET]:
        found.append(f"{counts.reasons[NO_RECALL_SET]} answers without the user's recall list")
    by_fault = Counter({r: n for r, n in counts.reasons.items() if r not in MACHINE_NOISE})
    if expected.untouched and by_fault:
        found.append(f"degraded ({by_name(by_fault)})")
    return found


def by_name(counter: Counter[str]) -> str:
    """`Counter({"RECALL_UNAVAILABLE": 3})` -> "recall_unavailable 3", most frequent first."""
    return ", ".join(f"{name.lower()} {n}" for name, n in counter.most_common())


# ---------------------------------------------------------------- the load generator


def generate() -> int:
    """(internal) The load generator: runs the plan each stdin line names, one at a time."""
    from services.runtime import loop

    loop.run(_generate())
    return 0


async def _generate() -> None:
    import asyncio

    print(json.dumps({"ready": True}), flush=True)
    while True:
        line = (await asyncio.to_thread(sys.stdin.readline)).strip()
        if not line:
            return
        plan = json.loads(Path(line).read_text())
        result = await _run_plan(plan)
        Path(plan["out"]).write_text(json.dumps(result))
        print(json.dumps({"done": True}), flush=True)


async def _run_plan(plan: dict[str, Any]) -> dict[str, Any]:
    """Open-loop sends at the plan's rate, and its bursts; every request's record."""
    import asyncio

    templates = [(tag, base64.b64decode(body)) for tag, body in plan["templates"]]
    interleaved = [(tag, base64.b64decode(body)) for tag, body in plan["interleaved"]]
    rate, seconds, deadline = plan["rate"], plan["seconds"], plan["deadline"]
    # A caller reconnects quickly to a restarted gateway.
    options = [
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
    records: list[list[Any]] = []
    #: "tag code" -> [first details, longest details length].
    details: dict[str, list[Any]] = {}
    inflight: dict[int, tuple[str, float]] = {}
    #: [end (Unix), length] of each stall of this process's event loop.
    stalls: list[list[float]] = []
    # uvloop's loop.time() counts whole milliseconds: latencies need a finer clock.
    clock = time.perf_counter
    serial = itertools.count()
    tasks: set[asyncio.Future[None]] = set()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plan['port']}", options=options) as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(RECOMMEND)
        start = clock() + 0.05
        wall = time.time() - clock()
        print(json.dumps({"started_at": start + wall}), flush=True)

        async def watch_loop() -> None:
            while True:
                before = clock()
                await asyncio.sleep(LOOP_TICK_S)
                stall = clock() - before - LOOP_TICK_S
                if stall > LOOP_TICK_S:
                    stalls.append([clock() + wall, stall])

        watcher = asyncio.ensure_future(watch_loop())

        async def one(key: int, body: bytes, tag: str, intended: float) -> None:
            sent = clock()
            try:
                raw = await call(body, timeout=deadline)
            except grpc.aio.AioRpcError as error:
                code = error.code().name
                text = error.details() or ""
                seen = details.setdefault(f"{tag} {code}", [text[:200], 0])
                seen[1] = max(seen[1], len(text))
                done = clock()
                records.append(
                    [tag, intended + wall, code, done - sent, "", [], 0, "", done + wall]
                )
            else:
                done = clock()
                latency = done - sent
                response = gateway_pb2.RecommendResponse.FromString(raw)
                records.append(
                    [
                        tag,
                        intended + wall,
                        OK,
                        latency,
                        gateway_pb2.ServingPath.Name(response.serving_path).removeprefix(
                            "SERVING_PATH_"
                        ),
                        [
                            gateway_pb2.DegradationReason.Name(reason).removeprefix(
                                "DEGRADATION_REASON_"
                            )
                            for reason in response.degradation_reasons
                        ],
                        len(response.ads),
                        response.data_version,
                        done + wall,
                    ]
                )
            finally:
                del inflight[key]

        def launch(body: bytes, tag: str, intended: float) -> None:
            # Registered at once: a request counts from the moment it is due, even if the
            # event loop only gets to send it later.
            key = next(serial)
            inflight[key] = (tag, intended + wall)
            task = asyncio.ensure_future(one(key, body, tag, intended))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        lag = 0.0
        for at, calls in sorted((float(at), int(calls)) for at, calls in plan["bursts"]):
            delay = start + at - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            for k in range(calls):
                launch(templates[k % len(templates)][1], "burst", start + at)
        for i in range(int(rate * seconds)):
            intended = start + i / rate
            delay = intended - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                lag = max(lag, -delay)
            if interleaved and i % INTERLEAVE_EVERY == INTERLEAVE_EVERY - 1:
                tag, body = interleaved[(i // INTERLEAVE_EVERY) % len(interleaved)]
            else:
                tag, body = templates[i % len(templates)]
            launch(body, tag, intended)
        if tasks:
            await asyncio.wait(set(tasks), timeout=deadline + LOST_GRACE_S)
        lost = list(inflight.values())
        for task in list(tasks):
            task.cancel()
        if tasks:
            await asyncio.wait(set(tasks), timeout=LOST_GRACE_S)
        watcher.cancel()
    records += [[tag, sent_at, LOST, None, "", [], 0, "", None] for tag, sent_at in lost]
    return {
        "records": records,
        "details": details,
        "max_send_lag_ms": lag * 1000,
        "stalls": {tag: stalls for tag in {record[0] for record in records}},
    }


class Lines:
    """The JSON lines a child process writes on stdout, read by a thread into a queue (a
    select() on a buffered pipe can miss a line already read into the buffer)."""

    def __init__(self, process: subprocess.Popen[str]):
        self.process = process
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        if self.process.stdout is not None:
            for line in self.process.stdout:
                self._lines.put(line)
        self._lines.put("")

    def expect(self, field: str, timeout: float) -> dict[str, Any]:
        """The next line, which must carry `field`."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"no {field!r} line within {timeout:.0f} s") from None
        if not line:
            raise RuntimeError(f"the process ended (exit code {self.process.wait()})")
        message: dict[str, Any] = json.loads(line)
        if field not in message:
            raise RuntimeError(f"expected {field!r}, got {message}")
        return message

    def tell(self, text: str) -> None:
        if self.process.stdin is not None:
            self.process.stdin.write(text + "\n")
            self.process.stdin.flush()


class Generator:
    """The load generator process, started once for the whole run."""

    def __init__(self, workdir: Path, name: str = "load"):
        self.workdir = workdir
        self.name = name
        self.process = subprocess.Popen(
            [sys.executable, __file__, "generate"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
        )
        self.lines = Lines(self.process)
        self.lines.expect("ready", 60)
        self._runs = itertools.count()

    def start(self, plan: dict[str, Any], label: str) -> tuple[float, Path]:
        """Run `plan`; its records go to the logs folder's records/<label>-<name>-<n>.json."""
        run = next(self._runs)
        records = self.workdir / "logs" / "records"
        records.mkdir(parents=True, exist_ok=True)
        out = records / f"{label}-{self.name}-{run}.json"
        plan_file = self.workdir / f"{self.name}-plan-{run}.json"
        plan_file.write_text(json.dumps({**plan, "out": str(out)}))
        self.lines.tell(str(plan_file))
        return float(self.lines.expect("started_at", 60)["started_at"]), out

    def finish(self, out: Path, timeout: float) -> dict[str, Any]:
        self.lines.expect("done", timeout)
        result: dict[str, Any] = json.loads(out.read_text())
        return result

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.lines.tell("")
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclasses.dataclass
class Load:
    """One load window of a case, from its generator's start (Unix time)."""

    started_at: float
    seconds: float
    outcomes: list[Outcome] = dataclasses.field(default_factory=list)
    #: "tag code" -> [first details, longest details length] of the errors.
    details: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    max_send_lag_ms: float = 0.0
    #: Request tag -> [(end, length)] of the stalls of its generator's event loop.
    stalls: dict[str, list[tuple[float, float]]] = dataclasses.field(default_factory=dict)

    def at(self, offset: float) -> float:
        """Sleep until `offset` seconds into the window; returns the Unix time then."""
        delay = self.started_at + offset - time.time()
        if delay > 0:
            time.sleep(delay)
        return time.time()

    def since(self, moment: float) -> float:
        return moment - self.started_at


def requests_for(users: Iterable[int], tag: str = "") -> list[list[str]]:
    """Generator templates: a REALTIME Recommend of COUNT ads for each user."""
    return [
        [
            tag,
            base64.b64encode(
                gateway_pb2.RecommendRequest(
                    user_id=int(user),
                    pid=PID,
                    count=COUNT,
                    mode=gateway_pb2.RECOMMEND_MODE_REALTIME,
                ).SerializeToString()
            ).decode(),
        ]
        for user in users
    ]


def mixed(*groups: list[list[str]]) -> list[list[str]]:
    templates = [template for group in groups for template in group]
    random.Random(0).shuffle(templates)
    return templates


# ---------------------------------------------------------------- processes


@dataclasses.dataclass
class Service:
    """One `adrec serve` process on fixed ports, so a restart comes back where it was."""

    name: str
    target: str
    env: dict[str, str]
    port: int
    metrics_port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*ADREC, "serve", self.target],
                env={**os.environ, **self.env},
                cwd=REPO_ROOT,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def send(self, signum: int) -> None:
        if self.process is not None and self.alive:
            self.process.send_signal(signum)

    def kill(self) -> None:
        if self.process is not None and self.alive:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is None or not self.alive:
            return
        self.process.send_signal(signal.SIGCONT)
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def wait_serving(self, timeout: float = SERVING_TIMEOUT_S) -> None:
        from services.runtime.health import wait_until_serving

        if not wait_until_serving(self.address, timeout):
            state = (
                "running" if self.alive else f"exited with {self.process and self.process.poll()}"
            )
            raise RuntimeError(f"{self.name} was not SERVING within {timeout:.0f} s ({state})")


def service_env(
    name: str, ports: dict[str, int], metrics_port: int, redis_url: str, cluster: bool
) -> dict[str, str]:
    env = {
        "REDIS_URL": redis_url,
        "REDIS_CLUSTER": "true" if cluster else "false",
        "ADREC_HOST": "127.0.0.1",
        "ADREC_LOG_LEVEL": "info",
        f"ADREC_{name.upper()}_PORT": str(ports[name]),
        "ADREC_METRICS_PORT": str(metrics_port),
    }
    if name == "gateway":
        env["ADREC_RECALL_ADDRESS"] = f"127.0.0.1:{ports['recall']}"
        env["ADREC_RANKING_ADDRESS"] = f"127.0.0.1:{ports['ranking']}"
    return env


def bench_client(url: str, cluster: bool) -> Any:
    """The bench's own client, named so its connections are told from the services'."""
    if cluster:
        return redis.cluster.RedisCluster.from_url(url, client_name=BENCH_CLIENT, socket_timeout=10)
    return redis.Redis.from_url(url, client_name=BENCH_CLIENT, socket_timeout=10)


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """`items` in lists of `size` (itertools.batched is Python 3.12's)."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def snapshot(client: Any) -> dict[bytes, bytes]:
    """Every key in Redis, DUMPed."""
    names = sorted(set(client.scan_iter(count=1000)))
    dumped: dict[bytes, bytes] = {}
    for batch in batched(names, 500):
        pipe = client.pipeline(transaction=False)
        for name in batch:
            pipe.dump(name)
        dumped.update((n, v) for n, v in zip(batch, pipe.execute(), strict=True) if v is not None)
    return dumped


def restore(client: Any, dumped: dict[bytes, bytes], names: Iterable[bytes] | None = None) -> None:
    """Put the DUMPed keys (all, or `names`) back as they were."""
    for batch in batched(dumped if names is None else names, 500):
        pipe = client.pipeline(transaction=False)
        for name in batch:
            pipe.restore(name, 0, dumped[name], replace=True)
        pipe.execute()


def missing(client: Any, names: Iterable[bytes]) -> int:
    absent = 0
    for batch in batched(names, 1000):
        pipe = client.pipeline(transaction=False)
        for name in batch:
            pipe.exists(name)
        absent += sum(1 for found in pipe.execute() if not found)
    return absent


def version_keys(client: Any, version: str, family: str = "") -> int:
    """Keys of `version` (of one key family when named), by a SCAN."""
    pattern = keys.version_pattern(version)
    if family:
        pattern = pattern[:-1] + f"{family}:*".encode()
    return sum(1 for _ in client.scan_iter(match=pattern, count=1000))


class Stack:
    """Redis (one server or a cluster), the three services over it, and what was published."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        redis_nodes: Sequence[PrivateRedis],
        url: str,
        cluster: PrivateCluster | None = None,
    ):
        self.name = name
        self.nodes = list(redis_nodes)
        self.cluster = cluster
        self.url = url
        self.client = bench_client(url, cluster is not None)
        ports = {service: free_port() for service in SERVICES}
        self.services: dict[str, Service] = {}
        for service in SERVICES:
            metrics = free_port()
            self.services[service] = Service(
                service,
                service,
                service_env(service, ports, metrics, url, cluster is not None),
                ports[service],
                metrics,
                workdir / "logs" / f"{name}-{service}.log",
            )
        self.version = ""
        self.saved: dict[bytes, bytes] = {}
        self.users: list[int] = []
        self.recall_lists = 0

    @property
    def redis(self) -> PrivateRedis:
        return self.nodes[0]

    @property
    def gateway(self) -> Service:
        return self.services["gateway"]

    def start(self) -> None:
        for service in self.services.values():
            service.start()
        for service in self.services.values():
            service.wait_serving()

    def stop(self) -> None:
        for service in self.services.values():
            service.stop()
        self.client.close()

    def rebase(self) -> None:
        """Take what Redis holds now as the state every case starts from."""
        active = store.active_version(self.client)
        if active is None:
            raise RuntimeError("Redis has no active version")
        self.version = active
        self.saved = snapshot(self.client)
        pattern = keys.RECALL.key(active, "*")
        if not self.users:
            found = self.client.scan_iter(match=pattern, count=1000)
            self.users = sorted(
                int(name.rsplit(b":", 1)[1]) for name in itertools.islice(found, USERS_SAMPLED)
            )
        self.recall_lists = version_keys(self.client, active, keys.RECALL.name)

    def restore(self) -> None:
        restore(self.client, self.saved)

    def complete(self, version: str | None) -> bool:
        """Whether `version` has its metadata and every recall list the baseline had."""
        return (
            version is not None
            and store.read_meta(self.client, version) is not None
            and version_keys(self.client, version, keys.RECALL.name) == self.recall_lists
        )

    def ensure_nodes(self) -> None:
        """Every Redis node running (a dead one restarted) and, for a cluster, ok."""
        for node in self.nodes:
            node.process.send_signal(signal.SIGCONT)
            if node.process.poll() is not None:
                node.restart()
        if self.cluster is not None:
            self.cluster.wait_ok()

    def ensure_baseline(self) -> None:
        """Redis up with the baseline's keys, every service SERVING and answering ranked."""
        self.ensure_nodes()
        if missing(self.client, self.saved):
            self.restore()
        for service in self.services.values():
            service.send(signal.SIGCONT)
            if not service.alive:
                service.start()
        for service in self.services.values():
            service.wait_serving()
        self.wait_ranked()

    def wait_ranked(self, timeout: float = SERVING_TIMEOUT_S) -> None:
        request = gateway_pb2.RecommendRequest(user_id=self.users[0], pid=PID, count=COUNT)
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.gateway.address) as channel:
            call = channel.unary_unary(
                RECOMMEND,
                request_serializer=gateway_pb2.RecommendRequest.SerializeToString,
                response_deserializer=gateway_pb2.RecommendResponse.FromString,
            )
            while time.monotonic() < deadline:
                with contextlib.suppress(grpc.RpcError):
                    answer = call(request, timeout=1.0)
                    if (
                        answer.serving_path == gateway_pb2.SERVING_PATH_REALTIME_RANKED
                        and answer.data_version == self.version
                    ):
                        return
                time.sleep(0.1)
        raise RuntimeError(f"the gateway did not answer ranked on {self.version} in {timeout} s")

    def connections(self) -> int:
        """Connections to Redis other than the bench's own."""
        clients = self.client.client_list()
        return sum(1 for each in clients if each.get("name") != BENCH_CLIENT)

    def log_sizes(self) -> dict[Path, int]:
        return {
            service.log_path: service.log_path.stat().st_size if service.log_path.exists() else 0
            for service in self.services.values()
        }


#: A health check failing with these codes found no server answering.
UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class HealthWatch:
    """Every service's readiness (overall health), liveness and data health (NOT_SERVING
    once the service found its version's data gone from Redis), asked every HEALTH_POLL_S."""

    def __init__(self, services: dict[str, Service]):
        self.ports = {name: service.port for name, service in services.items()}
        #: (Unix time, service, "readiness", "liveness" or "data", status name or UNREACHABLE).
        self.samples: list[tuple[float, str, str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        from services.runtime.app import DATA_HEALTH_NAME
        from services.runtime.health import LIVENESS_SERVICE_NAME

        options = [
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 500),
        ]
        channels = {
            name: grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
            for name, port in self.ports.items()
        }
        # types-grpcio-health-checking declares HealthStub without its methods.
        checks = {
            name: health_pb2_grpc.HealthStub(channel).Check  # type: ignore[attr-defined]
            for name, channel in channels.items()
        }
        probes = (
            ("readiness", ""),
            ("liveness", LIVENESS_SERVICE_NAME),
            ("data", DATA_HEALTH_NAME),
        )
        while not self._stop.wait(HEALTH_POLL_S):
            for name, check in checks.items():
                for probe, service in probes:
                    try:
                        answer = check(health_pb2.HealthCheckRequest(service=service), timeout=0.3)
                        status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
                    except grpc.RpcError as error:
                        code = error.code() if isinstance(error, grpc.Call) else None
                        status = "UNREACHABLE" if code in UNREACHABLE else f"error {code}"
                    self.samples.append((time.time(), name, probe, status))
        for channel in channels.values():
            channel.close()

    def seen(self, name: str, probe: str, low: float, high: float) -> Counter[str]:
        return Counter(
            status
            for at, service, kind, status in list(self.samples)
            if service == name and kind == probe and low <= at < high
        )

    def first(
        self, name: str, probe: str, after: float, status: str, negate: bool = False
    ) -> float | None:
        """The first sample after `after` with `status` (or, negated, with any other)."""
        for at, service, kind, found in list(self.samples):
            if at >= after and service == name and kind == probe and (found == status) != negate:
                return at
        return None

    def wait_for(self, condition: Callable[[], float | None], timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = condition()
            if found is not None:
                return found
            time.sleep(HEALTH_POLL_S)
        return condition()


# ---------------------------------------------------------------- publishing


def copy_version(client: Any, publication: Publication, source: str) -> int:
    """Copy every key of `source` but its metadata into the publication's version; returns
    the keys copied. The commit writes the new version's own metadata."""
    prefix = keys.version_pattern(source)[:-1]
    meta = keys.META.key(source)
    names = sorted({name for name in client.scan_iter(match=prefix + b"*", count=1000)} - {meta})
    for batch in batched(names, 500):
        # The writer refuses once the publish lock is lost, as the job's writers do.
        target = keys.version_pattern(publication.writer.version)[:-1]
        pipe = client.pipeline(transaction=False)
        for name in batch:
            pipe.dump(name)
        dumps = pipe.execute()
        pipe = client.pipeline(transaction=False)
        for name, dumped in zip(batch, dumps, strict=True):
            if dumped is not None:
                pipe.restore(target + name[len(prefix) :], 0, dumped, replace=True)
        pipe.execute()
    return len(names)


def publish_copy(client: Any, source: str) -> str:
    """A new version holding `source`'s data, published as a job publishes (and prunes)."""
    meta = store.read_meta(client, source)
    with Publication(client, keep_versions=KEEP_VERSIONS, prune_grace=PRUNE_GRACE_S) as publication:
        copy_version(client, publication, source)
        publication.commit(meta.content if meta is not None else VersionContent())
    return publication.version


def publisher(redis_url: str, source: str, lock_ttl: float) -> int:
    """(internal) A publishing run copying `source` that waits on stdin before its commit,
    so the bench can kill or pause it mid-publish."""
    client = redis.Redis.from_url(redis_url)
    meta = store.read_meta(client, source)
    with Publication(
        client, keep_versions=KEEP_VERSIONS, lock_ttl=lock_ttl, prune_grace=PRUNE_GRACE_S
    ) as publication:
        copied = copy_version(client, publication, source)
        print(json.dumps({"written": publication.version, "keys": copied}), flush=True)
        sys.stdin.readline()
        try:
            publication.commit(meta.content if meta is not None else VersionContent())
        except LockLostError as error:
            print(json.dumps({"result": "lock_lost", "detail": str(error)}), flush=True)
            return 0
    print(json.dumps({"result": "committed"}), flush=True)
    return 0


class Run:
    """A publishing child process (the job, or the bench's own publisher), in a process
    group of its own so a kill reaches every process it started and nothing else."""

    def __init__(self, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None):
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                args,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=REPO_ROOT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        self.lines = Lines(self.process)

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signum)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGCONT)
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def _sibling_module(name: str, path: Path) -> Any:
    # By path: tests/ and bench/ are folders of scripts, not packages.
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def publish_fixture(redis_url: str) -> None:
    """The test suite's published version (tests/service_data.py), without Spark."""
    service_data = _sibling_module("service_data", REPO_ROOT / "tests" / "service_data.py")
    client = redis.Redis.from_url(redis_url)
    service_data.publish_version(client)
    client.close()


def job_env(workdir: Path) -> dict[str, str]:
    # Spark's and the job's scratch files stay in the bench's folder, even of a killed run.
    scratch = workdir / "spark"
    scratch.mkdir(exist_ok=True)
    return {"SPARK_LOCAL_DIRS": str(scratch), "TMPDIR": str(scratch)}


def publish_with_job(data: Path, redis_url: str, workdir: Path) -> None:
    log_path = workdir / "logs" / "job.log"
    with log_path.open("wb") as log:
        result = subprocess.run(
            [*ADREC, "job", "run", "--data", str(data), "--redis", redis_url],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env={**os.environ, **job_env(workdir)},
            timeout=JOB_TIMEOUT_S,
            check=False,
        )
    if result.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the batch job failed with exit code {result.returncode}:\n{tail}")


# ---------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str = ""


@dataclasses.dataclass
class Result:
    """What a case function hands back: its load window and its own checks."""

    load: Load
    expect: dict[str, Expectation] = dataclasses.field(default_factory=dict)
    checks: list[Check] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Context:
    stack: Stack
    health: HealthWatch
    generator: Generator
    workdir: Path
    rate: int
    seconds: float
    job_data: Path
    use_job: bool
    resources: contextlib.ExitStack
    burster: Generator | None = None
    #: The case running, which names its records.
    case: str = ""
    _cluster: Context | None = None

    @property
    def fault_at(self) -> float:
        return self.seconds * FAULT_AT

    @property
    def recover_at(self) -> float:
        return self.seconds * RECOVER_AT

    @contextlib.contextmanager
    def load(
        self,
        templates: list[list[str]] | None = None,
        port: int | None = None,
        bursts: Sequence[tuple[float, int]] = (),
        interleaved: list[list[str]] | None = None,
        seconds: float | None = None,
    ) -> Iterator[Load]:
        """One load window (of the run's length unless told); `interleaved` requests take
        every INTERLEAVE_EVERY-th send."""
        seconds = seconds or self.seconds
        plan = {
            "port": port or self.stack.gateway.port,
            "deadline": DEADLINE_S,
            "templates": templates or requests_for(self.stack.users),
            "interleaved": interleaved or [],
        }
        started_at, out = self.generator.start(
            {**plan, "rate": self.rate, "seconds": seconds, "bursts": []}, self.case
        )
        # Bursts come from a process of their own, as from other clients: sending thousands
        # of calls at once would stall the steady load's own sends.
        burst_out = None
        if bursts:
            if self.burster is None:
                self.burster = Generator(self.workdir, "bursts")
                self.resources.callback(self.burster.close)
            _, burst_out = self.burster.start(
                {**plan, "rate": 0, "seconds": 0, "bursts": bursts}, self.case
            )
        load = Load(started_at, seconds)
        timeout = seconds + DEADLINE_S + 2 * LOST_GRACE_S + 60
        try:
            yield load
        finally:
            raw = self.generator.finish(out, timeout)
            if burst_out is not None and self.burster is not None:
                burst = self.burster.finish(burst_out, timeout)
                raw["records"] += burst["records"]
                raw["details"].update(burst["details"])
                raw["stalls"].update(burst["stalls"])
            load.outcomes = [
                Outcome(
                    tag,
                    code,
                    math.nan if latency is None else latency,
                    path,
                    tuple(reasons),
                    ads,
                    version,
                    sent_at,
                    math.nan if done_at is None else done_at,
                )
                for tag, sent_at, code, latency, path, reasons, ads, version, done_at in raw[
                    "records"
                ]
            ]
            load.details = raw["details"]
            load.stalls = {
                tag: [(ended, length) for ended, length in stalls]
                for tag, stalls in raw["stalls"].items()
            }
            load.max_send_lag_ms = raw["max_send_lag_ms"]

    def cluster(self) -> Context:
        """The same context over a private three-node Redis Cluster holding the same keys."""
        if self._cluster is None:
            nodes = self.resources.enter_context(private_cluster())
            client = bench_client(nodes.url, cluster=True)
            restore(client, self.stack.saved)
            client.close()
            stack = Stack("cluster", self.workdir, nodes.nodes, nodes.url, cluster=nodes)
            self.resources.callback(stack.stop)
            stack.start()
            stack.rebase()
            health = HealthWatch(stack.services)
            health.start()
            self.resources.callback(health.stop)
            self._cluster = dataclasses.replace(self, stack=stack, health=health)
        return self._cluster


def first_ranked(outcomes: Iterable[Outcome], after: float) -> float | None:
    """Intended send time of the first realtime-ranked answer sent after `after`."""
    return min(
        (o.sent_at for o in outcomes if o.path == RANKED and o.sent_at >= after), default=None
    )


def case_baseline(ctx: Context) -> Result:
    with ctx.load() as load:
        pass
    return Result(load, expect={"": Expectation(untouched=True)})


def case_redis_killed(ctx: Context) -> Result:
    server = ctx.stack.redis
    with ctx.load(seconds=ctx.recover_at + RECOVERY_S + 1) as load:
        killed = load.at(ctx.fault_at)
        server.process.kill()
        server.process.wait()
        load.at(ctx.recover_at)
        server.restart()
        back = time.time()
    again = first_ranked(load.outcomes, back)
    return Result(
        load,
        checks=[
            Check(
                f"realtime answers again within {RECOVERY_S:.0f} s of Redis' return",
                again is not None and again - back <= RECOVERY_S,
                f"first ranked answer sent {again - back:.2f} s after" if again else "none",
            )
        ],
        notes=[
            f"Redis killed (SIGKILL) at {load.since(killed):.1f} s, restarted with its "
            f"append-only file at {load.since(back):.1f} s"
        ],
    )


def case_redis_hung(ctx: Context) -> Result:
    server = ctx.stack.redis
    with ctx.load() as load:
        stopped = load.at(ctx.fault_at)
        server.process.send_signal(signal.SIGSTOP)
        try:
            resumed = load.at(ctx.recover_at)
        finally:
            server.process.send_signal(signal.SIGCONT)
    return Result(
        load,
        notes=[
            f"Redis stopped (SIGSTOP) from {load.since(stopped):.1f} to "
            f"{load.since(resumed):.1f} s at a {DEADLINE_S * 1000:.0f} ms caller deadline"
        ],
    )


def case_readiness(ctx: Context) -> Result:
    server, health = ctx.stack.redis, ctx.health
    with ctx.load() as load:
        load.at(ctx.fault_at)
        server.stop()
        stopped = time.time()
    # Down long enough for every service's poll to notice, then back.
    time.sleep(max(stopped + READINESS_S - time.time(), 0))
    server.restart()
    restarted = time.time()

    def rejoined() -> float | None:
        found = [
            health.first(name, "readiness", restarted, "SERVING") for name in ctx.stack.services
        ]
        return None if None in found else max(at for at in found if at is not None)

    back = health.wait_for(rejoined, REJOIN_S)
    checks = []
    gateway = health.seen("gateway", "readiness", stopped, restarted)
    checks.append(
        Check(
            "the gateway stays in rotation (SERVING) while Redis is down",
            set(gateway) == {"SERVING"},
            by_name(gateway),
        )
    )
    for name in ("recall", "ranking"):
        left = health.first(name, "readiness", stopped, "SERVING", negate=True)
        checks.append(
            Check(
                f"{name} leaves rotation within {READINESS_S:.0f} s",
                left is not None and left - stopped <= READINESS_S,
                f"after {left - stopped:.1f} s" if left is not None else "never",
            )
        )
    for name in ctx.stack.services:
        alive = health.seen(name, "liveness", stopped, restarted)
        checks.append(
            Check(
                f"{name} stays alive (liveness SERVING)", set(alive) == {"SERVING"}, by_name(alive)
            )
        )
    checks.append(
        Check(
            f"every service SERVING within {REJOIN_S:.0f} s of Redis' return",
            back is not None,
            f"after {back - restarted:.1f} s" if back is not None else "not yet",
        )
    )
    return Result(
        load,
        checks=checks,
        notes=[
            f"Redis stopped (SIGTERM) at {load.since(stopped):.1f} s, "
            f"for {restarted - stopped:.1f} s"
        ],
    )


def loss_detection(ctx: Context, since: float, what: str) -> Check:
    """Whether the services said they lost data within LOSS_DETECTION_S of `since`: their
    data health NOT_SERVING, or their readiness not SERVING from STALE_POLL_S on (Redis was
    back by then)."""

    def noticed(name: str) -> float | None:
        found = [
            ctx.health.first(name, "data", since, "NOT_SERVING"),
            ctx.health.first(name, "readiness", since + STALE_POLL_S, "SERVING", negate=True),
        ]
        return min((at for at in found if at is not None), default=None)

    def anyone() -> float | None:
        found = [noticed(name) for name in ctx.stack.services]
        return min((at for at in found if at is not None), default=None)

    detected = ctx.health.wait_for(anyone, max(since + LOSS_DETECTION_S - time.time(), 0))
    # The others get a poll interval more to notice too.
    time.sleep(max(min(detected or 0, since + LOSS_DETECTION_S) + 2.5 - time.time(), 0))
    seen = {name: noticed(name) for name in ctx.stack.services}
    return Check(
        f"{what} is detected within {LOSS_DETECTION_S:.0f} s (data health NOT_SERVING)",
        detected is not None and detected - since <= LOSS_DETECTION_S,
        ", ".join(
            f"{name} " + (f"after {at - since:.1f} s" if at is not None else "never")
            for name, at in seen.items()
        ),
    )


def case_redis_empty(ctx: Context) -> Result:
    server = ctx.stack.redis
    try:
        with ctx.load() as load:
            load.at(ctx.fault_at)
            server.stop()
            shutil.rmtree(server.workdir / AOF_DIR, ignore_errors=True)
            server.restart()
            emptied = time.time()
        detected = loss_detection(ctx, emptied, "Redis restarted empty")
    finally:
        ctx.stack.restore()
    after = count((o for o in load.outcomes if o.sent_at >= emptied + 0.5), DEADLINE_S)
    return Result(
        load,
        expect={"": Expectation(recall_sets=False)},
        checks=[detected],
        notes=[
            f"Redis restarted without its data at {load.since(emptied):.1f} s; answers sent "
            f"0.5 s later and after: {dict(after.paths)}, reasons {by_name(after.reasons)}"
        ],
    )


def case_downstream(name: str, how: str, ctx: Context) -> Result:
    service = ctx.stack.services[name]
    with ctx.load() as load:
        faulted = load.at(ctx.fault_at)
        if how == "killed":
            service.kill()
        else:
            service.send(signal.SIGSTOP)
        restored = load.at(ctx.recover_at)
        if how == "killed":
            service.start()
        else:
            service.send(signal.SIGCONT)
    again = first_ranked(load.outcomes, restored)
    return Result(
        load,
        notes=[
            f"{name} {'killed (SIGKILL)' if how == 'killed' else 'stopped (SIGSTOP)'} at "
            f"{load.since(faulted):.1f} s, "
            f"{'restarted' if how == 'killed' else 'resumed'} at {load.since(restored):.1f} s; "
            + (
                f"ranked answers again {again - restored:.1f} s later"
                if again is not None
                else "no ranked answer before the window ended"
            )
        ],
    )


def case_sigterm(name: str, ctx: Context) -> Result:
    service = ctx.stack.services[name]
    checks = []
    with ctx.load() as load:
        signalled = load.at(ctx.fault_at)
        service.send(signal.SIGTERM)
        if service.process is None:
            raise RuntimeError(f"{name} is not running")
        try:
            code: int | None = service.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            code = None
            service.kill()
        took = time.time() - signalled
        checks.append(
            Check(f"{name} drains and exits 0", code == 0, f"exit code {code} after {took:.2f} s")
        )
        restarted = load.at(max(ctx.recover_at, took + ctx.fault_at))
        service.start()
    expect = {"": Expectation(allowed_errors=frozenset({"UNAVAILABLE"}), fallback=False)}
    return Result(
        load,
        expect=expect if name == "gateway" else {},
        checks=checks,
        notes=[
            f"SIGTERM at {load.since(signalled):.1f} s; restarted at {load.since(restarted):.1f} s"
            + (
                "; callers of the one gateway have no fallback: UNAVAILABLE is the right answer, a "
                "caller retries another replica"
                if name == "gateway"
                else ""
            )
        ],
    )


def case_job_killed(ctx: Context) -> Result:
    stack, client = ctx.stack, ctx.stack.client
    active = stack.version
    log_path = ctx.workdir / "logs" / "job-killed.log"
    if ctx.use_job:
        run = Run(
            [*ADREC, "job", "run", "--data", str(ctx.job_data), "--redis", stack.url],
            log_path,
            job_env(ctx.workdir),
        )
    else:
        run = Run(
            [sys.executable, __file__, "publish", "--redis", stack.url, "--source", active],
            log_path,
        )
    try:
        pending = wait_for_recall_lists(client, active, run)
        with ctx.load() as load:
            killed = load.at(ctx.fault_at)
            run.kill()
            left = version_keys(client, pending)
    finally:
        run.kill()
    lease_ms = client.pttl(keys.PUBLISH_LOCK)
    # The dead run's lease would run out by itself; the bench does not wait for it.
    client.delete(keys.PUBLISH_LOCK)
    with Publication(client, keep_versions=KEEP_VERSIONS):
        # Entering is enough: holding the lock, a run removes the versions killed runs left.
        pass
    after_cleanup = version_keys(client, pending)
    served = sum(1 for o in load.outcomes if o.data_version == pending)
    what = "the batch job" if ctx.use_job else "a publishing run"
    return Result(
        load,
        checks=[
            Check(
                "the active version is unchanged", store.active_version(client) == active, active
            ),
            Check("no answer came from the killed run's version", served == 0, f"{served} did"),
            Check(
                "the killed run's lock expires by itself",
                lease_ms > 0,
                f"{lease_ms / 1000:.0f} s of its lease were left",
            ),
            Check(
                "the next run removes the killed run's keys",
                after_cleanup == 0 and not client.sismember(keys.PENDING_VERSIONS, pending),
                f"{left} keys of {pending} left by the kill, {after_cleanup} after the next run",
            ),
        ],
        notes=[
            f"{what} writing {pending} killed (SIGKILL, its process group) at "
            f"{load.since(killed):.1f} s"
        ],
    )


def wait_for_recall_lists(client: Any, active: str, run: Run) -> str:
    """The version a publishing run is writing, once it holds recall lists."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        if run.process.poll() is not None:
            raise RuntimeError(f"the publishing run exited with {run.process.returncode} first")
        for raw in client.smembers(keys.PENDING_VERSIONS):
            version = str(raw.decode())
            if version != active and version_keys(client, version, keys.RECALL.name):
                return version
        time.sleep(0.25)
    raise RuntimeError("the publishing run wrote no keys in time")


def case_lock_lost(ctx: Context) -> Result:
    stack, client = ctx.stack, ctx.stack.client
    source = stack.version
    paused = Run(
        [
            sys.executable,
            __file__,
            "publish",
            "--redis",
            stack.url,
            "--source",
            source,
            "--lock-ttl",
            str(LOCK_TTL_S),
        ],
        ctx.workdir / "logs" / "lock-lost.log",
    )
    try:
        written = str(paused.lines.expect("written", 120)["written"])
        with ctx.load() as load:
            stopped = load.at(ctx.fault_at)
            paused.signal(signal.SIGSTOP)
            time.sleep(2 * LOCK_TTL_S)
            second = publish_copy(client, source)
            paused.signal(signal.SIGCONT)
            paused.lines.tell("commit")
            outcome = paused.lines.expect("result", 60)
    finally:
        paused.kill()
    stack.rebase()
    active = store.active_version(client)
    served = sum(1 for o in load.outcomes if o.data_version == written)
    return Result(
        load,
        checks=[
            Check(
                "the run that lost its lock refuses to activate its version",
                outcome["result"] == "lock_lost",
                str(outcome.get("detail", outcome["result"]))[:120],
            ),
            Check(
                "the second run's version is active", active == second, f"{active}, second {second}"
            ),
            Check(
                "and complete",
                stack.complete(active),
                f"{version_keys(client, second, keys.RECALL.name)} of {stack.recall_lists} "
                "recall lists",
            ),
            Check("no answer came from the paused run's version", served == 0, f"{served} did"),
        ],
        notes=[
            f"run A wrote {written} (lock TTL {LOCK_TTL_S:g} s) and was paused (SIGSTOP) at "
            f"{load.since(stopped):.1f} s for {2 * LOCK_TTL_S:g} s; run B published {second} "
            "meanwhile; A resumed and tried to commit"
        ],
    )


def race_rollback_with_prune(
    stack: Stack, source: str, target: str
) -> tuple[Counter[str], str | None]:
    """A job's publish, whose prune deletes `target`, while `adrec publish rollback target`
    is tried again and again; the rollbacks' outcomes and the version active after both."""
    done = threading.Event()
    failures: list[BaseException] = []

    def job() -> None:
        client = bench_client(stack.url, cluster=False)
        try:
            for _ in range(200):
                try:
                    publish_copy(client, source)
                    return
                except PublishLockedError:
                    # A rollback holds the lock for a moment: try again, as a retried job.
                    time.sleep(0.01)
        except BaseException as error:
            failures.append(error)
        finally:
            client.close()
            done.set()

    outcomes: Counter[str] = Counter()
    client = bench_client(stack.url, cluster=False)
    thread = threading.Thread(target=job)
    thread.start()
    while not done.is_set():
        try:
            rollback(client, target)
            outcomes["rolled back"] += 1
        except PublishLockedError:
            outcomes["refused: a job holds the lock"] += 1
        except store.VersionNotFoundError:
            outcomes["refused: version gone"] += 1
        time.sleep(0.002)
    thread.join()
    client.close()
    if failures:
        raise failures[0]
    return outcomes, store.active_version(stack.client)


def wait_out_the_grace(client: Any, version: str) -> None:
    """Until `version` stopped being active more than PRUNE_GRACE_S ago, so the next
    publish's prune may delete it."""
    history = store.activations(client)
    names = [name for name, _ in history]
    index = names.index(version)
    replaced_at = history[index + 1][1] if index + 1 < len(history) else time.time()
    time.sleep(max(replaced_at + PRUNE_GRACE_S + 0.1 - time.time(), 0.0))


def case_rollback_prune(ctx: Context) -> Result:
    stack = ctx.stack
    checks = []
    tried: Counter[str] = Counter()
    source = stack.version
    # Each round waits out the prune grace before its race, under load throughout.
    with ctx.load(seconds=ctx.seconds + ROLLBACK_ROUNDS * (PRUNE_GRACE_S + 1)) as load:
        load.at(ctx.fault_at / 2)
        for round_number in range(1, ROLLBACK_ROUNDS + 1):
            # KEEP_VERSIONS copies on top, in quick succession (the prune grace keeps what
            # the services still serve): the oldest kept version is the one the next
            # publish prunes, and the one the rollback asks for.
            for _ in range(KEEP_VERSIONS):
                source = publish_copy(stack.client, source)
            target = store.list_versions(stack.client)[0]
            wait_out_the_grace(stack.client, target)
            outcomes, active = race_rollback_with_prune(stack, source, target)
            source = active or source
            tried.update(outcomes)
            checks.append(
                Check(
                    f"round {round_number}: the active version is complete",
                    stack.complete(active),
                    f"{active}: {version_keys(stack.client, active or 'v1', keys.RECALL.name)} of "
                    f"{stack.recall_lists} recall lists",
                )
            )
    stack.rebase()
    return Result(
        load,
        checks=checks,
        notes=[
            f"rollbacks racing the prunes of {ROLLBACK_ROUNDS} publishes (keep_versions "
            f"{KEEP_VERSIONS}, the job's default; prune grace {PRUNE_GRACE_S:g} s): "
            f"{by_name(tried)}"
        ],
    )


def case_job_while_locked(ctx: Context) -> Result:
    stack = ctx.stack
    with ctx.load() as load, Publication(stack.client, keep_versions=KEEP_VERSIONS) as holder:
        load.at(ctx.fault_at)
        started = time.monotonic()
        result = subprocess.run(
            [*ADREC, "job", "run", "--data", str(ctx.job_data), "--redis", stack.url],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            env={**os.environ, **job_env(ctx.workdir)},
            timeout=JOB_TIMEOUT_S,
            check=False,
        )
        took = time.monotonic() - started
    error = result.stderr.strip()
    return Result(
        load,
        checks=[
            Check(
                "a second `adrec job run` is refused with exit code 1",
                result.returncode == 1,
                f"exit code {result.returncode}",
            ),
            Check(
                "in one line naming the run holding the lock, no traceback",
                len(error.splitlines()) == 1
                and holder.run_id in error
                and "Traceback" not in error,
                error[:160],
            ),
            Check(
                f"before any work (within {JOB_REFUSAL_S:.0f} s, Spark not started)",
                took <= JOB_REFUSAL_S,
                f"{took:.1f} s",
            ),
        ],
    )


def recommend_counters(port: int) -> Counter[str]:
    """The gateway's own counts of Recommend calls: started, handled by code, shed, and
    abandoned (ended before their handler ran)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    found: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("grpc_method") != "Recommend":
                continue
            if sample.name == "grpc_server_started_total":
                found["started"] += int(sample.value)
            elif sample.name == "grpc_server_handled_total":
                found[f"handled {sample.labels['grpc_code']}"] += int(sample.value)
            elif sample.name in ("adrec_shed_total", "adrec_abandoned_total"):
                found[sample.name.removeprefix("adrec_").removesuffix("_total")] += int(
                    sample.value
                )
    return found


def case_overload(ctx: Context) -> Result:
    from services.runtime.data import MAX_IDLE_CONNECTIONS

    stack = ctx.stack
    before = recommend_counters(stack.gateway.metrics_port)
    connections_before = stack.connections()
    bursts = [(ctx.seconds * share, calls) for share, calls in BURSTS]
    with ctx.load(bursts=bursts) as load:
        pass
    counted = recommend_counters(stack.gateway.metrics_port)
    counted.subtract(before)
    refused = sum(1 for o in load.outcomes if o.code == "RESOURCE_EXHAUSTED")
    connections = stack.connections()
    # Each service process keeps at most MAX_IDLE_CONNECTIONS for its GETs, and its client
    # pool one for anything else.
    bound = len(stack.services) * (MAX_IDLE_CONNECTIONS + 1)
    # The burst's calls past the gateway's streams per connection wait in the burst's own
    # channel until their deadline, and those it opened before the connection's settings
    # arrived are refused by the transport unprocessed (UNAVAILABLE, safe to retry); the
    # steady callers, on their own connection, must not notice the burst.
    burst = Expectation(
        allowed_errors=frozenset({"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "UNAVAILABLE"}),
        own_stalls_excused=True,
    )
    return Result(
        load,
        expect={"": Expectation(allowed_errors=frozenset({"RESOURCE_EXHAUSTED"})), "burst": burst},
        checks=[
            Check(
                "every call the gateway shed is counted (adrec_shed_total)",
                counted["shed"] == refused,
                f"{counted['shed']} counted, {refused} RESOURCE_EXHAUSTED seen by the callers",
            ),
            Check(
                f"Redis connections after the bursts at most {bound}",
                connections <= bound,
                f"{connections_before} before, {connections} after",
            ),
        ],
        notes=[
            f"bursts of {' and '.join(str(calls) for _, calls in BURSTS)} concurrent calls "
            f"at {', '.join(f'{at:.1f}' for at, _ in bursts)} s, from a second client process, "
            "over the steady load",
            "the gateway's own counts of Recommend: "
            + ", ".join(f"{name} {n}" for name, n in sorted(counted.items()) if n),
        ],
    )


def bad_requests() -> list[list[str]]:
    """Requests the gateway must refuse with INVALID_ARGUMENT, tagged "bad"."""

    def request(**fields: Any) -> bytes:
        base: dict[str, Any] = {"user_id": 1, "pid": PID, "count": COUNT}
        return gateway_pb2.RecommendRequest(**{**base, **fields}).SerializeToString()

    bodies = [
        request(pid="p" * OVERSIZED),
        request(request_id="r" * OVERSIZED),
        request(request_id="r" * 129),
        # Not a RecommendRequest at all, and one cut off inside its pid.
        b"\xff" * 16,
        request()[:6],
    ]
    return [["bad", base64.b64encode(body).decode()] for body in bodies]


def case_bad_input(ctx: Context) -> Result:
    with ctx.load(interleaved=bad_requests()) as load:
        pass
    longest = max(
        (seen[1] for key, seen in load.details.items() if key.startswith("bad ")), default=0
    )
    return Result(
        load,
        expect={"": Expectation(), "bad": Expectation(only_code="INVALID_ARGUMENT")},
        checks=[
            Check(
                f"error messages at most {MAX_ERROR_DETAILS} characters",
                longest <= MAX_ERROR_DETAILS,
                f"longest {longest}",
            )
        ],
        notes=[
            f"bad requests: a {OVERSIZED // 1000} KB pid, a {OVERSIZED // 1000} KB request_id, "
            "a 129-character request_id, 16 bytes of 0xff, a request cut inside its pid; "
            f"one send in {INTERLEAVE_EVERY}"
        ],
    )


class _NotRedis(socketserver.BaseRequestHandler):
    """Answers like a web server: the port is not Redis."""

    def handle(self) -> None:
        with contextlib.suppress(OSError):
            self.request.recv(4096)
            self.request.sendall(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )


class _Listener(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@contextlib.contextmanager
def not_redis() -> Iterator[int]:
    server = _Listener(("127.0.0.1", 0), _NotRedis)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def answers_health(address: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        # types-grpcio-health-checking declares HealthStub without its methods.
        check = health_pb2_grpc.HealthStub(channel).Check  # type: ignore[attr-defined]
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.RpcError):
                check(health_pb2.HealthCheckRequest(), timeout=1.0)
                return True
            time.sleep(0.1)
    return False


def case_not_redis(ctx: Context) -> Result:
    stack = ctx.stack
    with not_redis() as port:
        url = f"redis://:{SECRET}@127.0.0.1:{port}/0"
        ports = {name: service.port for name, service in stack.services.items()}
        ports["gateway"], metrics = free_port(), free_port()
        gateway = Service(
            "misconfigured gateway",
            "gateway",
            service_env("gateway", ports, metrics, url, cluster=False),
            ports["gateway"],
            metrics,
            ctx.workdir / "logs" / "not-redis-gateway.log",
        )
        gateway.start()
        try:
            if not answers_health(gateway.address, SERVING_TIMEOUT_S):
                raise RuntimeError("the gateway pointed at a non-Redis port did not start")
            commands = {
                "cli": [*ADREC, "publish", "list", "--redis-url", url],
                "bad setting": [
                    *ADREC,
                    "serve",
                    "gateway",
                    "--redis-url",
                    url,
                    "--recall-timeout-ms",
                    "0",
                ],
            }
            with ctx.load(port=gateway.port) as load:
                # The CLI's checks meanwhile: each spends most of its time importing.
                running = {
                    name: subprocess.Popen(
                        command,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                        cwd=REPO_ROOT,
                    )
                    for name, command in commands.items()
                }
                finished = {name: run.communicate(timeout=120) for name, run in running.items()}
            cli, bad_setting = running["cli"], running["bad setting"]
        finally:
            gateway.stop()
    refusal = str(load.details.get(" UNAVAILABLE", [""])[0])
    log = gateway.log_path.read_text(errors="replace")
    cli_error = finished["cli"][1].strip()
    return Result(
        load,
        expect={"": Expectation(allowed_errors=frozenset({"UNAVAILABLE"}), fallback=False)},
        checks=[
            Check(
                "Recommend says Redis is unreachable",
                "Redis is unreachable" in refusal,
                refusal[:120],
            ),
            Check(
                "the password appears in no answer, log or CLI output",
                not any(
                    SECRET in text
                    for text in (refusal, log, *(err for _, err in finished.values()))
                ),
            ),
            Check("the gateway logs no traceback", "Traceback" not in log),
            Check(
                "`adrec publish list` fails in one line, exit code 1",
                cli.returncode == 1
                and len(cli_error.splitlines()) == 1
                and "Traceback" not in cli_error,
                f"exit code {cli.returncode}: {cli_error[:120]}",
            ),
            Check(
                "a bad setting stops `adrec serve` with exit code 2",
                bad_setting.returncode == 2,
                f"exit code {bad_setting.returncode}",
            ),
        ],
        notes=[
            "a second gateway, its REDIS_URL (with a password) naming a port that answers like "
            "a web server"
        ],
    )


def case_unknown_candidates(ctx: Context) -> Result:
    stack, client = ctx.stack, ctx.stack.client
    users = stack.users
    affected = users[: max(len(users) // 10, 1)]
    refused = subprocess.run(
        [
            *ADREC,
            "publish",
            "update-user",
            str(affected[0]),
            "--recall",
            ",".join(map(str, UNKNOWN_ADS[:5])),
            "--redis-url",
            stack.url,
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )
    recall_keys = [keys.RECALL.key(stack.version, user) for user in affected]
    try:
        store.VersionWriter(client, stack.version).put_recall_lists(
            affected, [UNKNOWN_ADS] * len(affected)
        )
        with ctx.load(
            templates=mixed(requests_for(users[len(affected) :]), requests_for(affected, "unknown"))
        ) as load:
            pass
    finally:
        restore(client, stack.saved, recall_keys)
    unknown = [o for o in load.outcomes if o.tag == "unknown" and o.code == OK]
    flagged = sum(1 for o in unknown if "NO_KNOWN_CANDIDATES" in o.reasons)
    return Result(
        load,
        checks=[
            Check(
                "`adrec publish update-user` refuses ads the version lacks",
                refused.returncode != 0 and "does not have" in refused.stderr,
                f"exit code {refused.returncode}",
            ),
            Check(
                "every answer for those users says NO_KNOWN_CANDIDATES",
                flagged == len(unknown),
                f"{flagged} of {len(unknown)}",
            ),
        ],
        notes=[
            f"{len(affected)} users' recall lists replaced by {len(UNKNOWN_ADS)} ads the ad "
            "table lacks"
        ],
    )


def spare_node(stack: Stack) -> int:
    """A cluster node holding none of the catalog's keys, so losing it costs only users."""
    if stack.cluster is None:
        raise RuntimeError("not a cluster")
    # What the services' version watchers read every poll.
    catalog = (keys.ACTIVE_VERSION, keys.META.key(stack.version))
    slots = {key_slot(name) for name in catalog}
    for index, (first, last) in enumerate(stack.cluster.slot_ranges):
        if not any(first <= slot <= last for slot in slots):
            return index
    raise RuntimeError("every cluster node holds a catalog key")


def users_on(stack: Stack, index: int) -> set[int]:
    """Users whose recall list or features live on cluster node `index`."""
    if stack.cluster is None:
        raise RuntimeError("not a cluster")
    first, last = stack.cluster.slot_ranges[index]
    return {
        user
        for user in stack.users
        if any(
            first <= key_slot(family.key(stack.version, user)) <= last
            for family in (keys.RECALL, keys.USER)
        )
    }


def cluster_case(how: str, ctx: Context) -> Result:
    cluster = ctx.cluster()
    stack = cluster.stack
    index = spare_node(stack)
    node = stack.nodes[index]
    affected = users_on(stack, index)
    templates = mixed(
        requests_for([user for user in stack.users if user not in affected]),
        requests_for(sorted(affected), "affected"),
    )
    checks = []
    try:
        with cluster.load(templates=templates) as load:
            broken = load.at(cluster.fault_at)
            if how == "down":
                node.process.kill()
                node.process.wait()
            else:
                node.restart()
            ended = load.at(cluster.seconds)
        if how == "down":
            for name in stack.services:
                seen = cluster.health.seen(name, "readiness", broken, ended)
                checks.append(
                    Check(
                        f"{name} stays SERVING (two thirds of the slots are fine)",
                        set(seen) == {"SERVING"},
                        by_name(seen),
                    )
                )
        else:
            checks.append(loss_detection(cluster, broken, "a node restarted empty"))
    finally:
        if node.process.poll() is not None:
            node.restart()
        stack.ensure_nodes()
        stack.restore()
    share = len(affected) / len(stack.users)
    first, last = stack.cluster.slot_ranges[index] if stack.cluster else (0, 0)
    spared = [
        o.sent_at - broken for o in load.outcomes if o.tag == "" and set(o.reasons) - MACHINE_NOISE
    ]
    notes = (
        [
            f"the other users' answers degraded by the fault were sent from {min(spared):.1f} "
            f"to {max(spared):.1f} s after it"
        ]
        if spared
        else []
    )
    return Result(
        load,
        expect={
            "": Expectation(untouched=True),
            "affected": Expectation(recall_sets=how == "down"),
        },
        checks=checks,
        notes=[
            f"node {index + 1} of {len(stack.nodes)} (slots {first}-{last}, none of the "
            f"catalog's keys) {'killed' if how == 'down' else 'restarted empty'} at "
            f"{load.since(broken):.1f} s; {len(affected)} of {len(stack.users)} users "
            f"({share:.0%}) have their recall list or features there",
            *notes,
        ],
    )


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    summary: str
    run: Callable[[Context], Result]
    fallback: bool = True
    cluster: bool = False


CASES = (
    Case("baseline", "no fault: the machine's noise floor", case_baseline),
    Case("redis-killed", "Redis killed (SIGKILL), restarted with its data", case_redis_killed),
    Case(
        "redis-hung",
        "Redis stopped (SIGSTOP) at a 500 ms caller deadline (issue #16.1)",
        case_redis_hung,
    ),
    Case("redis-down-readiness", "readiness while Redis is down (#16.4)", case_readiness),
    Case("redis-restarted-empty", "Redis restarted without its data (#16.5)", case_redis_empty),
    Case(
        "recall-killed",
        "the recall service killed, restarted",
        functools.partial(case_downstream, "recall", "killed"),
    ),
    Case(
        "recall-hung",
        "the recall service stopped (SIGSTOP)",
        functools.partial(case_downstream, "recall", "hung"),
    ),
    Case(
        "ranking-killed",
        "the ranking service killed, restarted",
        functools.partial(case_downstream, "ranking", "killed"),
    ),
    Case(
        "ranking-hung",
        "the ranking service stopped (SIGSTOP)",
        functools.partial(case_downstream, "ranking", "hung"),
    ),
    Case(
        "sigterm-ranking",
        "SIGTERM to ranking under load, restarted",
        functools.partial(case_sigterm, "ranking"),
    ),
    Case(
        "sigterm-gateway",
        "SIGTERM to the gateway under load, restarted",
        functools.partial(case_sigterm, "gateway"),
        fallback=False,
    ),
    Case(
        "job-killed",
        "a publishing run (the job; --quick: a copy) killed mid-publish",
        case_job_killed,
    ),
    Case("lock-lost", "a run paused past its publish lock's lease (#16.2)", case_lock_lost),
    Case("rollback-prune", "rollback racing a job's prune, 3 rounds (#16.3)", case_rollback_prune),
    Case(
        "job-while-locked",
        "a second `adrec job run` while a run holds the lock (#16.10)",
        case_job_while_locked,
    ),
    Case("overload", "bursts of 2,000 and 3,000 concurrent calls (#16.8, #16.11)", case_overload),
    Case("bad-input", "oversized fields and undecodable requests (#16.8, #16.9)", case_bad_input),
    Case(
        "not-redis",
        "REDIS_URL naming a port that is not Redis (#16.7, #16.10)",
        case_not_redis,
        fallback=False,
    ),
    Case(
        "unknown-candidates",
        "recall lists of ads the ad table lacks (#16.12)",
        case_unknown_candidates,
    ),
    Case(
        "cluster-node-down",
        "one Redis Cluster node of three killed (#16.6)",
        functools.partial(cluster_case, "down"),
        cluster=True,
    ),
    Case(
        "cluster-node-empty",
        "one Redis Cluster node restarted empty (#16.5)",
        functools.partial(cluster_case, "empty"),
        cluster=True,
    ),
)


# ---------------------------------------------------------------- running and reporting


@dataclasses.dataclass
class CaseResult:
    case: Case
    seconds: float
    total: Counts = dataclasses.field(default_factory=Counts)
    by_tag: dict[str, Counts] = dataclasses.field(default_factory=dict)
    missed: list[str] = dataclasses.field(default_factory=list)
    checks: list[Check] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.missed


def log_checks(sizes: dict[Path, int]) -> list[Check]:
    """No traceback and no overlong line in what the services logged during a case."""
    tracebacks, longest = 0, 0
    for path, offset in sizes.items():
        if not path.exists():
            continue
        with path.open("rb") as log:
            log.seek(offset)
            for line in log:
                tracebacks += b"Traceback" in line
                longest = max(longest, len(line))
    return [
        Check("no traceback in the services' logs", not tracebacks, f"{tracebacks} lines with one"),
        Check(
            f"no log line over {MAX_LOG_LINE // 1024} KB",
            longest <= MAX_LOG_LINE,
            f"longest {longest} bytes",
        ),
    ]


def evaluate(case: Case, result: Result, seconds: float) -> CaseResult:
    outcome = CaseResult(case, seconds, checks=result.checks, notes=result.notes)
    outcome.total = count(result.load.outcomes, DEADLINE_S)
    tags = sorted({o.tag for o in result.load.outcomes})
    for tag in tags:
        counts = count(
            (o for o in result.load.outcomes if o.tag == tag),
            DEADLINE_S,
            result.load.stalls.get(tag, ()),
        )
        outcome.by_tag[tag] = counts
        expected = result.expect.get(
            tag, result.expect.get("", Expectation(fallback=case.fallback))
        )
        outcome.missed += [f"{tag or 'requests'}: {miss}" for miss in misses(counts, expected)]
    outcome.missed += [
        f"{check.name} ({check.detail})" for check in result.checks if not check.passed
    ]
    lag = result.load.max_send_lag_ms
    outcome.notes.append(
        f"generator's largest send lag {lag:.0f} ms; load average {os.getloadavg()[0]:.1f}"
    )
    return outcome


def describe(counts: Counts) -> str:
    return (
        f"sent {counts.sent}, answered {counts.answered}, degraded {counts.degraded}"
        + (f" ({by_name(counts.reasons)})" if counts.reasons else "")
        + f", errors {counts.errors.total()}"
        + (f" ({by_name(counts.errors)})" if counts.errors else "")
        + f", lost {counts.lost}, late {counts.late}"
        + (f" ({counts.late_own} held back by the caller's own loop)" if counts.late_own else "")
        + "; latency p50 "
        f"{counts.percentile_ms(50):.1f} ms, p99 {counts.percentile_ms(99):.1f} ms, max "
        f"{counts.percentile_ms(100):.1f} ms"
    )


def run_case(case: Case, ctx: Context) -> CaseResult:
    print(f"\n== {case.name}: {case.summary}", flush=True)
    started = time.monotonic()
    ctx.case = case.name
    try:
        target = ctx.cluster() if case.cluster else ctx
        target.case = case.name
        target.stack.ensure_baseline()
        sizes = target.stack.log_sizes()
        result = case.run(ctx)
        result.checks += log_checks(sizes)
    except Exception as error:
        traceback.print_exc()
        outcome = CaseResult(case, time.monotonic() - started)
        outcome.missed.append(f"the case could not run: {type(error).__name__}: {error}")
        print(f"   FAIL  {outcome.missed[0]}", flush=True)
        return outcome
    outcome = evaluate(case, result, time.monotonic() - started)
    print(f"   {describe(outcome.total)}")
    if len(outcome.by_tag) > 1:
        for tag, counts in outcome.by_tag.items():
            print(f"   [{tag or 'others'}] {describe(counts)}")
    for key, (text, _) in sorted(result.load.details.items()):
        print(f"   error {key.strip()}: {text[:150]!r}")
    for check in outcome.checks:
        print(
            f"   {'PASS' if check.passed else 'FAIL'}  {check.name}"
            + (f": {check.detail}" if check.detail else "")
        )
    for note in outcome.notes:
        print(f"   note  {note}")
    verdict = "PASS" if outcome.passed else "FAIL: " + "; ".join(outcome.missed)
    print(f"   -> {verdict} ({outcome.seconds:.0f} s)", flush=True)
    return outcome


def report(results: list[CaseResult]) -> int:
    header = (
        "case",
        "fallback",
        "sent",
        "answered",
        "degraded",
        "errors",
        "lost",
        "late",
        "p99 ms",
        "result",
    )
    rows = [header]
    for result in results:
        total = result.total
        rows.append(
            (
                result.case.name,
                "yes" if result.case.fallback else "no",
                str(total.sent),
                str(total.answered),
                f"{total.degraded}" + (f" ({by_name(total.reasons)})" if total.reasons else ""),
                f"{total.errors.total()}" + (f" ({by_name(total.errors)})" if total.errors else ""),
                str(total.lost),
                str(total.late),
                f"{total.percentile_ms(99):.0f}",
                "PASS" if result.passed else "FAIL",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print()
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    failed = [result for result in results if not result.passed]
    for result in failed:
        print(f"MISSED  {result.case.name}: {'; '.join(result.missed)}")
    print(
        f"{len(results) - len(failed)} of {len(results)} cases met every target; machine load "
        "average (1, 5, 15 min) at the end: "
        + ", ".join(f"{load:.1f}" for load in os.getloadavg())
        + f" on {os.cpu_count()} cores"
    )
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    from adrec.synthetic import generate as generate_data

    selected = list(CASES)
    if args.cases:
        names = [name.strip() for name in args.cases.split(",") if name.strip()]
        unknown = sorted(set(names) - {case.name for case in CASES})
        if unknown:
            print(f"unknown cases: {', '.join(unknown)} (--list names them)", file=sys.stderr)
            return 2
        selected = [case for case in CASES if case.name in names]
    use_job = not (args.quick or args.no_job)
    rate, seconds = (QUICK_RATE, QUICK_SECONDS) if args.quick else (RATE, SECONDS)
    started = time.monotonic()
    print(
        f"{len(selected)} cases, {rate} rps for {seconds:g} s each, caller deadline "
        f"{DEADLINE_S * 1000:.0f} ms; machine load average (1, 5, 15 min) at the start: "
        + ", ".join(f"{load:.1f}" for load in os.getloadavg())
        + f" on {os.cpu_count()} cores",
        flush=True,
    )
    with (
        tempfile.TemporaryDirectory(prefix="adrec-bench-faults-") as tmp,
        contextlib.ExitStack() as resources,
    ):
        workdir = Path(tmp)
        (workdir / "logs").mkdir()
        job_data = workdir / "tiny"
        generate_data("tiny", 7, job_data, progress=False)
        server = resources.enter_context(private_redis(extra_args=AOF_ARGS))
        if use_job:
            print("publishing: the batch job on tiny (a few minutes) ...", flush=True)
            publish_with_job(job_data, server.url, workdir)
        else:
            print("publishing: the test suite's version (tests/service_data.py) ...", flush=True)
            publish_fixture(server.url)
        stack = Stack("standalone", workdir, [server], server.url)
        resources.callback(stack.stop)
        stack.rebase()
        stack.start()
        health = HealthWatch(stack.services)
        health.start()
        resources.callback(health.stop)
        generator = Generator(workdir)
        resources.callback(generator.close)
        print(
            f"  {stack.version}: {stack.recall_lists} recall lists, load over "
            f"{len(stack.users)} users; set up in {time.monotonic() - started:.0f} s",
            flush=True,
        )
        ctx = Context(
            stack, health, generator, workdir, rate, seconds, job_data, use_job, resources
        )
        results = [run_case(case, ctx) for case in selected]
        if args.logs:
            shutil.copytree(workdir / "logs", args.logs, dirs_exist_ok=True)
    print(f"\nwhole run {time.monotonic() - started:.0f} s", flush=True)
    return report(results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_RATE} rps for {QUICK_SECONDS:g} s per case, no Spark",
    )
    parser.add_argument(
        "--no-job", action="store_true", help="publish the test suite's version, not the job's"
    )
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument(
        "--logs",
        type=Path,
        help="copy the services' and runs' logs, and every request's record, into this folder",
    )
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("generate", help="(internal) the load generator")
    publish = commands.add_parser(
        "publish", help="(internal) a publishing run that waits before its commit"
    )
    publish.add_argument("--redis", required=True)
    publish.add_argument("--source", required=True)
    publish.add_argument("--lock-ttl", type=float, default=60.0)
    args = parser.parse_args()
    if args.command == "generate":
        return generate()
    if args.command == "publish":
        return publisher(args.redis, args.source, args.lock_ttl)
    if args.list:
        for case in CASES:
            print(f"{case.name:<22} {case.summary}")
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
