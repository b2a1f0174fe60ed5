"""Real-time events end to end: intake and stream job together, event to visible, and
Recommend with events flowing against Recommend without, in one run.

Run: ``.venv/bin/python bench/bench_realtime.py`` (about five minutes; ``--quick`` shortens
the load steps; figures in docs/performance.md, "Real-time events").

Everything runs on this machine against a private redis-server on a free loopback port, each
component in its own process as deployed: ``adrec serve recall|ranking|gateway|events`` and
``adrec stream run`` (local Spark, Redis Streams source, default trigger;
``--stream-niceness`` lowers it). The version is bench_serving's (10k users with 500-id
recall lists, 100k ads, 5k categories) with a ``behaviour`` feature set model, so ranking
reads each user's counts.

1. ``sustained``: a slice of a synthetic ``behavior_log`` (the ``small`` preset, its first
   ``--rows`` rows) replayed by ``adrec events send`` as fast as it goes, and timed from the
   first send to the stream job's ``adrec_stream_events_total`` reaching the slice: events
   per second through ``ReportEvents`` and the stream job together. The course's way for the
   same events (one unpipelined SADD and one HSET per event) is timed beside it.
2. ``visible``: probes, one at a time: a click of a user new to the version on an ad, then
   ``GetCandidates`` of that user every 10 ms (what the gateway calls on every Recommend)
   until its real-time interest leads the candidates; the time from the report call to
   that answer, p50 and p99. Run idle and again while ``serving``'s events flow.
3. ``serving``: Recommend REALTIME at ``--rps`` for ``--seconds`` (bench_serving's open-loop
   generator, latency from the intended send time), first with no events, then with
   ``--events-per-second`` of behaviour events of the same users flowing through the intake
   and the stream job. p99 and the CPU time per answer of recall, ranking and gateway (the
   intake and the stream job are their own deployments, measured apart), and the ratios.

``--split-cores`` gives ``serving``'s two runs what a deployment gives the stream job and
the intake, nodes of their own: a cpuset cgroup holds the stream job (its JVM and Python
workers), the intake and the sender to the last CPU, another holds the serving services,
Redis and the load generator to the others, both runs alike. ``sustained`` and the idle
probes still have every CPU (Linux, as root, cgroup v1 cpuset or v2 with cpuset enabled).

Targets (2 cores): sustained >= 20,000 events/s; event to visible p99 <= 2 s; with 5,000
events/s flowing, Recommend p99 and CPU per answer within 25% of the run without.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import redis

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import bench_events  # noqa: E402 - a sibling script, found through the path above
import bench_serving  # noqa: E402

from adrec.core import keys  # noqa: E402
from adrec.core.dataset import BEHAVIOR_LOG  # noqa: E402
from adrec.core.redis_server import private_redis  # noqa: E402

ADREC = bench_serving.ADREC
STREAM_START_TIMEOUT_S = 180.0
VISIBLE_TIMEOUT_S = 15.0
#: Users of the visible probes: above every published user, so each is new to the version.
PROBE_USERS_FROM = 50_000_000
TARGET_EVENTS_PER_SECOND = 20_000
TARGET_VISIBLE_P99_S = 2.0
TARGET_RATIO = 1.25


# ---------------------------------------------------------------- processes


class CpuSet:
    """A cpuset cgroup whose CPUs can change while its processes run; a process moved into
    it takes its children along, and the ones it forks later are born inside."""

    def __init__(self, name: str):
        v1 = Path("/sys/fs/cgroup/cpuset")
        self.root = v1 if v1.is_dir() else Path("/sys/fs/cgroup")
        self.path = self.root / f"adrec-bench-{name}-{os.getpid()}"
        self.path.mkdir()
        if self.root == v1:
            (self.path / "cpuset.mems").write_text((v1 / "cpuset.mems").read_text())
        self.allow(all_cpus())

    def allow(self, cpus: str) -> None:
        (self.path / "cpuset.cpus").write_text(cpus)

    def move(self, pid: int, children: bool = True) -> None:
        """Moves `pid`, and with `children` every process below it."""
        for member in (pid, *(descendants(pid) if children else ())):
            with contextlib.suppress(ProcessLookupError, FileNotFoundError, OSError):
                (self.path / "cgroup.procs").write_text(str(member))

    def remove(self) -> None:
        # Moved back first: Spark's Python workers may outlive the JVM by a moment.
        for line in (self.path / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (self.root / "cgroup.procs").write_text(line)
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        print(f"warning: cgroup {self.path} left behind", file=sys.stderr)


def all_cpus() -> str:
    cpus = os.cpu_count() or 1
    return f"0-{cpus - 1}" if cpus > 1 else "0"


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class SplitCores:
    """The stream side (stream job, intake, sender) on the last CPU, serving on the rest."""

    def __init__(self, stack: contextlib.ExitStack):
        cpus = os.cpu_count() or 1
        if cpus < 2:
            raise RuntimeError("--split-cores needs at least two CPUs")
        self.events_cpus = str(cpus - 1)
        self.serving_cpus = "0" if cpus == 2 else f"0-{cpus - 2}"
        self.serving = CpuSet("serving")
        stack.callback(self.serving.remove)
        self.events = CpuSet("events")
        stack.callback(self.events.remove)

    def split(self) -> None:
        self.serving.allow(self.serving_cpus)
        self.events.allow(self.events_cpus)


class Stack:
    """The four services and the stream job over one private redis-server."""

    def __init__(
        self,
        stack: contextlib.ExitStack,
        redis_url: str,
        redis_pid: int,
        checkpoint: Path,
        niceness: int | None,
        trigger_ms: int | None,
        cores: SplitCores | None,
    ):
        self.redis_url = redis_url
        self.redis_pid = redis_pid
        self.cores = cores
        self.ports = {
            name: bench_serving.free_port()
            for name in ("recall", "ranking", "gateway", "events", "stream_metrics")
        }
        common = {"REDIS_URL": redis_url, "ADREC_HOST": "127.0.0.1", "ADREC_LOG_LEVEL": "warning"}
        env = {
            name: {
                **common,
                f"ADREC_{name.upper()}_PORT": str(self.ports[name]),
                "ADREC_METRICS_PORT": str(bench_serving.free_port()),
            }
            for name in ("recall", "ranking", "gateway", "events")
        }
        env["gateway"].update(
            {
                "ADREC_RECALL_ADDRESS": f"127.0.0.1:{self.ports['recall']}",
                "ADREC_RANKING_ADDRESS": f"127.0.0.1:{self.ports['ranking']}",
            }
        )
        env["events"]["ADREC_EVENTS_MAX_AGE_SECONDS"] = str(bench_events.BACKFILL_SECONDS)
        self.pids: dict[str, int] = {}
        for name in ("recall", "ranking", "gateway", "events"):
            process = stack.enter_context(bench_serving.started([*ADREC, "serve", name], env[name]))
            self.pids[name] = process.pid
            if cores is not None:
                (cores.events if name == "events" else cores.serving).move(process.pid)
        stream_env = {
            **common,
            "ADREC_STREAM_CHECKPOINT": str(checkpoint),
            "ADREC_STREAM_METRICS_PORT": str(self.ports["stream_metrics"]),
        }
        if niceness is not None:
            stream_env["ADREC_STREAM_NICENESS"] = str(niceness)
        if trigger_ms is not None:
            stream_env["ADREC_STREAM_TRIGGER_MS"] = str(trigger_ms)
        self.stream = stack.enter_context(
            bench_serving.started([*ADREC, "stream", "run"], stream_env)
        )
        self.pids["stream"] = self.stream.pid
        if cores is not None:
            cores.events.move(self.stream.pid)
        for name in ("recall", "ranking", "gateway", "events"):
            bench_serving.wait_serving(self.ports[name])

    def applied(self) -> float:
        """The stream job's adrec_stream_events_total, summed over kinds; -1 until it answers."""
        url = f"http://127.0.0.1:{self.ports['stream_metrics']}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return -1.0
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("adrec_stream_events_total{")
        )

    def wait_applied(self, at_least: float, timeout: float) -> float:
        """Seconds until the stream job has applied `at_least` events; raises past `timeout`."""
        started = time.monotonic()
        while self.applied() < at_least:
            if self.stream.poll() is not None:
                raise RuntimeError(f"the stream job exited with {self.stream.returncode}")
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"the stream job applied {self.applied()} of {at_least}")
            time.sleep(0.05)
        return time.monotonic() - started

    def cpu_by_part(self) -> dict[str, float]:
        """CPU seconds so far of the stream job's driver, its JVM and its Python workers, the
        intake and Redis."""
        parts = {"stream_driver": cpu_seconds(self.pids["stream"]), "jvm": 0.0, "workers": 0.0}
        for pid in descendants(self.pids["stream"]):
            parts["jvm" if command_name(pid) == "java" else "workers"] += cpu_seconds(pid)
        parts["intake"] = cpu_seconds(self.pids["events"])
        parts["redis"] = cpu_seconds(self.redis_pid)
        return parts

    def stream_side_cpu_seconds(self, sender: int) -> float:
        """CPU seconds so far of the stream job's whole tree, the intake and `sender`."""
        pids = [self.pids["stream"], *descendants(self.pids["stream"]), self.pids["events"], sender]
        return sum(cpu_seconds(pid) for pid in pids)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def send(stack: Stack, path: Path, rate: float = 0) -> subprocess.Popen[str]:
    args = [*ADREC, "events", "send", str(path), "--events", f"127.0.0.1:{stack.ports['events']}"]
    if rate:
        args += ["--rate", str(rate)]
    sender = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if stack.cores is not None:
        stack.cores.events.move(sender.pid)
    return sender


