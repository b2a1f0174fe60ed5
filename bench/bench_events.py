"""Event throughput: the intake (`adrec events send` into `adrec serve events`) against the
course's per-event writes, in one run.

Run: ``.venv/bin/python bench/bench_events.py`` (a few minutes; figures in
docs/performance.md, "Event intake"). ``--data DIR`` reuses a generated data set holding
``behavior_log.csv``; ``--phases`` picks the phases to run.

Everything runs on this machine against a private redis-server on a free loopback port:

1. ``intake``: a slice of a synthetic ``behavior_log`` (the ``small`` preset, its first
   ``--rows`` rows) replayed with ``adrec events send`` (default batches of 1000, several
   in flight) into ``adrec serve events``, each in its own process; the intake accepts the
   slice's weeks of event times (a backfill). Reported: events per second as the command
   measures it, and the CPU time per event of the intake, the sender and redis-server.
   Then the course's way for the same events, per event one unpipelined ``SADD`` (the
   user's category set) and one ``HSET`` (the user's last category) from one client, over
   ``--course-events`` of them. Then the log's writer on its own, in this process: the
   same batches appended through ``EventLog`` (one packed MULTI/EXEC per batch) and
   through redis-py's transactional pipeline, microseconds per event.

A second phase, the stream job consuming the log, is to be added to ``PHASES``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis

from adrec.core import keys
from adrec.core.dataset import BEHAVIOR_LOG
from adrec.core.events import LOG_FIELD
from adrec.core.redis_server import PrivateRedis, private_redis

ADREC = (sys.executable, "-c", "import sys; from adrec.cli import main; sys.exit(main())")
#: Oldest event time the intake takes in the bench: the synthetic log spans about three weeks.
BACKFILL_SECONDS = 40 * 86_400
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time process `pid` has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


@contextlib.contextmanager
def intake_process(server: PrivateRedis) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """`adrec serve events` on free loopback ports: the process and its gRPC port."""
    env = {
        **os.environ,
        "REDIS_URL": server.url,
        "ADREC_HOST": "127.0.0.1",
        "ADREC_EVENTS_PORT": "0",
        "ADREC_METRICS_PORT": "0",
        "ADREC_LOG_LEVEL": "warning",
        "ADREC_EVENTS_MAX_AGE_SECONDS": str(BACKFILL_SECONDS),
    }
    process = subprocess.Popen(
        [*ADREC, "serve", "events"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        port = None
        for line in process.stdout:
            if line.startswith("events listening on "):
                port = int(line.rsplit(":", 1)[1])
            if line.startswith("metrics listening on "):
                break
        if port is None:
            raise RuntimeError("adrec serve events did not start")
        yield process, port
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def behavior_slice(source: Path, rows: int, out: Path) -> Path:
    """The header and the first `rows` rows of a behavior_log file."""
    with source.open() as reader, out.open("w") as writer:
        for index, line in enumerate(reader):
            if index > rows:
                break
            writer.write(line)
    return out


def course_way(client: redis.Redis, rows: list[list[str]]) -> float:
    """Seconds for the course's per-event writes of `rows`: one SADD, one HSET each."""
    start = time.perf_counter()
    for user, _, _, cate, _ in rows:
        client.sadd(f"bench:course:cates:{user}", cate)
        client.hset(f"bench:course:user:{user}", "last_cate", cate)
    return time.perf_counter() - start


def writer_comparison(url: str, lines: list[bytes], batch: int) -> dict[str, float]:
    """Microseconds per event of appending `lines` in batches: EventLog vs redis-py."""
    import redis.asyncio

    from services.events.log import EventLog
    from services.runtime.metrics import Metrics

    async def compare() -> dict[str, float]:
        client = redis.asyncio.Redis.from_url(url)
        log = EventLog(client, Metrics().service("bench"), 5_000_000, 30.0)
        batches = [lines[i : i + batch] for i in range(0, len(lines), batch)]
        start = time.perf_counter()
        for each in batches:
            await log.append(each)
        packed = time.perf_counter() - start
        start = time.perf_counter()
        for each in batches:
            async with client.pipeline(transaction=True) as pipe:
                for line in each:
                    pipe.xadd(keys.EVENT_LOG, {LOG_FIELD: line}, maxlen=5_000_000, approximate=True)
                pipe.xlen(keys.EVENT_LOG)
                await pipe.execute()
        pipelined = time.perf_counter() - start
        await client.aclose()
        return {
            "event_log_us_per_event": packed / len(lines) * 1e6,
            "redis_py_pipeline_us_per_event": pipelined / len(lines) * 1e6,
        }

    return asyncio.run(compare())


