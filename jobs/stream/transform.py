"""The stream job's transforms, shared by every source.

- :func:`parse_lines` ``(raw)`` -> one row per event line (:data:`EVENT_COLUMNS`), with
  ``valid`` false for a line that is not an event (counted, then dropped).
- :func:`deduplicated` ``(events, window_seconds)`` drops a resent event: one with the
  ``event_id`` of an event received at most ``window_seconds`` earlier.
- :func:`state_contributions` ``(events, ads)`` -> one row per thing an event adds to a
  state value: a count field of a user or an ad, or interest in a category.
- :func:`fold_contributions` folds those rows, grouped by value, into the
  :class:`StateUpdate`\\ s the state writer applies.

Impressions and clicks name an ad; its category, campaign and customer come from the
active version's ad table (``ads``: ``adgroup_id``, ``cate_id``, ``campaign_id``,
``customer_id``). An ad absent from it still counts for the ad and the user x ad fields.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as sf

from adrec.core import events, keys
from adrec.core.events import Kind, Scope
from adrec.core.realtime import InterestUpdate, StateUpdate

EVENT_COLUMNS = (
    "position",
    "received",
    "kind",
    "event_id",
    "user_id",
    "time",
    "ad_id",
    "pid",
    "request_id",
    "cate_id",
    "brand_id",
    "serving_path",
    "model_version",
)
#: Which state value a contribution goes to.
USER, AD = "user", "ad"

CONTRIBUTION_SCHEMA = (
    "target string, member long, field string, amount long, cate_id long, score double, time long"
)


def _number(part: Column) -> Column:
    return sf.when(part == "", sf.lit(0)).otherwise(part.try_cast("long"))


def parse_lines(raw: DataFrame) -> DataFrame:
    """Event rows from raw log rows (``position``, ``received``, ``line``)."""
    parts = sf.split(sf.col("line"), "\t")
    kinds = sf.array(*(sf.lit(kind.value) for kind in Kind))
    parsed = raw.select(
        "position",
        "received",
        sf.get(parts, 1).alias("kind"),
        sf.get(parts, 2).alias("event_id"),
        sf.get(parts, 3).try_cast("long").alias("user_id"),
        sf.get(parts, 4).try_cast("long").alias("time"),
        _number(sf.get(parts, 5)).alias("ad_id"),
        sf.get(parts, 6).alias("pid"),
        sf.get(parts, 7).alias("request_id"),
        _number(sf.get(parts, 8)).alias("cate_id"),
        _number(sf.get(parts, 9)).alias("brand_id"),
        sf.coalesce(sf.get(parts, 10), sf.lit("")).alias("serving_path"),
        sf.coalesce(sf.get(parts, 11), sf.lit("")).alias("model_version"),
        sf.array_contains(
            sf.array(
                *(sf.lit(f"{tag.decode()}:{count}") for tag, count in events.LINE_FIELDS.items())
            ),
            sf.concat(sf.get(parts, 0), sf.lit(":"), sf.size(parts).cast("string")),
        ),
    )
    valid = (
        sf.col("shape")
        & sf.array_contains(kinds, sf.col("kind"))
        & (sf.col("event_id") != "")
        & sf.col("user_id").isNotNull()
        & (sf.col("user_id") > 0)
        & sf.col("time").isNotNull()
        & sf.col("ad_id").isNotNull()
        & sf.col("cate_id").isNotNull()
        & sf.col("brand_id").isNotNull()
    )
    named = parsed.toDF(*EVENT_COLUMNS, "shape")
    return named.select(*EVENT_COLUMNS, sf.coalesce(valid, sf.lit(False)).alias("valid"))


def deduplicated(parsed: DataFrame, window_seconds: int) -> DataFrame:
    """Valid events without resends, de-duplicated on ``event_id`` over ``received`` time."""
    return (
        parsed.where("valid")
        .drop("valid")
        .withWatermark("received", f"{window_seconds} seconds")
        .dropDuplicatesWithinWatermark(["event_id"])
    )


def _field(kind: Column, scope: Scope, member: Column, bucket: Column) -> Column:
    return sf.when(
        member > 0,
        sf.concat(kind, sf.lit(f":{scope.value}"), member.cast("string"), sf.lit(":"), bucket),
    )


def state_contributions(batch: DataFrame, ads: DataFrame) -> DataFrame:
    """What each event of one batch adds to state (:data:`CONTRIBUTION_SCHEMA`)."""
    joined = batch.join(
        sf.broadcast(
            ads.select("adgroup_id", "cate_id", "campaign_id", "customer_id")
        ).withColumnRenamed("cate_id", "ad_cate_id"),
        batch.ad_id == sf.col("adgroup_id"),
        "left",
    )
    kind, time = sf.col("kind"), sf.col("time")
    bucket = sf.floor(time / events.BUCKET_SECONDS).cast("string")
    names_ad = kind.isin(Kind.IMPRESSION.value, Kind.CLICK.value)
    cate = sf.when(names_ad, sf.coalesce(sf.col("ad_cate_id"), sf.lit(0))).otherwise(
        sf.col("cate_id")
    )

    def member(column: str) -> Column:
        return sf.coalesce(sf.col(column), sf.lit(0)).cast("long")

    user_fields = sf.when(
        names_ad,
        sf.array(
            _field(kind, Scope.AD, sf.col("ad_id"), bucket),
            _field(kind, Scope.CATEGORY, cate, bucket),
            _field(kind, Scope.CAMPAIGN, member("campaign_id"), bucket),
            _field(kind, Scope.CUSTOMER, member("customer_id"), bucket),
        ),
    ).otherwise(
        sf.array(
            _field(kind, Scope.CATEGORY, cate, bucket),
            _field(kind, Scope.BRAND, sf.col("brand_id"), bucket),
        )
    )
    counts = joined.select(
        sf.lit(USER).alias("target"),
        sf.col("user_id").alias("member"),
        sf.explode(user_fields).alias("field"),
    ).union(
        joined.where(names_ad).select(
            sf.lit(AD).alias("target"),
            sf.col("ad_id").alias("member"),
            _field(kind, Scope.AD, sf.col("ad_id"), bucket).alias("field"),
        )
    )
    counts = counts.where(sf.col("field").isNotNull()).select(
        "target",
        "member",
        "field",
        sf.lit(1).cast("long").alias("amount"),
        sf.lit(None).cast("long").alias("cate_id"),
        sf.lit(None).cast("double").alias("score"),
        sf.lit(None).try_cast("long").alias("time"),
    )
    weights = sf.create_map(
        *(
            item
            for kind_, weight in events.INTEREST_WEIGHTS.items()
            for item in (sf.lit(kind_.value), sf.lit(weight))
        )
    )
    interest = joined.where(
        kind.isin(*(k.value for k in events.INTEREST_WEIGHTS)) & (cate > 0)
    ).select(
        sf.lit(USER).alias("target"),
        sf.col("user_id").alias("member"),
        sf.lit(None).cast("string").alias("field"),
        sf.lit(None).cast("long").alias("amount"),
        cate.cast("long").alias("cate_id"),
        weights[kind].cast("double").alias("score"),
        time.try_cast("long").alias("time"),
    )
    return counts.unionByName(interest)


def fold_contributions(
    rows: Iterable[tuple[str, int, str | None, int | None, int | None, float | None, int | None]],
    half_life_seconds: float,
) -> list[StateUpdate]:
    """One update per state value from contribution rows (in any order).

    Interest in a category from several events is combined as of the latest of them, each
    decayed by its age then, exactly as the state script combines it with what is stored.
    """
    counts: dict[tuple[str, int], collections.Counter[str]] = collections.defaultdict(
        collections.Counter
    )
    interest: dict[tuple[str, int], dict[int, tuple[float, int]]] = collections.defaultdict(dict)
    for target, member, field, amount, cate_id, score, time in rows:
        value = (target, member)
        if field is not None:
            counts[value][field] += amount or 0
        elif cate_id is not None and score is not None and time is not None:
            categories = interest[value]
            old = categories.get(cate_id)
            if old is None:
                categories[cate_id] = (score, time)
            else:
                at = max(old[1], time)
                combined = events.decayed_interest(
                    old[0], old[1], at, half_life_seconds
                ) + events.decayed_interest(score, time, at, half_life_seconds)
                categories[cate_id] = (combined, at)
    updates = []
    for target, member in sorted(set(counts) | set(interest)):
        family = keys.REALTIME_USER if target == USER else keys.REALTIME_AD
        updates.append(
            StateUpdate(
                family.key(member),
                counts=sorted(counts.get((target, member), {}).items()),
                interest=[
                    InterestUpdate(cate, score, at)
                    for cate, (score, at) in sorted(interest.get((target, member), {}).items())
                ],
            )
        )
    return updates