def finished(process: subprocess.Popen[str]) -> str:
    out, err = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"adrec events send failed: {err.strip()}")
    return out.strip().splitlines()[-1]


# ---------------------------------------------------------------- phases


def sustained(
    stack: Stack, data_dir: Path, scratch: Path, rows: int, course: int
) -> dict[str, Any]:
    source = bench_events.behavior_slice(
        data_dir / BEHAVIOR_LOG.csv_file, rows, scratch / "slice.csv"
    )
    with source.open() as handle:
        lines = [line.rstrip("\n").split(",") for line in handle][1:]
    good = [line for line in lines if int(line[1]) > 0]
    before = stack.applied()
    cpu_before = stack.cpu_by_part()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    sender = send(stack, source)
    summary = finished(sender)
    sent_seconds = time.monotonic() - started
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    stack.wait_applied(before + len(good), timeout=600)
    total_seconds = time.monotonic() - started
    cpu_after = stack.cpu_by_part()
    # The sender is the only child that ends meanwhile.
    sender_cpu = (children.ru_utime + children.ru_stime) - (
        children_before.ru_utime + children_before.ru_stime
    )
    cpu_ms_per_event = {
        part: 1000 * (cpu_after[part] - cpu_before[part]) / len(good) for part in cpu_after
    }
    cpu_ms_per_event["sender"] = 1000 * sender_cpu / len(good)
    client = redis.Redis.from_url(stack.redis_url)
    course_seconds = bench_events.course_way(client, good[:course])
    client.close()
    return {
        "events": len(good),
        "sender": summary,
        "intake_events_per_second": len(good) / sent_seconds,
        "end_to_end_seconds": total_seconds,
        "end_to_end_events_per_second": len(good) / total_seconds,
        "course_events_per_second": min(course, len(good)) / course_seconds,
        "cpu_ms_per_event": cpu_ms_per_event,
    }


