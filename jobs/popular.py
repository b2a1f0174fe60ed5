"""Popular fallback lists: the most clicked ads of the training days, overall and per pid.

Contract:

- :func:`ad_impressions` ``(train_samples)`` -> ``adgroup_id``, ``impressions``, ``clicks``
  (long) per ad shown on the training days; recall weights its ``popular`` strategy by it.
- :func:`popular_lists` ``(train_samples, length)`` -> ``scope`` (``"all"`` or a pid),
  ``rank`` (1-based), ``adgroup_id``, ``clicks``, ``impressions``: at most ``length`` ads
  per scope.
- :func:`collect_popular` turns those rows into ordered id arrays per scope and
  :func:`write_popular` loads them into a version.
- :func:`category_leaders` ``(ad_feature, impressions, per_category)`` -> ``cate_id``,
  ``rank``, ``adgroup_id``: every category's leading ads in the same order, ads never shown
  last; real-time interest in a category puts them first in a user's candidates.
  :func:`collect_category_leaders` collects them as the ``category_ads`` table.

``train_samples`` are raw_sample rows of days 1-7 only (``adgroup_id``, ``pid``, ``clk``);
using day 8 would leak the test day into the lists the hit rate is measured on.

Ranking: most clicks first. Clicks are what a fallback slot is for, and a raw click
count needs no smoothing constant: an ad clicked 300 times out of 6,000 impressions is
a safer bet for an unknown user than one clicked twice out of 10, whatever its CTR.
Equal clicks rank the ad that needed fewer impressions (the higher CTR) first, then the
lower ad id, so lists are fully deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as sf

from adrec.core import keys
from adrec.core.redis_conn import RedisSettings, connect
from adrec.core.store import VersionWriter

DEFAULT_LENGTH = 500


def ad_impressions(train_samples: DataFrame) -> DataFrame:
    return train_samples.groupBy("adgroup_id").agg(
        sf.count(sf.lit(1)).alias("impressions"),
        sf.sum("clk").cast("long").alias("clicks"),
    )


def popular_lists(train_samples: DataFrame, length: int = DEFAULT_LENGTH) -> DataFrame:
    if length < 1:
        raise ValueError(f"popular list length must be positive, got {length}")
    per_pid = train_samples.groupBy(sf.col("pid").alias("scope"), "adgroup_id").agg(
        sf.count(sf.lit(1)).alias("impressions"),
        sf.sum("clk").cast("long").alias("clicks"),
    )
    overall = (
        per_pid.groupBy("adgroup_id")
        .agg(sf.sum("impressions").alias("impressions"), sf.sum("clicks").alias("clicks"))
        .withColumn("scope", sf.lit(keys.POPULAR_ALL))
    )
    ranking = Window.partitionBy("scope").orderBy(
        sf.col("clicks").desc(), sf.col("impressions").asc(), sf.col("adgroup_id").asc()
    )
    return (
        per_pid.unionByName(overall)
        .withColumn("rank", sf.row_number().over(ranking))
        .where(sf.col("rank") <= length)
        .select("scope", "rank", "adgroup_id", "clicks", "impressions")
    )


def category_leaders(ads: DataFrame, impressions: DataFrame, per_category: int) -> DataFrame:
    if per_category < 1:
        raise ValueError(f"ads per category must be positive, got {per_category}")
    shown = ads.select("adgroup_id", "cate_id").join(
        impressions.select("adgroup_id", "impressions", "clicks"), "adgroup_id", "left"
    )
    ranking = Window.partitionBy("cate_id").orderBy(
        sf.coalesce(sf.col("clicks"), sf.lit(0)).desc(),
        sf.col("impressions").isNull().asc(),
        sf.col("impressions").asc(),
        sf.col("adgroup_id").asc(),
    )
    return (
        shown.withColumn("rank", sf.row_number().over(ranking))
        .where(sf.col("rank") <= per_category)
        .select("cate_id", "rank", "adgroup_id")
    )


def collect_category_leaders(leaders: DataFrame) -> dict[str, np.ndarray]:
    """The ``category_ads`` table: one row per ad, by ascending ``cate_id`` then rank."""
    frame = leaders.select("cate_id", "rank", "adgroup_id").toPandas()
    frame = frame.sort_values(["cate_id", "rank"], kind="stable")
    return {
        "cate_id": frame["cate_id"].to_numpy(dtype=np.int32),
        "ad_id": frame["adgroup_id"].to_numpy(dtype=np.int32),
    }


def write_category_leaders(
    table: Mapping[str, np.ndarray], redis: RedisSettings, version: str
) -> None:
    client = connect(redis)
    try:
        VersionWriter(client, version).put_category_ads(table)
    finally:
        client.close()


def collect_popular(lists: DataFrame) -> dict[str, np.ndarray]:
    """Ordered int32 ad ids per scope; "all" is present even when there were no samples."""
    table = lists.select("scope", "rank", "adgroup_id").toArrow()
    scopes = np.asarray(table.column("scope").to_pylist(), dtype=object)
    ranks = table.column("rank").to_numpy()
    ad_ids = table.column("adgroup_id").to_numpy().astype(np.int32)
    collected = {keys.POPULAR_ALL: np.zeros(0, dtype=np.int32)}
    for scope in sorted(set(scopes.tolist())):
        mine = scopes == scope
        collected[scope] = ad_ids[mine][np.argsort(ranks[mine])]
    return collected


def write_popular(lists: Mapping[str, np.ndarray], redis: RedisSettings, version: str) -> int:
    """Write one key per scope; returns the number of keys written."""
    client = connect(redis)
    try:
        writer = VersionWriter(client, version)
        for scope, ad_ids in lists.items():
            writer.put_popular(scope, ad_ids)
    finally:
        client.close()
    return len(lists)
