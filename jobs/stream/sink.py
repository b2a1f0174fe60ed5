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
from typing import Any

import numpy as np
from pyspark.sql import DataFrame, Row, SparkSession
from pyspark.sql import functions as sf

from adrec.core import keys, realtime, settings, store
from adrec.core.events import Kind
from adrec.core.redis_conn import RedisSettings, connect
from jobs.stream.transform import fold_contributions, state_contributions

log = logging.getLogger("adrec.stream")

AD_COLUMNS = ("adgroup_id", "cate_id", "campaign_id", "customer_id")


@dataclasses.dataclass(frozen=True)
class BatchOutcome:
    batch_id: int
    events_by_kind: dict[str, int]
    clicks_by_pid: dict[str, int]
    impressions_by_pid: dict[str, int]
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
        rows = zip(*(table[column].astype(np.int64).tolist() for column in AD_COLUMNS), strict=True)
        schema = ", ".join(f"{column} long" for column in AD_COLUMNS)
        return self.session.createDataFrame(list(rows), schema)

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
    def write(rows: Iterator[Row]) -> Iterator[int]:
        updates = fold_contributions(
            (tuple(row) for row in rows), realtime.INTEREST_HALF_LIFE_SECONDS
        )
        if not updates:
            yield 0
            return
        client = connect(settings.load(RedisSettings))
        try:
            writer = realtime.StateWriter(client, realtime.StateSettings())
            yield writer.apply(run, batch_id, now, updates)
        finally:
            client.close()

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
                batch.groupBy("kind", "pid")
                .agg(sf.count(sf.lit(1)).alias("events"), sf.max("received").alias("newest"))
                .collect()
            )
            if not summary:
                return
            contributions = state_contributions(batch, self.ads.current())
            now = int(time.time())
            # One value's contributions must meet in one task: the script is per value.
            changed = sum(
                contributions.repartition("target", "member")
                .rdd.mapPartitions(_write_partition(self.run, batch_id, now))
                .collect()
            )
        finally:
            batch.unpersist()
        by_kind: dict[str, int] = {}
        clicks: dict[str, int] = {}
        impressions: dict[str, int] = {}
        for row in summary:
            by_kind[row["kind"]] = by_kind.get(row["kind"], 0) + row["events"]
            if row["kind"] == Kind.CLICK.value:
                clicks[row["pid"]] = clicks.get(row["pid"], 0) + row["events"]
            elif row["kind"] == Kind.IMPRESSION.value:
                impressions[row["pid"]] = impressions.get(row["pid"], 0) + row["events"]
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