def visible(stack: Stack, probes: int, first_user: int) -> dict[str, Any]:
    """Event-to-visible latencies of `probes` clicks, one at a time."""
    import grpc

    from adrec.api.events.v1 import event_service_pb2 as ev
    from adrec.api.events.v1 import event_service_pb2_grpc
    from adrec.api.recall.v1 import recall_service_pb2, recall_service_pb2_grpc
    from adrec.core import store

    client = redis.Redis.from_url(stack.redis_url)
    version = store.active_version(client)
    ads = store.read(client, keys.ADS, version) if version else None
    client.close()
    if ads is None:
        raise RuntimeError("no active version with an ad table")
    rng = np.random.default_rng(first_user)
    latencies = []
    with (
        grpc.insecure_channel(f"127.0.0.1:{stack.ports['events']}") as events_channel,
        grpc.insecure_channel(f"127.0.0.1:{stack.ports['recall']}") as recall_channel,
    ):
        intake = event_service_pb2_grpc.EventServiceStub(events_channel)  # type: ignore[no-untyped-call]
        recall = recall_service_pb2_grpc.RecallServiceStub(recall_channel)  # type: ignore[no-untyped-call]
        for probe in range(probes):
            user = first_user + probe
            ad = int(ads["adgroup_id"][rng.integers(len(ads["adgroup_id"]))])
            # Spread over the trigger interval, as real events arrive.
            time.sleep(float(rng.uniform(0.05, 0.6)))
            started = time.monotonic()
            intake.ReportEvents(
                ev.ReportEventsRequest(
                    events=[
                        ev.Event(
                            event_id=f"probe-{user}",
                            user_id=user,
                            time=int(time.time()),
                            click=ev.Click(ad_id=ad, pid="430548_1007"),
                        )
                    ]
                ),
                timeout=5.0,
            )
            while True:
                answer = recall.GetCandidates(
                    recall_service_pb2.GetCandidatesRequest(user_id=user, limit=60), timeout=2.0
                )
                if answer.interest_count > 0:
                    latencies.append(time.monotonic() - started)
                    break
                if time.monotonic() - started > VISIBLE_TIMEOUT_S:
                    latencies.append(float("inf"))
                    break
                time.sleep(0.01)
    ordered = sorted(latencies)
    return {
        "probes": probes,
        "p50_s": bench_serving._percentile(ordered, 50),
        "p99_s": bench_serving._percentile(ordered, 99),
        "max_s": ordered[-1],
    }


