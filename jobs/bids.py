"""The optional bids file: one advertiser bid (a price per click) per adgroup.

Contract:

- :func:`read_bids` ``(spark, data)`` -> :class:`Bids` (ids ascending) or None when the
  data folder has no ``bids.csv`` (``adrec.core.dataset.BIDS_FILE``).
- A bad file stops the run: the wrong header, a row without exactly two fields, an id that
  is not a positive integer, a bid that is not a positive finite number, or an adgroup
  listed twice raises :class:`BidsError` naming the file, the line and the field. Unlike
  the four tables, no bad row is skipped: a bid silently lost would change what an ad pays.

The file is at most one row per ad, so its ids and bids are collected to the driver, as
the ad table is.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F  # noqa: N812 - the conventional alias

from adrec.core.dataset import BIDS_FILE, BIDS_HEADER
from jobs.spark import path_exists

#: Bad rows a BidsError names before counting the rest.
NAMED_PROBLEMS = 3


class BidsError(Exception):
    """The bids file cannot be used; the message names the file, the line and the field."""


@dataclasses.dataclass(frozen=True, eq=False)
class Bids:
    source: str
    #: Ascending.
    ad_ids: np.ndarray
    bids: np.ndarray

    def of_ads(self, ad_ids: np.ndarray) -> Bids:
        """The bids of the ads among ``ad_ids`` alone."""
        kept = np.isin(self.ad_ids, ad_ids)
        return Bids(self.source, self.ad_ids[kept], self.bids[kept])


def read_bids(spark: SparkSession, data: str) -> Bids | None:
    path = f"{data.rstrip('/')}/{BIDS_FILE}"
    if not path_exists(spark, path):
        return None
    lines = _numbered_lines(spark, path)
    first = lines.where(F.col("line") == 1).first()
    if first is None:
        raise BidsError(f"bids: {path} is empty; expected the header line {BIDS_HEADER!r}")
    if first["value"] != BIDS_HEADER:
        raise BidsError(
            f"bids: {path} line 1: starts with {first['value'][:80]!r}, "
            f"not the header {BIDS_HEADER!r}"
        )
    rows = _checked(lines.where(F.col("line") > 1)).cache()
    try:
        problems = rows.where(F.col("problem").isNotNull())
        named = problems.orderBy("line").limit(NAMED_PROBLEMS).collect()
        if named:
            more = problems.count() - len(named)
            raise BidsError(
                f"bids: {path}: "
                + "; ".join(f"line {row['line']}, {row['problem']}" for row in named)
                + (f"; and {more:,} more bad rows" if more else "")
            )
        repeated = (
            rows.groupBy("ad_id")
            .agg(
                F.count(F.lit(1)).alias("times"),
                F.sort_array(F.collect_list("line")).alias("lines"),
            )
            .where(F.col("times") > 1)
            .orderBy(F.col("lines")[0])
            .first()
        )
        if repeated is not None:
            lines_of = ", ".join(str(line) for line in repeated["lines"][:NAMED_PROBLEMS])
            raise BidsError(
                f"bids: {path}: field adgroup_id: {repeated['ad_id']} is listed "
                f"{repeated['times']} times (lines {lines_of}); give each adgroup one bid"
            )
        table = rows.select("ad_id", "bid").orderBy("ad_id").toPandas()
    finally:
        rows.unpersist()
    return Bids(
        path,
        table["ad_id"].to_numpy(dtype=np.int64),
        table["bid"].to_numpy(dtype=np.float64),
    )


def _numbered_lines(spark: SparkSession, path: str) -> DataFrame:
    """``line`` (from 1, in file order) and ``value``, so a problem can name its line.

    Numbered in the JVM: a monotonically increasing id holds the partition in its upper
    bits and the row within it below, and each partition starts after the rows of the
    ones before. (Through a Python RDD, a query that stops early, such as ``first()``,
    broke the pipe of a Python worker still writing, which printed a traceback.)
    """
    text = spark.read.text(path).select(
        F.spark_partition_id().alias("part"),
        F.monotonically_increasing_id().alias("id"),
        "value",
    )
    sizes = sorted((row["part"], row["count"]) for row in text.groupBy("part").count().collect())
    start, total = F.lit(0).cast("long"), 0
    for part, count in sizes:
        start = F.when(F.col("part") == part, F.lit(total)).otherwise(start)
        total += count
    within = F.col("id") - F.shiftleft(F.col("part").cast("long"), 33)
    return text.select((start + within + 1).alias("line"), "value")


def _checked(lines: DataFrame) -> DataFrame:
    """``line``, ``ad_id``, ``bid`` and ``problem``: null for a good row, else what is wrong,
    naming the field."""
    parts = F.split(F.col("value"), ",", -1)
    id_text = F.trim(F.try_element_at(parts, F.lit(1)))
    bid_text = F.trim(F.try_element_at(parts, F.lit(2)))
    ad_id = id_text.try_cast("int")
    bid = bid_text.try_cast("double")
    problem = (
        F.when(
            F.size(parts) != 2,
            F.concat(
                F.lit("has "),
                F.size(parts).cast("string"),
                F.lit(" fields, expected 2 (adgroup_id,bid)"),
            ),
        )
        .when(
            ad_id.isNull() | (ad_id <= 0),
            F.concat(F.lit("field adgroup_id: "), _quoted(id_text), F.lit(" is not a positive id")),
        )
        .when(
            bid.isNull() | F.isnan(bid) | (bid <= 0) | (bid == float("inf")),
            F.concat(F.lit("field bid: "), _quoted(bid_text), F.lit(" is not a positive number")),
        )
    )
    return lines.select("line", ad_id.alias("ad_id"), bid.alias("bid"), problem.alias("problem"))


def _quoted(text: Column) -> Column:
    return F.concat(F.lit("'"), F.substring(F.coalesce(text, F.lit("")), 1, 40), F.lit("'"))
