"""Implicit ratings of (user, category) pairs from the behavior log: the course's rule.

Contract: :func:`ratings_from_behavior` takes the behavior log as loaded by
``jobs.ingest`` (``user_id``, ``time_stamp``, ``btag``, ``cate_id``, ...) and
returns one row per (user, category) the user interacted with:
``user_id`` int, ``cate_id`` int, ``rating`` double.

Each event scores by its behavior: pv 0.2, fav 0.4, cart 0.6, buy 1.0, and each
behavior's count per (user, category) is capped at 20, so a rating lies in
(0, 44]. Rows with ``time_stamp <= 0`` (present in the real file), a null id or an
unknown behavior are ignored.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as sf

#: Score of one event, in tenths, by behavior tag.
BEHAVIOR_TENTHS = {"pv": 2, "fav": 4, "cart": 6, "buy": 10}
#: Events of one behavior that count towards a (user, category) rating.
COUNT_CAP = 20
MAX_RATING = COUNT_CAP * sum(BEHAVIOR_TENTHS.values()) / 10


def ratings_from_behavior(behavior: DataFrame) -> DataFrame:
    """(user_id, cate_id, rating) for every pair with at least one valid event."""
    valid = behavior.where(
        (sf.col("time_stamp") > 0)
        & sf.col("user_id").isNotNull()
        & sf.col("cate_id").isNotNull()
        & sf.col("btag").isin(*BEHAVIOR_TENTHS)
    )
    counts = valid.groupBy("user_id", "cate_id").agg(
        *(_events(btag).alias(btag) for btag in BEHAVIOR_TENTHS)
    )
    # Summing integer tenths and dividing once gives the double nearest the exact
    # decimal rating (0.6, not 0.6000000000000001), so equal behavior means equal ratings.
    tenths = sum(
        (
            sf.least(sf.col(btag), sf.lit(COUNT_CAP)) * weight
            for btag, weight in BEHAVIOR_TENTHS.items()
        ),
        sf.lit(0),
    )
    return counts.select(
        sf.col("user_id").cast("int"),
        sf.col("cate_id").cast("int"),
        (tenths / sf.lit(10.0)).alias("rating"),
    )


def _events(btag: str) -> Column:
    return sf.sum(sf.when(sf.col("btag") == btag, 1).otherwise(0))
