"""Each micro-batch, applied to Redis: the ad table of the active version, the writes, metrics.

``foreachBatch`` may run a batch again after a failure (Structured Streaming's guarantee is
at least once); the state script makes the second run a no-op for every value the first
reached, so the job's effect is exactly once per event.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as sf

from adrec.core import keys, realtime, settings, store
from adrec.core.events import Kind
from adrec.core.redis_conn import RedisSettings, connect
from jobs.stream.transform import fold_contributions, state_contributions

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
    """The active version's ad table as a small DataFrame, rebuilt when the version changes."""

    def __init__(self, session: SparkSession, client: Any):
        self.session = session
        self.client = client
        self.version: str | None = None
        self.frame = self._frame({column: np.zeros(0, np.int64) for column in AD_COLUMNS})

    def _frame(self, table: dict[str, np.ndarray]) -> DataFrame:
        # From Arrow: the whole ad table goes over in a few buffers, not one row at a time.
        columns = pa.table({column: table[column].astype(np.int64) for column in AD_COLUMNS})
        return self.session.createDataFrame(columns)

    def current(self) -> DataFrame:
        version = store.active_version(self.client)
        if version is not None and version != self.version:
            table = store.read(self.client, keys.ADS, version)
            if table is not None:
                self.frame.unpersist()
                self.frame = self._frame(table).cache()
                self.version = version
                log.info("stream job follows data version %s (%d ads)", version, self.frame.count())
        return self.frame


def _write_partition(run: str, batch_id: int, now: int) -> Any:
    def write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        # Arrow in, columns to Python lists: far cheaper than one pickled Row per row.
        rows = (
            row
            for batch in batches
            for row in zip(*(column.to_pylist() for column in batch.columns), strict=True)
        )
        updates = fold_contributions(rows, realtime.INTEREST_HALF_LIFE_SECONDS)
        changed = 0
        if updates:
            client = connect(settings.load(RedisSettings))
            try:
                writer = realtime.StateWriter(client, realtime.StateSettings())
                changed = writer.apply(run, batch_id, now, updates)
            finally:
                client.close()
        yield pa.RecordBatch.from_arrays([pa.array([changed], pa.int64())], names=["changed"])

    return write


class BatchSink:
    """The ``foreachBatch`` function of the stream query."""

    def __init__(self, session: SparkSession, run: str, on_batch: Any):
        self.session = session
        self.run = run
        self.client = connect(settings.load(RedisSettings))
        self.ads = ActiveAds(session, self.client)
        self.on_batch = on_batch

    def __call__(self, batch: DataFrame, batch_id: int) -> None:
        started = time.monotonic()
        batch = batch.persist()
        try:
            summary = (
                batch.groupBy("kind", "pid", "serving_path", "model_version")
                .agg(sf.count(sf.lit(1)).alias("events"), sf.max("received").alias("newest"))
                .collect()
            )
            if not summary:
                return
            contributions = state_contributions(batch, self.ads.current())
            now = int(time.time())
            # One value's contributions must meet in one task: the script is per value.
            written = (
                contributions.repartition("target", "member")
                .mapInArrow(_write_partition(self.run, batch_id, now), "changed long")
                .collect()
            )
            changed = sum(row["changed"] for row in written)
        finally:
            batch.unpersist()
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
        newest = max(row["newest"] for row in summary)
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
