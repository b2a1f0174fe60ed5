"""The stream job's entry point: `adrec stream run` and spark-submit both land here.

    spark-submit --master local[2] jobs/stream/main.py --checkpoint DIR --redis URL

It wires source -> parse -> de-duplicate -> per-batch sink and exports its metrics; the
transforms are in :mod:`jobs.stream.transform`, the writes in :mod:`jobs.stream.sink`.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import threading
import time
from typing import Any

import redis

from adrec.core import settings
from adrec.core.events import SERVING_PATHS, Kind
from adrec.core.redis_conn import RedisSettings, redacted
from jobs.stream.config import StreamConfig

log = logging.getLogger("adrec.stream")


class StreamUsageError(Exception):
    """Bad settings: one clear line, exit code 2."""


class StreamFailedError(Exception):
    """The query stopped on an error: one line naming it, exit code 1; a restart resumes
    from the checkpoint."""


#: Label value of an impression or click that did not say which path or model served it.
UNKNOWN = "unknown"
OTHER = "other"
#: Distinct model versions labelled before the rest share OTHER: a few publishes' worth.
MAX_MODEL_VERSIONS = 16


class StreamMetrics:
    """What the stream job exports on /metrics; every series exists from the start."""

    def __init__(self, port: int):
        from prometheus_client import (  # noqa: PLC0415 - only the running job needs it
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            start_http_server,
        )

        from adrec.core.dataset import PIDS  # noqa: PLC0415

        self.registry = CollectorRegistry()
        self.events = Counter(
            "adrec_stream_events", "Events applied, by kind", ["kind"], registry=self.registry
        )
        attribution = ["pid", "serving_path", "model_version"]
        self.impressions = Counter(
            "adrec_stream_impressions",
            "Impressions applied, by placement and by the serving path and model version "
            "of the answer that showed the ad (the online CTR's denominator)",
            attribution,
            registry=self.registry,
        )
        self.clicks = Counter(
            "adrec_stream_clicks",
            "Clicks applied, by placement, serving path and model version",
            attribution,
            registry=self.registry,
        )
        self.model_versions: set[str] = set()
        self.batch_seconds = Histogram(
            "adrec_stream_batch_seconds",
            "Time to apply one micro-batch",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.last_batch = Gauge(
            "adrec_stream_last_batch_timestamp_seconds",
            "When the last micro-batch with events finished",
            registry=self.registry,
        )
        self.lag = Gauge(
            "adrec_stream_lag_seconds",
            "From the newest event of the last batch reaching the log to its state being written",
            registry=self.registry,
        )
        for kind in Kind:
            self.events.labels(kind.value)
        for pid in PIDS:
            for path in (*SERVING_PATHS, UNKNOWN):
                self.impressions.labels(pid, path, UNKNOWN)
                self.clicks.labels(pid, path, UNKNOWN)
        self.server: Any = None
        if port:
            self.server, _ = start_http_server(port, registry=self.registry)

    def record(self, outcome: Any) -> None:
        for kind, count in outcome.events_by_kind.items():
            self.events.labels(kind).inc(count)
        for served, count in outcome.impressions.items():
            self.impressions.labels(*self._labels(served)).inc(count)
        for served, count in outcome.clicks.items():
            self.clicks.labels(*self._labels(served)).inc(count)
        self.batch_seconds.observe(outcome.seconds)
        now = time.time()
        self.last_batch.set(now)
        if outcome.newest_received is not None:
            self.lag.set(max(0.0, now - outcome.newest_received))

    def _labels(self, served: Any) -> tuple[str, str, str]:
        """Label values of an attribution; model versions beyond the first
        MAX_MODEL_VERSIONS seen share one value, so reported strings cannot grow the
        series without bound."""
        model = served.model_version or UNKNOWN
        if model not in self.model_versions:
            if len(self.model_versions) >= MAX_MODEL_VERSIONS:
                model = OTHER
            else:
                self.model_versions.add(model)
        return served.pid, served.serving_path or UNKNOWN, model

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    settings.add_flags(StreamConfig, parser)
    settings.add_flags(RedisSettings, parser)


def raw_events(session: Any, config: StreamConfig) -> Any:
    """The source's raw rows (position, received, line), whichever source is configured."""
    from pyspark.sql import functions as sf  # noqa: PLC0415 - pyspark after validation

    if config.source == "redis":
        from jobs.stream.redis_source import RedisStreamSource  # noqa: PLC0415

        session.dataSource.register(RedisStreamSource)
        return (
            session.readStream.format(RedisStreamSource.name())
            .option("starting_position", config.starting_position)
            .option("max_batch_seconds", str(config.max_batch_seconds))
            .option("slices", str(session.sparkContext.defaultParallelism))
            .load()
        )
    if config.source == "kafka":
        return (
            session.readStream.format("kafka")
            .option("kafka.bootstrap.servers", config.kafka_servers)
            .option("subscribe", config.kafka_topic)
            .option("startingOffsets", config.starting_position)
            .load()
            .select(
                sf.concat_ws(":", "partition", "offset").alias("position"),
                sf.col("timestamp").alias("received"),
                sf.col("value").cast("string").alias("line"),
            )
        )
    return (
        session.readStream.format("text")
        .load(config.files)
        .select(
            sf.input_file_name().alias("position"),
            sf.current_timestamp().alias("received"),
            sf.col("value").alias("line"),
        )
    )


