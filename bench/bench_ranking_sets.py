"""Ranking's cost per request by feature set: `full` against `behaviour` (history counts and
crosses), side by side in one run, each served by all three services under the same load.

Run: ``.venv/bin/python bench/bench_ranking_sets.py`` (about three minutes; ``--quick``
shortens the load steps; figures in docs/performance.md, "Ranking by feature set").

For each round and each set, in turn: a private redis-server, bench_serving's version
(10k users with 500-id recall lists, 100k ads, 5k categories) with a model of that set,
every user given a real-time state of ``--counts`` category and brand counts (written by
the stream job's own state writer, so ranking reads and decodes them as it does live), and
``adrec serve recall|ranking|gateway``; then Recommend REALTIME at ``--rps`` for
``--seconds`` through bench_serving's open-loop generator. Reported per set: the ranking
process's CPU per request, Recommend's p99, and the ratio of the medians over rounds.

Targets (2 cores): ranking CPU per request with `behaviour` at most +30% against `full`;
Recommend p99 at 100 rps at most 15 ms with `behaviour`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import bench_serving  # noqa: E402 - a sibling script, found through the path above

from adrec.core import events, keys, realtime  # noqa: E402
from adrec.core.redis_server import private_redis  # noqa: E402

SETS = ("full", "behaviour")
TARGET_CPU_RATIO = 1.30
TARGET_P99_MS = 15.0


def seed_states(redis_url: str, counts_per_user: int, seed: int = 5) -> None:
    """Gives every benchmark user a state of `counts_per_user` count fields over the last day."""
    rng = np.random.default_rng(seed)
    now = int(time.time())
    client = redis.Redis.from_url(redis_url)
    writer = realtime.StateWriter(client, realtime.StateSettings())
    kinds = (events.Kind.PAGE_VIEW, events.Kind.CART, events.Kind.IMPRESSION, events.Kind.CLICK)
    updates = []
    for user in range(1, bench_serving.USERS + 1):
        fields = []
        for _ in range(counts_per_user):
            kind = kinds[int(rng.integers(len(kinds)))]
            scope = (
                events.Scope.BRAND
                if kind is events.Kind.PAGE_VIEW and rng.random() < 0.5
                else (events.Scope.CATEGORY)
            )
            member = int(rng.integers(1, bench_serving.CATEGORIES + 1))
            bucket = events.bucket_of(now - int(rng.integers(0, 86_400)))
            fields.append(
                (events.count_field(kind, scope, member, bucket), int(rng.integers(1, 4)))
            )
        updates.append(realtime.StateUpdate(keys.REALTIME_USER.key(user), fields))
    writer.apply("bench", 1, now, updates)
    client.close()


def one_set(feature_set: str, args: argparse.Namespace) -> dict[str, Any]:
    with private_redis() as server, contextlib.ExitStack() as stack:
        bench_serving.publish(server.url, feature_set=feature_set)
        seed_states(server.url, args.counts)
        ports = {name: bench_serving.free_port() for name in ("recall", "ranking", "gateway")}
        common = {"REDIS_URL": server.url, "ADREC_HOST": "127.0.0.1", "ADREC_LOG_LEVEL": "warning"}
        pids = {}
        for name in ("recall", "ranking", "gateway"):
            env = {
                **common,
                f"ADREC_{name.upper()}_PORT": str(ports[name]),
                "ADREC_METRICS_PORT": str(bench_serving.free_port()),
            }
            if name == "gateway":
                env["ADREC_RECALL_ADDRESS"] = f"127.0.0.1:{ports['recall']}"
                env["ADREC_RANKING_ADDRESS"] = f"127.0.0.1:{ports['ranking']}"
            process = stack.enter_context(
                bench_serving.started([*bench_serving.ADREC, "serve", name], env)
            )
            pids[name] = process.pid
        for name in ("recall", "ranking", "gateway"):
            bench_serving.wait_serving(ports[name])
        # A first step warms the caches and the version's compiled model up; the second counts.
        steps = bench_serving.run_load(
            "recommend", ports["gateway"], (args.rps, args.rps), args.seconds, pids
        )
    step = steps[-1]
    return {
        "ranking_cpu_ms": step["cpu_ms_per_request"]["ranking"],
        "services_cpu_ms": sum(step["cpu_ms_per_request"][name] for name in pids),
        "p99_ms": step["p99_ms"],
        "outcomes": step["outcomes"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rps", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=20.0, help="each load step's length")
    parser.add_argument("--counts", type=int, default=60, help="count fields per user's state")
    parser.add_argument("--quick", action="store_true", help="one round of shorter steps")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = 1, 8.0
    report: dict[str, Any] = {"load_average_before": os.getloadavg(), "rounds": []}
    for index in range(args.rounds):
        results = {name: one_set(name, args) for name in SETS}
        report["rounds"].append(results)
        print(f"round {index + 1}: {json.dumps(results)}", flush=True)
    median = {
        name: {
            figure: statistics.median(r[name][figure] for r in report["rounds"])
            for figure in ("ranking_cpu_ms", "services_cpu_ms", "p99_ms")
        }
        for name in SETS
    }
    report["median"] = median
    report["ranking_cpu_ratio"] = (
        median["behaviour"]["ranking_cpu_ms"] / median["full"]["ranking_cpu_ms"]
    )
    report["load_average_after"] = os.getloadavg()
    checks = {
        "ranking CPU per request, behaviour / full <= 1.30": report["ranking_cpu_ratio"]
        <= TARGET_CPU_RATIO,
        "Recommend p99 <= 15 ms with behaviour": median["behaviour"]["p99_ms"] <= TARGET_P99_MS,
    }
    report["targets"] = checks
    print(json.dumps(report))
    for name, ok in checks.items():
        print(f"  {'met ' if ok else 'MISSED'} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
