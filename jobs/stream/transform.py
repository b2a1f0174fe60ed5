"""The stream job's transforms, shared by every source.

- :func:`parse_lines` ``(raw)`` -> one row per event line (:data:`EVENT_COLUMNS`), with
  ``valid`` false for a line that is not an event (counted, then dropped).
- :func:`deduplicated` ``(events, window_seconds)`` drops a resent event: one with the
  ``event_id`` of an event received at most ``window_seconds`` earlier.
- :func:`state_contributions` ``(batch, ads)`` -> one row per thing an event of a part of
  a micro-batch (its columns, as Python lists) adds to a state value: a count field of a
  user or an ad, or interest in a category.
- :func:`fold_contributions` folds those rows, grouped by value, into the
  :class:`StateUpdate`\\ s the state writer applies.
- :func:`batch_summary` counts a part's events by kind, placement, path and model.

The last three run inside each task, on the part of the batch it holds (all of its
users' events): one Spark job per micro-batch. Impressions and clicks name an ad; its
category, campaign and customer come from the active version's ad table
(:class:`AdLookup`). An ad absent from it still counts for the ad and the user x ad
fields.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as sf

from adrec.core import events, keys
from adrec.core.events import Kind, Scope
from adrec.core.realtime import InterestUpdate, StateUpdate
from adrec.core.scoring import AdIndex

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


class AdLookup:
    """The active version's ad table (ascending ``adgroup_id``, as published), for the
    category, campaign and customer of the ads impressions and clicks name (0 for an ad it
    lacks)."""

    def __init__(self, table: Mapping[str, np.ndarray]):
        self.index = AdIndex.of(table["adgroup_id"])
        # One extra row of zeros, where the ads the table lacks (row -1) land.
        self.attributes = {
            column: np.append(np.asarray(table[column], dtype=np.int64), 0)
            for column in ("cate_id", "campaign_id", "customer_id")
        }

    def of(self, ad_ids: Sequence[int]) -> dict[str, list[int]]:
        """Each attribute of each ad, 0 for an ad the table lacks."""
        rows = self.index.rows(np.asarray(ad_ids, dtype=np.int64))
        return {column: values[rows].tolist() for column, values in self.attributes.items()}


#: A contribution row: (target, member, count field, amount, cate_id, score, time), either
#: a count (field and amount) or interest (cate_id, score, time).
Contribution = tuple[str, int, str | None, int | None, int | None, float | None, int | None]

_NAMES_AD = frozenset({Kind.IMPRESSION.value, Kind.CLICK.value})
_INTEREST = {kind.value: weight for kind, weight in events.INTEREST_WEIGHTS.items()}


def _prefixes(scopes: Sequence[Scope]) -> dict[str, tuple[tuple[int, str], ...]]:
    """Per kind, each scope's position among an event's members and its count field's
    name up to the member (the rest of :func:`adrec.core.events.count_field`'s format)."""
    return {
        kind.value: tuple(
            (index, events.count_field(kind, scope, 0, 0)[: -len("0:0")])
            for index, scope in enumerate(scopes)
        )
        for kind in Kind
    }


_AD_MEMBERS = _prefixes((Scope.AD, Scope.CATEGORY, Scope.CAMPAIGN, Scope.CUSTOMER))
_BEHAVIOUR_MEMBERS = _prefixes((Scope.CATEGORY, Scope.BRAND))


def state_contributions(
    batch: Mapping[str, Sequence[Any]], ads: AdLookup
) -> Iterator[Contribution]:
    """What each event of a batch (columns of :data:`EVENT_COLUMNS` by name) adds to state."""
    looked_up = ads.of(batch["ad_id"])
    for kind, user, at, ad, cate_id, brand, ad_cate, campaign, customer in zip(
        batch["kind"],
        batch["user_id"],
        batch["time"],
        batch["ad_id"],
        batch["cate_id"],
        batch["brand_id"],
        looked_up["cate_id"],
        looked_up["campaign_id"],
        looked_up["customer_id"],
        strict=True,
    ):
        hour = f":{at // events.BUCKET_SECONDS}"
        members: tuple[int, ...]
        if kind in _NAMES_AD:
            cate = ad_cate
            members = (ad, cate, campaign, customer)
            prefixes = _AD_MEMBERS[kind]
            if ad > 0:
                yield AD, ad, f"{prefixes[0][1]}{ad}{hour}", 1, None, None, None
        else:
            cate = cate_id
            members = (cate, brand)
            prefixes = _BEHAVIOUR_MEMBERS[kind]
        for index, prefix in prefixes:
            member = members[index]
            if member > 0:
                yield USER, user, f"{prefix}{member}{hour}", 1, None, None, None
        weight = _INTEREST.get(kind)
        if weight is not None and cate > 0:
            yield USER, user, None, None, cate, weight, at


def batch_summary(
    batch: Mapping[str, Sequence[Any]],
) -> collections.Counter[tuple[str, str, str, str]]:
    """Events of a batch by (kind, pid, serving path, model version)."""
    return collections.Counter(
        zip(batch["kind"], batch["pid"], batch["serving_path"], batch["model_version"], strict=True)
    )


def fold_contributions(
    rows: Iterable[Contribution],
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
