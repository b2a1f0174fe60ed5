"""The batch job's behaviour counts: point-in-time correct, and equal to serving's counts."""

from __future__ import annotations

import random

import numpy as np
import pytest

from adrec.core import events, features
from adrec.core.dataset import BTAGS
from adrec.core.events import Kind, Scope
from jobs.history import KEY_COLUMNS, history_features

pytestmark = pytest.mark.spark

HOUR = events.BUCKET_SECONDS
#: An hour boundary, so offsets from it say which bucket an event falls in.
T0 = 500_000 * HOUR

AD_SCHEMA = "adgroup_id int, cate_id int, brand_id int"
SAMPLE_SCHEMA = "user_id int, adgroup_id int, time_stamp long, clk int"
BEHAVIOUR_SCHEMA = "user_id int, time_stamp long, btag string, cate_id int, brand_id int"


def computed(spark, impressions, behaviour, samples, ads) -> dict[tuple, dict[str, int]]:
    frame = history_features(
        spark.createDataFrame(impressions, SAMPLE_SCHEMA),
        spark.createDataFrame(behaviour, BEHAVIOUR_SCHEMA),
        spark.createDataFrame(samples, SAMPLE_SCHEMA),
        spark.createDataFrame(ads, AD_SCHEMA),
    )
    return {
        tuple(row[c] for c in KEY_COLUMNS): {c: row[c] for c in features.HISTORY_COLUMNS}
        for row in frame.collect()
    }


def test_only_events_strictly_before_the_impression_in_its_windows_count(spark):
    ads = [(1, 10, 100), (2, 10, 0)]
    now = T0 + 2 * HOUR + 1800  # half way through its hour
    behaviour = [
        (7, now - 1, "cart", 10, 100),  # this hour, before: 1h, 1d, 3d
        (7, now, "cart", 10, 100),  # the same second: never
        (7, now + 1, "cart", 10, 100),  # later: never
        (7, now - 1800 - 1, "cart", 10, 100),  # the hour before: 1d and 3d, not 1h
        (7, now - 30 * HOUR, "pv", 10, 200),  # yesterday: 3d only, another brand
        (7, now - 80 * HOUR, "buy", 10, 100),  # older than every window
        (8, now - 1, "cart", 10, 100),  # another user
    ]
    samples = [
        (7, 1, now, 1),  # the impression itself, clicked: not counted for itself
        (7, 2, now - 60, 1),  # an earlier click in the same category
        (7, 2, now + 60, 1),  # a later one
    ]
    counts = computed(spark, [(7, 1, now, 1)], behaviour, samples, ads)
    row = counts[(7, 1, now)]
    assert (row["cart_cate_1h"], row["cart_cate_1d"], row["cart_cate_3d"]) == (1, 2, 2)
    assert (row["cart_brand_1h"], row["cart_brand_1d"], row["cart_brand_3d"]) == (1, 2, 2)
    assert (row["pv_cate_1d"], row["pv_cate_3d"], row["pv_brand_3d"]) == (0, 1, 0)
    assert row["buy_cate_3d"] == 0
    assert (row["clk_cate_1h"], row["imp_cate_1h"]) == (1, 1)
    # pv 3d; cart per category and per brand over 1h, 1d, 3d; the earlier click and its
    # impression in every window.
    assert sum(row.values()) == 1 + 5 + 5 + 3 + 3


def test_a_later_event_never_leaks_into_a_training_row(spark):
    ads = [(1, 10, 100)]
    now = T0 + 5 * HOUR
    impressions = [(7, 1, now, 0)]
    before = computed(spark, impressions, [], impressions, ads)
    later = [(7, now + offset, kind, 10, 100) for offset in (0, 1, HOUR) for kind in BTAGS]
    after = computed(spark, impressions, later, [*impressions, (7, 1, now + 5, 1)], ads)
    assert after == before
    assert set(after[(7, 1, now)].values()) == {0}


def reference(impression, behaviour, samples, ads_by_id) -> dict[str, int]:
    """The module's definition, event by event, through the window counts serving reads."""
    user, ad, now, _ = impression
    cate, brand = ads_by_id[ad]
    fields = []
    for b_user, time, btag, b_cate, b_brand in behaviour:
        if b_user == user and time < now:
            kind = Kind(btag)
            bucket = events.bucket_of(time)
            fields.append((events.count_field(kind, Scope.CATEGORY, b_cate, bucket), 1))
            if b_brand > 0:
                fields.append((events.count_field(kind, Scope.BRAND, b_brand, bucket), 1))
    for s_user, s_ad, time, clk in samples:
        if s_user == user and time < now:
            bucket = events.bucket_of(time)
            s_cate = ads_by_id[s_ad][0]
            fields.append((events.count_field(Kind.IMPRESSION, Scope.CATEGORY, s_cate, bucket), 1))
            if clk:
                fields.append((events.count_field(Kind.CLICK, Scope.CATEGORY, s_cate, bucket), 1))
    counts = events.window_counts(fields, now)
    columns = features.history_inputs(counts, np.array([cate]), np.array([brand]))
    return {name: int(values[0]) for name, values in columns.items()}


def test_random_logs_give_the_counts_serving_would_read(spark):
    rng = random.Random(5)
    ads = [(ad, rng.choice([10, 11, 12]), rng.choice([0, 100, 101])) for ad in range(1, 9)]
    ads_by_id = {ad: (cate, brand) for ad, cate, brand in ads}
    span = 100 * HOUR
    behaviour = [
        (
            rng.choice([1, 2]),
            T0 + rng.randrange(span),
            rng.choice(BTAGS),
            rng.choice([10, 11, 12]),
            rng.choice([0, 100, 101]),
        )
        for _ in range(400)
    ]
    samples = [
        (rng.choice([1, 2]), rng.randrange(1, 9), T0 + rng.randrange(span), rng.choice([0, 0, 1]))
        for _ in range(150)
    ]
    samples += [(user, ad, time + rng.choice([0, 1]), 1) for user, ad, time, _ in samples[:20]]
    counts = computed(spark, samples, behaviour, samples, ads)
    assert len(counts) == len({tuple(s[:3]) for s in samples})
    for impression in samples:
        assert counts[tuple(impression[:3])] == reference(
            impression, behaviour, samples, ads_by_id
        ), impression
