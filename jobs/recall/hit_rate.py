"""Recall quality: the share of test-day clicked (user, ad) pairs found in the lists."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from pyspark.sql import DataFrame
from pyspark.sql import functions as sf

from jobs.spark import aggregate_row


@dataclasses.dataclass(frozen=True)
class HitRate:
    clicked_pairs: int  # distinct (user, ad) pairs clicked on the test day
    hits: int  # of those, pairs whose ad is in the user's list
    pairs_on_fallback: int  # pairs of users without a recall list, judged on the fallback

    @property
    def rate(self) -> float:
        return self.hits / self.clicked_pairs if self.clicked_pairs else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "rate": self.rate}


def recall_hit_rate(
    test_samples: DataFrame,
    recall_lists: DataFrame | None,
    fallback: Sequence[int] | np.ndarray,
) -> HitRate:
    """Share of test-day clicked (user, ad) pairs whose ad is in the user's list.

    A user without a recall list is judged on ``fallback``, as serving would answer
    it; ``recall_lists=None`` gives everyone the fallback (the popularity baseline).
    Nothing per user reaches the driver: Spark joins the clicks to the lists (broadcasting
    them only below its fixed size threshold) and sums on the executors.
    """
    clicked = (
        test_samples.where(sf.col("clk") == 1)
        .select(sf.col("user_id").cast("int"), sf.col("adgroup_id").cast("int"))
        .distinct()
        .groupBy("user_id")
        .agg(sf.collect_list("adgroup_id").alias("clicked"))
    )
    fallback_ids = sf.array(*(sf.lit(int(a)) for a in fallback)).cast("array<int>")
    without_list = clicked
    hits = pairs = 0
    if recall_lists is not None:
        with_list = recall_lists.select("user_id", "ad_ids").join(clicked, "user_id")
        row = aggregate_row(
            with_list.agg(
                sf.sum(sf.size("clicked")).alias("pairs"),
                sf.sum(sf.size(sf.array_intersect("clicked", "ad_ids"))).alias("hits"),
            )
        )
        pairs, hits = int(row["pairs"] or 0), int(row["hits"] or 0)
        without_list = clicked.join(recall_lists.select("user_id"), "user_id", "left_anti")
    row = aggregate_row(
        without_list.agg(
            sf.sum(sf.size("clicked")).alias("pairs"),
            sf.sum(sf.size(sf.array_intersect("clicked", fallback_ids))).alias("hits"),
        )
    )
    fallback_pairs = int(row["pairs"] or 0)
    return HitRate(pairs + fallback_pairs, hits + int(row["hits"] or 0), fallback_pairs)
