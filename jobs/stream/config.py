"""Configuration of the stream job, from env (the Deployment) and flags (a laptop)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from adrec.core import realtime
from adrec.core.settings import in_range, one_of, parse_int, setting


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    source: Literal["redis", "kafka", "files"] = setting(
        "ADREC_STREAM_SOURCE",
        "redis",
        "Where events come from: redis (the built-in log), kafka or files (a folder of log lines)",
        check=one_of("redis", "kafka", "files"),
    )
    checkpoint: str = setting(
        "ADREC_STREAM_CHECKPOINT",
        "",
        "Folder or URI of the query's checkpoint (offsets, de-duplication state); required",
        aliases=("--checkpoint",),
    )
    files: str = setting(
        "ADREC_STREAM_FILES",
        "",
        "With source files: the folder whose new files of event lines are read",
    )
    kafka_servers: str = setting(
        "ADREC_STREAM_KAFKA_BOOTSTRAP_SERVERS", "", "With source kafka: bootstrap servers"
    )
    kafka_topic: str = setting(
        "ADREC_STREAM_KAFKA_TOPIC", "adrec-events", "With source kafka: the topic of event lines"
    )
    starting_position: Literal["earliest", "latest"] = setting(
        "ADREC_STREAM_STARTING_POSITION",
        "earliest",
        "Where a new checkpoint starts in the log: earliest or latest",
        check=one_of("earliest", "latest"),
    )
    # An idle query only asks the log for its newest entry at each trigger: a short interval
    # costs a few cheap Redis calls and takes up to that off every event's time to visible.
    trigger_ms: int = setting(
        "ADREC_STREAM_TRIGGER_MS",
        100,
        "Milliseconds between micro-batch starts (0: start the next as soon as one ends)",
        parse=parse_int,
        check=in_range(0, 600_000),
    )
    max_batch_seconds: int = setting(
        "ADREC_STREAM_MAX_BATCH_SECONDS",
        30,
        "Most seconds of the log one batch covers, so catching up goes in bounded steps",
        parse=parse_int,
        check=in_range(1, 3600),
    )
    dedup_seconds: int = setting(
        "ADREC_STREAM_DEDUP_SECONDS",
        600,
        "An event resent within this many seconds of the first copy counts once",
        parse=parse_int,
        check=in_range(1, 86_400),
    )
    writes_per_round_trip: int = setting(
        "ADREC_STREAM_WRITES_PER_ROUND_TRIP",
        realtime.WRITES_PER_ROUND_TRIP,
        "State updates a task sends to Redis per round trip: fewer keep serving reads "
        "waiting less behind the job's writes, more apply a backlog faster",
        parse=parse_int,
        check=in_range(1, 10_000),
    )
    master: str = setting(
        "ADREC_STREAM_MASTER", "local[2]", "Spark master of a local run (spark-submit sets its own)"
    )
    local_memory: str = setting(
        "ADREC_STREAM_LOCAL_MEMORY", "1g", "JVM heap of a local run, a size such as 2g"
    )
    metrics_port: int = setting(
        "ADREC_STREAM_METRICS_PORT",
        9108,
        "Port of the Prometheus /metrics endpoint (0: none)",
        parse=parse_int,
        check=in_range(0, 65_535),
    )
    # For a host the job shares with the services (one machine, a node without CPU
    # limits). Not the default: a lowered job falls behind the events whenever the host
    # is busy (figures in docs/performance.md).
    niceness: int = setting(
        "ADREC_STREAM_NICENESS",
        0,
        "Scheduling niceness the job and its Spark processes run at (0: the caller's), so "
        "services on the same host get the CPU first",
        parse=parse_int,
        check=in_range(0, 19),
    )
    batches: int = setting(
        "ADREC_STREAM_BATCHES",
        0,
        "Stop after this many batches with events (0: run until stopped)",
        parse=parse_int,
        check=in_range(0, 10**9),
    )

    def validate(self) -> list[str]:
        problems = []
        if not self.checkpoint:
            problems.append("ADREC_STREAM_CHECKPOINT (--checkpoint) is required")
        if self.source == "files" and not self.files:
            problems.append("ADREC_STREAM_FILES is required with ADREC_STREAM_SOURCE=files")
        if self.source == "kafka" and not self.kafka_servers:
            problems.append(
                "ADREC_STREAM_KAFKA_BOOTSTRAP_SERVERS is required with ADREC_STREAM_SOURCE=kafka"
            )
        return problems