def shuffle_partitions(master: str) -> int:
    """Two per core the query has: the number is fixed into the checkpoint on its first run,
    and a pod's node may have many more cores than its CPU limit lets it use."""
    match = re.fullmatch(r"local\[(\d+)(?:,\d+)?\]", master)
    cores = int(match[1]) if match else os.cpu_count() or 2
    return 2 * max(cores, 1)


def _as_env(instance: Any) -> dict[str, str]:
    """Settings as the environment variables that load them again."""
    env = {}
    for name, spec in settings.specs(type(instance)).items():
        value = getattr(instance, name)
        env[spec.env] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def checkpoint_run_id(session: Any, checkpoint: str) -> str:
    """The query id Spark keeps in the checkpoint: the same across restarts from it."""
    import json  # noqa: PLC0415

    line = session.read.text(f"{checkpoint.rstrip('/')}/metadata").first()
    return str(json.loads(line["value"])["id"])


def run_stream(config: StreamConfig, redis_settings: RedisSettings) -> int:
    """Run the query until stopped (or ``config.batches`` batches with events)."""
    from jobs.spark import build_session  # noqa: PLC0415 - pyspark after validation
    from jobs.stream.sink import BatchSink  # noqa: PLC0415
    from jobs.stream.transform import deduplicated, parse_lines  # noqa: PLC0415

    # Executors (Python workers) read Redis settings from the environment, never from
    # Spark options, which Spark may print.
    os.environ.update(_as_env(redis_settings))
    if config.niceness:
        # Before the JVM starts: Spark's processes inherit it.
        os.nice(config.niceness)
    session = build_session(
        config.master,
        "adrec-stream",
        {
            "spark.sql.shuffle.partitions": str(shuffle_partitions(config.master)),
            "spark.sql.streaming.stateStore.providerClass": (
                "org.apache.spark.sql.execution.streaming.state.RocksDBStateStoreProvider"
            ),
            # A batch's state commit writes the changes, not a snapshot of every store.
            "spark.sql.streaming.stateStore.rocksdb.changelogCheckpointing.enabled": "true",
            # Without it each batch is followed by one without data that only moves the
            # de-duplication's watermark on; an event arriving meanwhile waits for it.
            "spark.sql.streaming.noDataMicroBatches.enabled": "false",
        },
        local_memory=config.local_memory,
    )
    metrics = StreamMetrics(config.metrics_port)
    done = threading.Event()
    applied = [0]

    def on_batch(outcome: Any) -> None:
        metrics.record(outcome)
        applied[0] += 1
        print(
            f"adrec stream: batch {outcome.batch_id}: "
            f"{sum(outcome.events_by_kind.values()):,} events, "
            f"{outcome.values_changed:,} values changed, {outcome.seconds:.2f} s",
            flush=True,
        )
        if config.batches and applied[0] >= config.batches:
            done.set()

    sink: Any = None

    def each_batch(batch: Any, batch_id: int) -> None:
        nonlocal sink
        if sink is None:
            sink = BatchSink(
                session,
                checkpoint_run_id(session, config.checkpoint),
                on_batch,
                config.writes_per_round_trip,
            )
        sink(batch, batch_id)

    parsed = parse_lines(raw_events(session, config))
    query = (
        deduplicated(parsed, config.dedup_seconds)
        .writeStream.foreachBatch(each_batch)
        .option("checkpointLocation", config.checkpoint)
        .trigger(processingTime=f"{config.trigger_ms} milliseconds")
        .start()
    )
    print(
        f"adrec stream: reading {config.source} events into {redacted(redis_settings.url)}, "
        f"checkpoint {config.checkpoint}",
        flush=True,
    )
    from pyspark.errors import StreamingQueryException  # noqa: PLC0415

    try:
        while query.isActive and not done.is_set():
            query.awaitTermination(1)
    except StreamingQueryException as error:
        raise StreamFailedError(_first_line(error)) from None
    except KeyboardInterrupt:
        pass
    finally:
        query.stop()
        metrics.stop()
        session.stop()
    return 0


def _first_line(error: BaseException) -> str:
    # Spark's message opens with the cause and goes on with the whole query plan.
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def run(args: argparse.Namespace) -> int:
    try:
        config = settings.load(StreamConfig, flags=args)
        redis_settings = settings.load(RedisSettings, flags=args)
    except settings.SettingsError as exc:
        raise StreamUsageError(str(exc)) from None
    return run_stream(config, redis_settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="jobs/stream/main.py", description="Fold reported events into real-time state."
    )
    add_run_flags(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except StreamUsageError as exc:
        print(f"adrec stream: error: {exc}", file=sys.stderr)
        return 2
    except StreamFailedError as exc:
        print(f"adrec stream: error: {exc}", file=sys.stderr)
        return 1
    except redis.ConnectionError as exc:
        print(f"adrec stream: error: cannot reach Redis: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