def run_intake(args: argparse.Namespace, data_dir: Path, scratch: Path) -> dict[str, Any]:
    source = behavior_slice(
        data_dir / BEHAVIOR_LOG.csv_file, args.rows, scratch / BEHAVIOR_LOG.csv_file
    )
    with source.open() as handle:
        rows = [line.rstrip("\n").split(",") for line in handle][1:]
    good = [row for row in rows if int(row[1]) > 0]
    result: dict[str, Any] = {"rows": len(rows), "events_expected": len(good)}
    with private_redis() as server:
        client = redis.Redis.from_url(server.url)
        with intake_process(server) as (intake, port):
            before = {"intake": cpu_seconds(intake.pid), "redis": redis_cpu(client)}
            started = time.perf_counter()
            sender = subprocess.Popen(
                [*ADREC, "events", "send", str(source), "--events", f"127.0.0.1:{port}"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            sender_cpu = 0.0
            # Sampled while it runs: its /proc entry is gone once it is reaped.
            while sender.poll() is None:
                with contextlib.suppress(OSError):
                    sender_cpu = cpu_seconds(sender.pid)
                time.sleep(0.05)
            wall = time.perf_counter() - started
            out, err = sender.communicate()
            if sender.returncode != 0:
                raise RuntimeError(f"adrec events send failed: {err.strip()}")
            after = {"intake": cpu_seconds(intake.pid), "redis": redis_cpu(client)}
        logged = client.xlen(keys.EVENT_LOG)
        if logged != len(good):
            raise RuntimeError(f"the log holds {logged} events, expected {len(good)}")
        summary = out.strip().splitlines()[-1]
        result.update(
            {
                "sender_summary": summary,
                "events_per_second": float(summary.rsplit(", ", 1)[1].split()[0].replace(",", "")),
                "wall_seconds_with_start": wall,
                "cpu_us_per_event": {
                    "intake": (after["intake"] - before["intake"]) / logged * 1e6,
                    "sender": sender_cpu / logged * 1e6,
                    "redis": (after["redis"] - before["redis"]) / logged * 1e6,
                },
            }
        )
        entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(  # type: ignore[assignment]
            keys.EVENT_LOG, count=args.writer_events
        )
        lines = [fields[LOG_FIELD] for _, fields in entries]
        client.delete(keys.EVENT_LOG)
        course = good[: args.course_events]
        seconds = course_way(client, course)
        result["course"] = {
            "events": len(course),
            "seconds": seconds,
            "events_per_second": len(course) / seconds,
        }
        result["writer"] = writer_comparison(server.url, lines, 1000)
        client.close()
    result["speedup_over_course"] = (
        result["events_per_second"] / result["course"]["events_per_second"]
    )
    return result


#: Phase name -> what it runs, given the arguments, the data folder and a scratch folder.
PHASES: dict[str, Callable[[argparse.Namespace, Path, Path], dict[str, Any]]] = {
    "intake": run_intake,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a data set folder (default: generate small)")
    parser.add_argument("--rows", type=int, default=200_000, help="behavior_log rows replayed")
    parser.add_argument(
        "--course-events", type=int, default=50_000, help="events written the course's way"
    )
    parser.add_argument(
        "--writer-events", type=int, default=100_000, help="events in the writer comparison"
    )
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated phases")
    args = parser.parse_args()
    phases = args.phases.split(",")
    unknown = set(phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}; choose from {', '.join(PHASES)}")

    report: dict[str, Any] = {"load_average_before": os.getloadavg(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="adrec-bench-events-") as tmp:
        scratch = Path(tmp)
        data_dir = args.data
        if data_dir is None:
            data_dir = scratch / "small"
            subprocess.run(
                [
                    *ADREC,
                    "data",
                    "generate",
                    "--preset",
                    "small",
                    "--out",
                    str(data_dir),
                    "--quiet",
                ],
                check=True,
            )
        for phase in phases:
            report[phase] = PHASES[phase](args, data_dir, scratch)
            print(f"{phase}: {json.dumps(report[phase], indent=2)}", flush=True)
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