def behaviour_file(path: Path, users: int, categories: int, events: int, seed: int = 3) -> Path:
    """`events` rows in the behavior_log format for the published users and categories,
    their times spread over the last hour (the sender rebases them to now)."""
    rng = np.random.default_rng(seed)
    now = int(time.time())
    user = rng.integers(1, users + 1, events)
    times = np.sort(rng.integers(now - 3600, now, events))
    btag = rng.choice(np.array(["pv", "pv", "pv", "cart", "fav", "buy"]), events)
    cate = rng.integers(1, categories + 1, events)
    brand = rng.integers(1, 99_000, events)
    with path.open("w") as out:
        out.write(BEHAVIOR_LOG.header + "\n")
        for row in zip(user, times, btag, cate, brand, strict=True):
            out.write(",".join(map(str, row)) + "\n")
    return path


def serving(stack: Stack, scratch: Path, args: argparse.Namespace) -> dict[str, Any]:
    cpu_pids = {name: stack.pids[name] for name in ("recall", "ranking", "gateway")}
    port = stack.ports["gateway"]
    if stack.cores is not None:
        # The load generator and the probes are forked or run from here.
        stack.cores.serving.move(os.getpid(), children=False)
        stack.cores.split()
    quiet = bench_serving.run_load("recommend", port, (args.rps,), args.seconds, cpu_pids)
    rows = int(args.events_per_second * (args.seconds + 30))
    source = behaviour_file(
        scratch / "flow.csv", bench_serving.USERS, bench_serving.CATEGORIES, rows
    )
    applied_before = stack.applied()
    sender = send(stack, source, rate=args.events_per_second)
    time.sleep(5.0)  # the flow and the stream job's batches reach their pace
    probes: dict[str, Any] = {}
    prober = threading.Thread(
        target=lambda: probes.update(visible(stack, args.probes // 2, PROBE_USERS_FROM + 10**6))
    )
    prober.start()
    flowing_before = stack.applied()
    stream_cpu_before = stack.stream_side_cpu_seconds(sender.pid)
    redis_cpu_before = cpu_seconds(stack.redis_pid)
    flow_started = time.monotonic()
    flowing = bench_serving.run_load("recommend", port, (args.rps,), args.seconds, cpu_pids)
    applied = stack.applied() - flowing_before
    stream_cpu = stack.stream_side_cpu_seconds(sender.pid) - stream_cpu_before
    redis_cpu = cpu_seconds(stack.redis_pid) - redis_cpu_before
    flow_seconds = time.monotonic() - flow_started
    applied_rate = applied / flow_seconds
    prober.join()
    sender.terminate()
    sender.wait()
    a, b = quiet[-1], flowing[-1]
    cpu_a = sum(a["cpu_ms_per_request"][name] for name in cpu_pids)
    cpu_b = sum(b["cpu_ms_per_request"][name] for name in cpu_pids)
    return {
        "without_events": {"p99_ms": a["p99_ms"], "cpu_ms_per_answer": cpu_a},
        "with_events": {
            "p99_ms": b["p99_ms"],
            "cpu_ms_per_answer": cpu_b,
            "events_applied_per_second": applied_rate,
            "stream_side_cpu_ms_per_event": 1000 * stream_cpu / max(applied, 1),
            # Where the two cores went while the events flowed.
            "cores": {
                "stream_side": stream_cpu / flow_seconds,
                "redis": redis_cpu / flow_seconds,
                "services": cpu_b * b["achieved_rps"] / 1000,
                "generator": b["cpu_ms_per_request"]["generator"] * b["achieved_rps"] / 1000,
            },
            "applied_before_flow": applied_before,
        },
        "p99_ratio": b["p99_ms"] / a["p99_ms"],
        "cpu_ratio": cpu_b / cpu_a,
        "visible_while_flowing": probes,
    }


# ---------------------------------------------------------------- run


@contextlib.contextmanager
def data_folder(given: Path | None, scratch: Path) -> Iterator[Path]:
    if given is not None:
        yield given
        return
    out = scratch / "small"
    subprocess.run(
        [*ADREC, "data", "generate", "--preset", "small", "--out", str(out), "--quiet"],
        check=True,
    )
    yield out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a data set folder (default: generate small)")
    parser.add_argument("--rows", type=int, default=300_000, help="behavior_log rows replayed")
    parser.add_argument("--course-events", type=int, default=50_000)
    parser.add_argument("--probes", type=int, default=60, help="event-to-visible probes")
    parser.add_argument("--rps", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=30.0, help="each load step's length")
    parser.add_argument("--events-per-second", type=float, default=5000)
    parser.add_argument(
        "--stream-niceness",
        type=int,
        help="ADREC_STREAM_NICENESS of the stream job (default: the job's own default)",
    )
    parser.add_argument(
        "--stream-trigger-ms",
        type=int,
        help="ADREC_STREAM_TRIGGER_MS of the stream job (default: the job's own default)",
    )
    parser.add_argument(
        "--split-cores",
        action="store_true",
        help="in the serving runs, the stream side on the last CPU and serving on the rest",
    )
    parser.add_argument(
        "--phases",
        type=lambda text: set(text.split(",")),
        default={"visible", "sustained", "serving"},
        help="which of visible,sustained,serving to run (default: all, in that order)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer rows, probes and seconds")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.probes, args.seconds = 60_000, 20, 10.0
    report: dict[str, Any] = {
        "load_average_before": os.getloadavg(),
        "cpus": os.cpu_count(),
        "stream_niceness": "default" if args.stream_niceness is None else args.stream_niceness,
        "stream_trigger_ms": args.stream_trigger_ms or "default",
        "split_cores": args.split_cores,
    }
    with (
        tempfile.TemporaryDirectory(prefix="adrec-bench-realtime-") as tmp,
        private_redis() as server,
        contextlib.ExitStack() as stack,
    ):
        scratch = Path(tmp)
        data_dir = stack.enter_context(data_folder(args.data, scratch))
        started = time.monotonic()
        bench_serving.publish(server.url, feature_set="behaviour")
        print(f"published in {time.monotonic() - started:.1f} s", flush=True)
        cores = SplitCores(stack) if args.split_cores else None
        if cores is not None:
            cores.serving.move(server.process.pid)
        processes = Stack(
            stack,
            server.url,
            server.process.pid,
            scratch / "checkpoint",
            args.stream_niceness,
            args.stream_trigger_ms,
            cores,
        )
        started = time.monotonic()
        warm = behaviour_file(scratch / "warm.csv", 100, 100, 100, seed=11)
        finished(send(processes, warm))
        processes.wait_applied(100, STREAM_START_TIMEOUT_S)
        print(f"stream job applying events after {time.monotonic() - started:.1f} s", flush=True)

        if "visible" in args.phases:
            report["visible_idle"] = visible(processes, args.probes, PROBE_USERS_FROM)
            print(f"visible (idle): {json.dumps(report['visible_idle'])}", flush=True)
        if "sustained" in args.phases:
            report["sustained"] = sustained(
                processes, data_dir, scratch, args.rows, args.course_events
            )
            print(f"sustained: {json.dumps(report['sustained'])}", flush=True)
        if "serving" in args.phases:
            report["serving"] = serving(processes, scratch, args)
            print(f"serving: {json.dumps(report['serving'])}", flush=True)
    report["load_average_after"] = os.getloadavg()
    checks = {}
    if "sustained" in report:
        checks["sustained >= 20,000 events/s"] = (
            report["sustained"]["end_to_end_events_per_second"] >= TARGET_EVENTS_PER_SECOND
        )
    if "visible_idle" in report:
        checks["visible p99 <= 2 s (idle)"] = (
            report["visible_idle"]["p99_s"] <= TARGET_VISIBLE_P99_S
        )
    if "serving" in report:
        flowing = report["serving"]
        checks["visible p99 <= 2 s (5k events/s)"] = (
            flowing["visible_while_flowing"]["p99_s"] <= TARGET_VISIBLE_P99_S
        )
        checks["p99 with events within 25%"] = flowing["p99_ratio"] <= TARGET_RATIO
        checks["CPU per answer with events within 25%"] = flowing["cpu_ratio"] <= TARGET_RATIO
    report["targets"] = checks
    print(json.dumps(report))
    for name, ok in checks.items():
        print(f"  {'met ' if ok else 'MISSED'} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
