"""The Spark stages: recall lists computed on the executors, written to Redis, counted.

Each partition runs :func:`jobs.recall.lists.recall_chunk` over blocks of
``chunk_users`` users with one BLAS thread, and can write each chunk to a version while
it is computed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame
from pyspark.sql import functions as sf
from threadpoolctl import threadpool_limits

from adrec.core.redis_conn import RedisSettings, connect
from adrec.core.store import VersionWriter
from jobs.load import write_from_executors
from jobs.recall.catalog import RecallCatalog
from jobs.recall.lists import RECALL_SCHEMA, RecallChunk, RecallConfig, recall_chunk
from jobs.spark import aggregate_row


def build_recall_lists(
    user_factors: DataFrame, catalog: RecallCatalog, config: RecallConfig
) -> DataFrame:
    """(user_id, ad_ids, personal) for every user with factors; lazy, computed per partition."""
    return user_factors.mapInArrow(
        _partition_recall(catalog, config, None, RecallChunk.to_arrow), RECALL_SCHEMA
    )


@dataclasses.dataclass(frozen=True)
class RecallStats:
    users: int
    full_lists: int  # lists of exactly list_length ads
    filled_users: int  # lists that needed the popular fallback
    personal_ads: int
    fallback_ads: int

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


_STATS_FIELDS = [f.name for f in dataclasses.fields(RecallStats)]


def publish_recall_lists(
    user_factors: DataFrame,
    catalog: RecallCatalog,
    config: RecallConfig,
    redis: RedisSettings,
    version: str,
    *,
    output_path: str | None = None,
) -> RecallStats:
    """Compute every list and write it to ``version`` in the same executor pass.

    Every user counted in the returned stats has its key written. With ``output_path``
    the lists are also saved as parquet for offline ranking; without, only per-chunk
    counts leave the Python workers, sparing the JVM half a billion array elements.
    Either way the stage runs exactly once: a second evaluation would only rewrite equal
    bytes, but costs the whole stage again.
    """
    sink = (redis, version)
    if output_path is None:
        counts = user_factors.mapInArrow(
            _partition_recall(catalog, config, sink, _chunk_stats),
            ", ".join(f"{name} long" for name in _STATS_FIELDS),
        )
        row = aggregate_row(counts.agg(*(sf.sum(name).alias(name) for name in _STATS_FIELDS)))
        return RecallStats(**{name: int(row[name] or 0) for name in _STATS_FIELDS})
    lists = user_factors.mapInArrow(
        _partition_recall(catalog, config, sink, RecallChunk.to_arrow), RECALL_SCHEMA
    )
    save_recall_lists(lists, output_path)
    return recall_stats(user_factors.sparkSession.read.parquet(output_path), config.list_length)


def save_recall_lists(recall_lists: DataFrame, path: str) -> None:
    """Parquet copy of the lists for offline ranking, written the cheap way.

    Ad ids are near-random 32-bit integers that neither a dictionary nor snappy
    shrinks, so parquet's default dictionary attempt and compression only cost CPU:
    plain, uncompressed pages are several times cheaper to write.
    """
    (
        recall_lists.write.mode("overwrite")
        .option("compression", "none")
        .option("parquet.enable.dictionary", "false")
        .parquet(path)
    )


def recall_stats(recall_lists: DataFrame, list_length: int) -> RecallStats:
    """Counts over (ad_ids, personal) rows, e.g. for the quality report."""
    length = sf.size("ad_ids")
    row = aggregate_row(
        recall_lists.agg(
            sf.count(sf.lit(1)).alias("users"),
            sf.sum((length == list_length).cast("long")).alias("full_lists"),
            sf.sum((sf.col("personal") < length).cast("long")).alias("filled_users"),
            sf.sum("personal").alias("personal_ads"),
            sf.sum(length - sf.col("personal")).alias("fallback_ads"),
        )
    )
    return RecallStats(**{name: int(row[name] or 0) for name in _STATS_FIELDS})


def write_recall_lists(recall_lists: DataFrame, redis: RedisSettings, version: str) -> int:
    """Load precomputed (user_id, ad_ids) rows into ``version``; returns keys written."""

    def put(writer: VersionWriter, batch: pa.RecordBatch) -> int:
        lists = batch.column("ad_ids")
        flat = pc.list_flatten(lists).to_numpy()
        bounds = pc.list_value_length(lists).to_numpy().cumsum()
        return writer.put_recall_lists(
            batch.column("user_id").to_numpy(), np.split(flat, bounds[:-1])
        )

    return write_from_executors(recall_lists.select("user_id", "ad_ids"), redis, version, put)


def _partition_recall(
    catalog: RecallCatalog,
    config: RecallConfig,
    sink: tuple[RedisSettings, str] | None,
    output: Callable[[RecallChunk], pa.RecordBatch],
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    rank = catalog.cate_factors.shape[1]

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        client = connect(sink[0]) if sink else None
        writer = VersionWriter(client, sink[1]) if sink else None
        try:
            # Spark runs a Python worker per core: BLAS threads on top would oversubscribe.
            with threadpool_limits(limits=1, user_api="blas"):
                for batch in batches:
                    user_ids = batch.column("user_id").to_numpy()
                    factors = pc.list_flatten(batch.column("als_factors")).to_numpy()
                    factors = factors.reshape(len(user_ids), rank)
                    for first in range(0, len(user_ids), config.chunk_users):
                        block = slice(first, first + config.chunk_users)
                        chunk = recall_chunk(catalog, config, user_ids[block], factors[block])
                        if writer:
                            writer.put_recall_lists(chunk.user_ids, chunk.lists())
                        yield output(chunk)
        finally:
            if client:
                client.close()

    return run


def _chunk_stats(chunk: RecallChunk) -> pa.RecordBatch:
    lengths, personal = chunk.lengths.astype(np.int64), chunk.personal.astype(np.int64)
    counts = {
        "users": len(lengths),
        "full_lists": int((lengths == chunk.ad_ids.shape[1]).sum()),
        "filled_users": int((personal < lengths).sum()),
        "personal_ads": int(personal.sum()),
        "fallback_ads": int((lengths - personal).sum()),
    }
    return pa.RecordBatch.from_arrays(
        [pa.array([counts[name]], pa.int64()) for name in _STATS_FIELDS], names=_STATS_FIELDS
    )
