"""The ``behaviour`` feature set's counts, point-in-time correct, for training impressions.

:func:`history_features` ``(impressions, behavior_log, samples, ads)`` -> one row per
distinct (``user_id``, ``adgroup_id``, ``time_stamp``) of ``impressions`` with every
column of :data:`adrec.core.features.HISTORY_COLUMNS`.

"Before" means what serving sees: the count of a window of ``h`` hours for an impression
at second ``t`` is the number of the user's events with a time strictly less than ``t``
whose UTC hour bucket is one of the ``h`` buckets ending with ``t``'s own
(:mod:`adrec.core.events`). An event in the same second as the impression is not counted,
nor is the impression itself; so no row sees its own click, or anything later.

Behaviour comes from ``behavior_log`` (by its ``cate_id`` and ``brand_id``), impressions
and clicks on a category from ``samples`` (every ``raw_sample`` row, the test day's too:
by the test day's impressions, the earlier ones of that day have happened). Each count is
split in two, so nothing is joined row by row over days:

- the whole buckets before ``t``'s own: per (user, member, bucket) sums, summed over a
  range window of bucket numbers;
- ``t``'s own bucket: the events of that user, member and hour before ``t``, joined.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F  # noqa: N812 - the conventional alias

from adrec.core import events
from adrec.core.events import Kind, Scope
from adrec.core.features import HISTORY_COLUMNS, HISTORY_COUNTS, history_column

KEY_COLUMNS = ("user_id", "adgroup_id", "time_stamp")


def _bucket(time: Column) -> Column:
    return F.floor(time / F.lit(events.BUCKET_SECONDS)).cast("long")


def _kinds(scope: Scope) -> list[Kind]:
    return [kind for kind, s in HISTORY_COUNTS if s == scope]


def history_features(
    impressions: DataFrame, behavior_log: DataFrame, samples: DataFrame, ads: DataFrame
) -> DataFrame:
    """:data:`KEY_COLUMNS` plus every history count of each distinct impression key.

    ``impressions`` and ``samples`` hold raw_sample columns (``user_id``, ``adgroup_id``,
    ``time_stamp``, and ``clk`` for ``samples``); ``ads`` maps ``adgroup_id`` to
    ``cate_id`` and ``brand_id`` (null or negative: no brand).
    """
    ad_members = ads.select("adgroup_id", "cate_id", "brand_id")
    keys = impressions.select(*KEY_COLUMNS).distinct().join(ad_members, "adgroup_id")
    behaviour = behavior_log.select(
        "user_id", "time_stamp", "cate_id", "brand_id", F.col("btag").alias("kind")
    )
    shown = samples.join(ad_members, "adgroup_id").select(
        "user_id", "time_stamp", "cate_id", F.col("clk").cast("int").alias("clk")
    )
    shown_events = shown.select(
        "user_id", "time_stamp", "cate_id", F.lit(Kind.IMPRESSION.value).alias("kind")
    ).unionByName(
        shown.where(F.col("clk") == 1).select(
            "user_id", "time_stamp", "cate_id", F.lit(Kind.CLICK.value).alias("kind")
        )
    )
    by_category = behaviour.select(
        "user_id", "time_stamp", F.col("cate_id").alias("member"), "kind"
    ).unionByName(
        shown_events.select("user_id", "time_stamp", F.col("cate_id").alias("member"), "kind")
    )
    by_brand = behaviour.where(F.col("brand_id") > 0).select(
        "user_id", "time_stamp", F.col("brand_id").alias("member"), "kind"
    )
    result = keys.select(*KEY_COLUMNS, "cate_id", "brand_id")
    for scope, member, scoped_events in (
        (Scope.CATEGORY, "cate_id", by_category),
        (Scope.BRAND, "brand_id", by_brand),
    ):
        scoped_keys = keys.where(F.col(member) > 0).select(
            "user_id", F.col(member).alias("member"), "time_stamp"
        )
        counts = windowed_counts(scoped_keys, scoped_events, scope)
        result = result.join(
            counts.withColumnRenamed("member", member), ["user_id", member, "time_stamp"], "left"
        )
    return result.select(
        *KEY_COLUMNS,
        *(F.coalesce(F.col(c), F.lit(0)).cast("int").alias(c) for c in HISTORY_COLUMNS),
    )


def windowed_counts(keys: DataFrame, scoped_events: DataFrame, scope: Scope) -> DataFrame:
    """Per distinct (``user_id``, ``member``, ``time_stamp``) of ``keys``: each window's count
    of ``scoped_events`` (``user_id``, ``time_stamp``, ``member``, ``kind``) of ``scope``'s
    kinds, as defined in the module docstring."""
    kinds = _kinds(scope)
    keys = keys.distinct().withColumn("bucket", _bucket(F.col("time_stamp")))
    # Only events of (user, member) pairs some impression asks about can count.
    relevant = scoped_events.join(
        keys.select("user_id", "member").distinct(), ["user_id", "member"], "left_semi"
    ).withColumn("bucket", _bucket(F.col("time_stamp")))
    flags = _flags(kinds, "kind")

    per_bucket = relevant.groupBy("user_id", "member", "bucket").agg(
        *(F.sum(flag).alias(kind.value) for kind, flag in flags.items())
    )
    asked = keys.select("user_id", "member", "bucket").distinct()
    framed = per_bucket.withColumn("asked", F.lit(False)).unionByName(
        asked.select(
            "user_id",
            "member",
            "bucket",
            *(F.lit(0).cast("long").alias(kind.value) for kind in kinds),
            F.lit(True).alias("asked"),
        )
    )
    ordered = Window.partitionBy("user_id", "member").orderBy("bucket")
    earlier = [
        F.coalesce(
            F.sum(kind.value).over(ordered.rangeBetween(-(window.hours - 1), -1)), F.lit(0)
        ).alias(f"{kind.value}:{window.name}")
        for kind in kinds
        for window in events.WINDOWS
        if window.hours > 1
    ]
    whole_buckets = framed.select("user_id", "member", "bucket", "asked", *earlier).where("asked")

    current = (
        keys.alias("k")
        .join(
            relevant.alias("e"),
            (F.col("k.user_id") == F.col("e.user_id"))
            & (F.col("k.member") == F.col("e.member"))
            & (F.col("k.bucket") == F.col("e.bucket"))
            & (F.col("e.time_stamp") < F.col("k.time_stamp")),
        )
        .groupBy("k.user_id", "k.member", "k.time_stamp")
        .agg(
            *(
                F.sum(flag).alias(f"{kind.value}:now")
                for kind, flag in _flags(kinds, "e.kind").items()
            )
        )
    )
    joined = keys.join(whole_buckets.drop("asked"), ["user_id", "member", "bucket"], "left").join(
        current, ["user_id", "member", "time_stamp"], "left"
    )

    def count(kind: Kind, window: events.Window) -> Column:
        now = F.coalesce(F.col(f"`{kind.value}:now`"), F.lit(0))
        if window.hours == 1:
            return now
        return now + F.coalesce(F.col(f"`{kind.value}:{window.name}`"), F.lit(0))

    return joined.select(
        "user_id",
        "member",
        "time_stamp",
        *(
            count(kind, window).alias(history_column(kind, scope, window.name))
            for kind in kinds
            for window in events.WINDOWS
        ),
    )


def _flags(kinds: list[Kind], column: str) -> dict[Kind, Column]:
    # behavior_log's btag values are the behaviour kinds' own names.
    return {kind: (F.col(column) == F.lit(kind.value)).cast("int") for kind in kinds}
