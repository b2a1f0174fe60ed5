"""Each micro-batch, applied to Redis: the ad table of the active version, the writes, metrics.

Each task writes the part of the batch it holds (the de-duplicated events partitioned by
user), so a batch is one Spark job. ``foreachBatch`` may run a batch again after a failure
(Structured Streaming's guarantee is at least once) with the same events in the same
parts: the state script, told the part, makes the second run a no-op
for every value the first reached, so the job's effect is exactly once per event.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame, SparkSession

from adrec.core import keys, realtime, settings, store
from adrec.core.events import Kind
from adrec.core.redis_conn import RedisSettings, connect
from jobs.stream.transform import AdLookup, batch_summary, fold_contributions, state_contributions

log = logging.getLogger("adrec.stream")

AD_COLUMNS = ("adgroup_id", "cate_id", "campaign_id", "customer_id")


class Attribution(NamedTuple):
    pid: str
    serving_path: str
    model_version: str


@dataclasses.dataclass(frozen=True)
class BatchOutcome:
    batch_id: int
    events_by_kind: dict[str, int]
    #: By what the events say of the answer that showed the ad: (pid, serving path,
    #: model version), the last two empty when not reported.
    clicks: dict[Attribution, int]
    impressions: dict[Attribution, int]
    values_changed: int
    seconds: float
    newest_received: float | None


class ActiveAds:
    """The active version's ad table, broadcast to the tasks once per version as Arrow IPC
    bytes (a few buffers, not pickled rows)."""

    def __init__(self, session: SparkSession, client: Any):
        self.session = session
        self.client = client
        self.version = ""
        self.table: Any = self.session.sparkContext.broadcast(
            _ipc({column: np.zeros(0, np.int64) for column in AD_COLUMNS})
        )

    def current(self) -> tuple[str, Any]:
        """The version followed and the broadcast of its ad table."""
        version = store.active_version(self.client)
        if version is not None and version != self.version:
            table = store.read(self.client, keys.ADS, version)
            if table is not None:
                self.table.unpersist()
                self.table = self.session.sparkContext.broadcast(_ipc(table))
                self.version = version
                log.info(
                    "stream job follows data version %s (%d ads)", version, len(table["adgroup_id"])
                )
        return self.version, self.table


def _ipc(table: dict[str, np.ndarray]) -> bytes:
    columns = pa.table({column: table[column].astype(np.int64) for column in AD_COLUMNS})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, columns.schema) as writer:
        writer.write_table(columns)
    return bytes(sink.getvalue().to_pybytes())


#: In each Python worker: the ad table of the version its last task followed.
_WORKER_ADS: dict[str, AdLookup] = {}


def _lookup(version: str, table: Any) -> AdLookup:
    found = _WORKER_ADS.get(version)
    if found is None:
        read = pa.ipc.open_stream(table.value).read_all()
        found = AdLookup({column: read.column(column).to_numpy() for column in AD_COLUMNS})
        _WORKER_ADS.clear()
        _WORKER_ADS[version] = found
    return found


#: What each task returns: its events by kind and attribution, with the newest event's
#: arrival, and one row (kind null) with the number of state values it changed.
SUMMARY_SCHEMA = (
    "kind string, pid string, serving_path string, model_version string, events long, "
    "newest timestamp, changed long"
)
_NEEDED = ("kind", "user_id", "time", "ad_id", "cate_id", "brand_id", "pid", "serving_path")


def _apply_part(
    run: str, batch_id: int, now: int, version: str, table: Any, writes_per_round_trip: int
) -> Any:
    def apply(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext  # noqa: PLC0415 - only inside a task

        columns: dict[str, list[Any]] = {name: [] for name in (*_NEEDED, "model_version")}
        newest = None
        for batch in batches:
            for name, values in columns.items():
                values.extend(batch.column(name).to_pylist())
            received = pc.max(batch.column("received")).as_py()
            if received is not None and (newest is None or received > newest):
                newest = received
        if not columns["kind"]:
            return
        contributions = state_contributions(columns, _lookup(version, table))
        updates = fold_contributions(contributions, realtime.INTEREST_HALF_LIFE_SECONDS)
        task = TaskContext.get()
        assert task is not None, "runs in a Spark task"
        client = connect(settings.load(RedisSettings))
        try:
            writer = realtime.StateWriter(client, realtime.StateSettings(), writes_per_round_trip)
            changed = writer.apply(run, batch_id, now, updates, part=task.partitionId())
        finally:
            client.close()
        summary = batch_summary(columns)
        groups = list(summary)
        yield pa.RecordBatch.from_pydict(
            {
                "kind": [group[0] for group in groups] + [None],
                "pid": [group[1] for group in groups] + [None],
                "serving_path": [group[2] for group in groups] + [None],
                "model_version": [group[3] for group in groups] + [None],
                "events": [summary[group] for group in groups] + [0],
                "newest": [newest] * len(groups) + [None],
                "changed": [0] * len(groups) + [changed],
            },
            schema=pa.schema(
                [
                    ("kind", pa.string()),
                    ("pid", pa.string()),
                    ("serving_path", pa.string()),
                    ("model_version", pa.string()),
                    ("events", pa.int64()),
                    ("newest", pa.timestamp("us", tz="UTC")),
                    ("changed", pa.int64()),
                ]
            ),
        )

    return apply


class BatchSink:
    """The ``foreachBatch`` function of the stream query: one Spark job per micro-batch,
    each task writing the part of the batch it holds, all of a user's events in one part."""

    def __init__(self, session: SparkSession, run: str, on_batch: Any, writes_per_round_trip: int):
        self.session = session
        self.run = run
        self.writes_per_round_trip = writes_per_round_trip
        self.client = connect(settings.load(RedisSettings))
        self.ads = ActiveAds(session, self.client)
        self.on_batch = on_batch
        self.parts: int | None = None

    def __call__(self, batch: DataFrame, batch_id: int) -> None:
        started = time.monotonic()
        version, table = self.ads.current()
        now = int(time.time())
        # A user's state is one value, rewritten whole by each script call: all of a
        # user's events in one part make it one call per batch. The de-duplication's parts
        # follow the event id, which would spread a user over every part.
        # As many parts as the de-duplication has, a number its checkpoint fixes: a batch
        # replayed after a restart with other settings is cut the same way.
        if self.parts is None:
            self.parts = batch.rdd.getNumPartitions()
        parts = batch.repartition(self.parts, "user_id")
        rows = parts.mapInArrow(
            _apply_part(self.run, batch_id, now, version, table, self.writes_per_round_trip),
            SUMMARY_SCHEMA,
        ).collect()
        summary = [row for row in rows if row["kind"] is not None]
        if not summary:
            return
        changed = sum(row["changed"] for row in rows)
        by_kind: dict[str, int] = {}
        clicks: dict[Attribution, int] = {}
        impressions: dict[Attribution, int] = {}
        for row in summary:
            by_kind[row["kind"]] = by_kind.get(row["kind"], 0) + row["events"]
            served = Attribution(row["pid"], row["serving_path"], row["model_version"])
            if row["kind"] == Kind.CLICK.value:
                clicks[served] = clicks.get(served, 0) + row["events"]
            elif row["kind"] == Kind.IMPRESSION.value:
                impressions[served] = impressions.get(served, 0) + row["events"]
        newest = max((row["newest"] for row in summary if row["newest"] is not None), default=None)
        self.on_batch(
            BatchOutcome(
                batch_id,
                by_kind,
                clicks,
                impressions,
                changed,
                time.monotonic() - started,
                newest.timestamp() if newest is not None else None,
            )
        )
