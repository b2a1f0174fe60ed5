"""Loading a DataFrame into a data version from the executors.

Each task opens one Redis connection and writes its Arrow batches through
:class:`adrec.core.store.VersionWriter` (pipelined), so rows never travel to the driver
and the keys and value codecs are the ones the services read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as sf

from adrec.core.redis_conn import RedisSettings, connect
from adrec.core.store import VersionWriter
from jobs.spark import aggregate_row

#: Writes one batch's rows with the writer and returns the number of keys written.
PutBatch = Callable[[VersionWriter, pa.RecordBatch], int]


def write_from_executors(
    frame: DataFrame, redis: RedisSettings, version: str, put_batch: PutBatch
) -> int:
    """Apply ``put_batch`` to every batch of ``frame`` on the executors; returns keys written."""

    def write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        client = connect(redis)
        try:
            writer = VersionWriter(client, version)
            for batch in batches:
                written = put_batch(writer, batch)
                yield pa.RecordBatch.from_arrays(
                    [pa.array([written], pa.int64())], names=["written"]
                )
        finally:
            client.close()

    rows = frame.mapInArrow(write, "written long")
    return int(aggregate_row(rows.agg(sf.sum("written")))[0] or 0)
