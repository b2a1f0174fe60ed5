"""Recall half of the batch job: ratings, ALS, recall lists, popular lists, hit rate.

Real local Spark and a real redis-server; the numpy algorithm is checked against
brute-force per-user computations on small hand-built catalogs.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from pyspark.sql.types import ArrayType, FloatType, IntegerType, StructField, StructType

from adrec.core import keys, store
from adrec.core.realtime import CategoryAds
from adrec.core.redis_conn import RedisSettings, connect
from jobs import recall
from jobs.als import AlsConfig, train_als
from jobs.popular import (
    ad_impressions,
    category_leaders,
    collect_category_leaders,
    collect_popular,
    popular_lists,
    write_category_leaders,
    write_popular,
)
from jobs.ratings import MAX_RATING, ratings_from_behavior
from jobs.recall import (
    RecallConfig,
    build_catalog,
    build_recall_lists,
    collect_catalog,
    publish_recall_lists,
    randomness,
    ranking,
    recall_chunk,
    recall_hit_rate,
    sampler,
    write_recall_lists,
)

# Executors must run this interpreter (the one with adrec installed), not a bare python3.
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

pytestmark = pytest.mark.spark

RANK = 3


def factor_frame(spark, user_ids, factors):
    rows = [(int(u), [float(x) for x in f]) for u, f in zip(user_ids, factors, strict=True)]
    schema = StructType(
        [
            StructField("user_id", IntegerType(), False),
            StructField("als_factors", ArrayType(FloatType(), False), False),
        ]
    )
    return spark.createDataFrame(rows, schema)


def make_catalog(sizes, impressions=None, popular=(), seed=0):
    """Categories 10, 20, ... with the given sizes; ad ids 1.. in category order."""
    rng = np.random.default_rng(seed)
    cate_ids = 10 * np.arange(1, len(sizes) + 1)
    ad_cates = np.repeat(cate_ids, sizes)
    ad_ids = np.arange(1, len(ad_cates) + 1)
    if impressions is None:
        impressions = np.zeros(len(ad_ids), dtype=np.int64)
    factors = rng.standard_normal((len(sizes), RANK)).astype(np.float32)
    return build_catalog(ad_ids, ad_cates, impressions, (cate_ids, factors), np.asarray(popular))


def users(count, seed=1):
    rng = np.random.default_rng(seed)
    return np.arange(1, count + 1) * 7, rng.standard_normal((count, RANK)).astype(np.float32)


def category_of(catalog):
    """ad id -> category id."""
    return dict(
        zip(
            catalog.ad_ids.tolist(),
            np.repeat(catalog.cate_ids, catalog.sizes).tolist(),
            strict=True,
        )
    )


def expected_categories(catalog, factors, top, length):
    """Brute force: categories by float64 score (ties: lower id), taken whole in order."""
    scores = catalog.cate_factors.astype(np.float64) @ factors.astype(np.float64)
    ranked = sorted(range(catalog.n_categories), key=lambda c: (-scores[c], c))[:top]
    sequence = []
    for c in ranked:
        sequence += [int(catalog.cate_ids[c])] * min(int(catalog.sizes[c]), length - len(sequence))
    return sequence


# ------------------------------------------------------------------ ratings


def test_ratings_follow_the_course_rule_with_the_cap(spark):
    rows = (
        [(1, 100, "pv", 10)] * 3
        + [(1, 100, "buy", 10)]
        + [(1, 100, "pv", 11)] * 25
        + [(1, 100, "fav", 11)] * 21
        + [(1, 100, "cart", 11)]
        + [(2, 100, b, 10) for b in ("pv", "fav", "cart", "buy") for _ in range(20)]
        + [(2, 100, "buy", 10)] * 30
        # ignored: non-positive timestamps, null ids
        + [(1, 0, "buy", 10), (1, -5, "buy", 10), (None, 100, "buy", 10), (1, 100, "buy", None)]
        + [(3, 0, "pv", 10)]
    )
    behavior = spark.createDataFrame(
        [(u, t, b, c, 1) for u, t, b, c in rows],
        "user_id int, time_stamp long, btag string, cate_id int, brand_id int",
    )
    got = {(r.user_id, r.cate_id): r.rating for r in ratings_from_behavior(behavior).collect()}
    assert got == {(1, 10): 1.6, (1, 11): 12.6, (2, 10): MAX_RATING}
    assert MAX_RATING == 44.0


# ------------------------------------------------------------------ ALS


def test_als_gives_factors_for_every_rated_user_and_a_finite_rmse(spark):
    rng = np.random.default_rng(3)
    truth_users, truth_cates = rng.random((60, 2)), rng.random((12, 2))
    rows = [
        (u + 1, 100 + c, float(np.clip(10 * truth_users[u] @ truth_cates[c], 0.2, 44)))
        for u in range(60)
        for c in range(12)
        if rng.random() < 0.6
    ]
    rows.append((999, 100, 3.0))  # a user with a single rating still gets factors
    ratings = spark.createDataFrame(rows, "user_id int, cate_id int, rating double")
    result = train_als(ratings, AlsConfig(rank=RANK, max_iter=3, seed=7, blocks=2))

    rated_users = sorted({r[0] for r in rows})
    assert result.users == len(rated_users)
    assert result.cate_ids.tolist() == sorted({r[1] for r in rows})
    assert result.cate_vectors.shape == (len(result.cate_ids), RANK)
    assert result.cate_vectors.dtype == np.float32
    assert np.isfinite(result.holdout_rmse) and result.holdout_rmse < result.baseline_rmse
    assert result.train_ratings == len(rows)
    assert 0 < result.holdout_ratings < len(rows) / 4
    frame = result.user_factor_frame().collect()
    assert sorted(r.user_id for r in frame) == rated_users
    assert {len(r.als_factors) for r in frame} == {RANK}

    # Evaluating on a sample of users still publishes factors for everyone.
    sampled = train_als(
        ratings,
        AlsConfig(
            rank=RANK, max_iter=3, seed=7, blocks=2, holdout_fraction=0.5, evaluation_users=15
        ),
    )
    assert sorted(r.user_id for r in sampled.user_factor_frame().collect()) == rated_users
    assert sampled.train_ratings == len(rows)
    assert 0 < sampled.holdout_ratings < len(rows) / 4
    assert np.isfinite(sampled.holdout_rmse)


# ------------------------------------------------------------------ recall lists (numpy)


@pytest.mark.parametrize(
    ("sizes", "top"),
    [
        ([120, 40, 300, 7, 90, 60, 250, 33, 18, 150] * 4, 20),
        # enough categories for the block prefilter of the top-category search
        (np.random.default_rng(6).integers(100, 300, 1_500).tolist(), 5),
    ],
)
def test_lists_have_distinct_ads_in_als_category_rank_order(sizes, top):
    catalog = make_catalog(sizes)
    user_ids, factors = users(40)
    config = RecallConfig(list_length=500, top_categories=top, seed=5)
    chunk = recall_chunk(catalog, config, user_ids, factors)
    cate = category_of(catalog)

    assert (chunk.lengths == 500).all() and (chunk.personal == 500).all()
    for row in range(0, 40, 4):
        ads = chunk.ad_ids[row]
        assert len(set(ads.tolist())) == 500
        expected = expected_categories(catalog, factors[row], top, 500)
        assert [cate[a] for a in ads.tolist()] == expected
        # categories before the last one visited are taken whole
        last = expected[-1]
        for c in set(expected) - {last}:
            whole = catalog.ad_ids[
                catalog.offsets[np.searchsorted(catalog.cate_ids, c)] : catalog.offsets[
                    np.searchsorted(catalog.cate_ids, c) + 1
                ]
            ]
            assert {a for a in ads.tolist() if cate[a] == c} == set(whole.tolist())


def test_short_lists_walk_only_the_top_categories_then_fill_from_popular():
    sizes = [30, 12, 25, 40, 8, 16]
    popular = [3, 200, 44, 1, 150, 77, 90, 2, 5]
    catalog = make_catalog(sizes, popular=popular)
    user_ids, factors = users(30)
    chunk = recall_chunk(catalog, RecallConfig(list_length=60, top_categories=2), user_ids, factors)
    cate = category_of(catalog)

    for row in range(30):
        expected = expected_categories(catalog, factors[row], 2, 60)
        personal = chunk.personal[row]
        ads = chunk.ad_ids[row, : chunk.lengths[row]].tolist()
        assert personal == len(expected)
        assert [cate[a] for a in ads[:personal]] == expected
        fill = [a for a in popular if a not in ads[:personal]][: 60 - personal]
        assert ads[personal:] == fill
        assert len(set(ads)) == len(ads) == personal + len(fill)
        assert (chunk.ad_ids[row, chunk.lengths[row] :] == 0).all()


def test_lists_are_reproducible_for_a_seed_and_independent_of_chunking():
    impressions = np.random.default_rng(4).zipf(1.7, 3872).clip(max=5000)
    catalog = make_catalog([400, 35, 2500, 60, 9, 700, 120, 48], impressions=impressions)
    user_ids, factors = users(50)
    for strategy in recall.STRATEGIES:
        config = RecallConfig(list_length=300, top_categories=4, strategy=strategy, seed=11)
        whole = recall_chunk(catalog, config, user_ids, factors)
        again = recall_chunk(catalog, config, user_ids, factors)
        assert np.array_equal(whole.ad_ids, again.ad_ids)
        for size in (1, 7, 16):
            parts = [
                recall_chunk(catalog, config, user_ids[i : i + size], factors[i : i + size])
                for i in range(0, 50, size)
            ]
            assert np.array_equal(np.vstack([p.ad_ids for p in parts]), whole.ad_ids)
        reseeded = recall_chunk(
            catalog,
            RecallConfig(list_length=300, top_categories=4, strategy=strategy, seed=12),
            user_ids,
            factors,
        )
        assert not np.array_equal(reseeded.ad_ids, whole.ad_ids)


def test_a_huge_category_is_sampled_without_replacement():
    # 20,000 ads, 100 wanted: sampled by draws rather than by keying every ad.
    impressions = np.random.default_rng(2).zipf(1.5, 20_000).clip(max=10_000)
    catalog = make_catalog([20_000], impressions=impressions)
    user_ids, factors = users(200)
    for strategy in recall.STRATEGIES:
        chunk = recall_chunk(
            catalog, RecallConfig(list_length=100, strategy=strategy), user_ids, factors
        )
        assert all(len(set(row.tolist())) == 100 for row in chunk.ad_ids)
        assert chunk.ad_ids.min() >= 1 and chunk.ad_ids.max() <= 20_000


@pytest.mark.parametrize(("size", "length"), [(400, 400), (20_000, 20)])  # keyed, drawn
def test_popular_strategy_favours_high_impression_ads(size, length):
    heavy = np.arange(1, size + 1) <= size // 10  # by ad id
    catalog = make_catalog([size], impressions=np.where(heavy, 99, 0))
    user_ids, factors = users(500)
    shares = {}
    for strategy in recall.STRATEGIES:
        chunk = recall_chunk(
            catalog, RecallConfig(list_length=length, strategy=strategy), user_ids, factors
        )
        shares[strategy] = heavy[chunk.ad_ids[:, :20] - 1].mean()
    # weight 100 against 1: each of the first 20 picks is heavy with probability > 0.85
    assert shares["popular"] > 0.85
    assert 0.07 < shares["uniform"] < 0.13


def test_keyed_and_drawn_samples_follow_the_same_distribution():
    weights = np.arange(1, 41)
    catalog = make_catalog([40], impressions=weights - 1)
    n = 4000
    streams = randomness.user_streams(3, np.arange(1, n + 1))
    segments = sampler.Segments(
        row=np.arange(n),
        cate=np.zeros(n, dtype=np.int64),
        take=np.full(n, 5),
        size=np.full(n, 40),
        start=np.zeros(n, dtype=np.int64),
    )
    keyed, drawn = np.zeros((n, 5), np.int32), np.zeros((n, 5), np.int32)
    sampler.sample_by_keys(catalog, True, streams, segments, keyed)
    sampler.sample_by_draws(catalog, True, streams, segments, drawn)

    first_expected = weights / weights.sum()
    for sample in (keyed, drawn):
        assert all(len(set(row.tolist())) == 5 for row in sample)
        first = np.bincount(sample[:, 0], minlength=41)[1:] / n
        assert np.abs(first - first_expected).max() < 0.02
    inclusion = [np.bincount(s.ravel(), minlength=41)[1:] / n for s in (keyed, drawn)]
    assert np.abs(inclusion[0] - inclusion[1]).max() < 0.06


def test_equal_scores_rank_the_lower_category_first():
    catalog = make_catalog([5, 5, 5, 5])
    tied = build_catalog(
        catalog.ad_ids,
        np.repeat(catalog.cate_ids, 5),
        np.zeros(20),
        (catalog.cate_ids, np.ones((4, RANK), np.float32)),
        np.array([]),
    )
    chunk = recall_chunk(
        tied, RecallConfig(list_length=8, top_categories=3), [1], np.ones((1, RANK), np.float32)
    )
    assert [category_of(tied)[a] for a in chunk.ad_ids[0].tolist()] == [10] * 5 + [20] * 3


def test_top_categories_match_a_full_sort_despite_many_ties():
    # Integer factors make many equal scores, also across the prefilter's blocks.
    rng = np.random.default_rng(8)
    cate_factors = rng.integers(-2, 3, (2_000, 3)).astype(np.float32)
    factors = rng.integers(-2, 3, (60, 3)).astype(np.float32)
    top = ranking.top_categories(factors, cate_factors, 5)
    scores = factors @ cate_factors.T
    for row in range(60):
        expected = sorted(range(2_000), key=lambda c: (-scores[row, c], c))[:5]
        assert top[row].tolist() == expected


def test_catalog_keeps_only_categories_with_factors_and_rejects_duplicate_ads():
    catalog = build_catalog(
        [5, 6, 7, 8],
        [1, 2, 2, 3],
        [0, 4, 9, 1],
        (np.array([2, 3, 4]), np.eye(3, dtype=np.float32)),
        [7],
    )
    assert catalog.cate_ids.tolist() == [2, 3]
    assert catalog.ad_ids.tolist() == [7, 6, 8]  # heaviest first within a category
    assert catalog.ads_without_factors == 1
    with pytest.raises(ValueError, match="unique"):
        build_catalog([5, 5], [1, 1], [0, 0], (np.array([1]), np.eye(1, dtype=np.float32)), [])


# ------------------------------------------------------------------ Spark and Redis


def test_spark_lists_match_numpy_and_decode_from_redis(spark, redis_url, tmp_path):
    catalog = make_catalog([80, 300, 45, 12, 600, 90, 30], popular=[1, 2, 3, 500, 900])
    user_ids, factors = users(120)
    config = RecallConfig(list_length=200, top_categories=3, strategy="popular", chunk_users=16)
    expected = recall_chunk(catalog, config, user_ids, factors)
    frame = factor_frame(spark, user_ids, factors)

    rows = build_recall_lists(frame, catalog, config).collect()
    got = {r.user_id: (r.ad_ids, r.personal) for r in rows}
    for user, ads, personal in zip(
        expected.user_ids.tolist(), expected.lists(), expected.personal.tolist(), strict=True
    ):
        assert got[user] == (ads.tolist(), personal)

    settings = RedisSettings(url=redis_url)
    stats = publish_recall_lists(
        frame, catalog, config, settings, "v3", output_path=str(tmp_path / "recall")
    )
    assert stats.users == 120
    assert stats.personal_ads + stats.fallback_ads == sum(len(a) for a, _ in got.values())
    assert stats.filled_users == sum(p < len(a) for a, p in got.values())
    client = connect(settings)
    for user, ads in zip(expected.user_ids.tolist(), expected.lists(), strict=True):
        assert store.read_recall_list(client, "v3", user).tolist() == ads.tolist()

    # Without a parquet copy only counts come back, and they are the same.
    assert publish_recall_lists(frame, catalog, config, settings, "v5") == stats
    assert client.get(keys.RECALL.key("v5", 7)) == client.get(keys.RECALL.key("v3", 7))

    saved = spark.read.parquet(str(tmp_path / "recall"))
    assert write_recall_lists(saved, settings, "v4") == 120
    user = int(expected.user_ids[5])
    assert client.get(keys.RECALL.key("v4", user)) == client.get(keys.RECALL.key("v3", user))
    client.close()


# ------------------------------------------------------------------ popular lists and hit rate


def samples_frame(spark, rows):
    return spark.createDataFrame(rows, "user_id int, adgroup_id int, pid string, clk int")


def test_popular_lists_rank_by_clicks_per_pid_and_overall(spark, redis_url):
    a, b = "430548_1007", "430539_1007"
    rows = (
        [(1, 100, a, 1)] * 3
        + [(1, 100, a, 0)] * 5  # 3 clicks / 8
        + [(1, 200, a, 1)] * 3
        + [(1, 200, a, 0)] * 1  # 3 clicks / 4: wins the tie
        + [(1, 300, b, 1)] * 4
        + [(1, 100, b, 1)] * 2
        + [(1, 400, b, 0)] * 9
        + [(1, 500, b, 0)] * 9  # no clicks: lower id first
    )
    samples = samples_frame(spark, rows)
    lists = collect_popular(popular_lists(samples, length=3))
    assert lists[a].tolist() == [200, 100]
    assert lists[b].tolist() == [300, 100, 400]
    assert lists[keys.POPULAR_ALL].tolist() == [100, 300, 200]

    impressions = {
        r.adgroup_id: (r.impressions, r.clicks) for r in ad_impressions(samples).collect()
    }
    assert impressions[100] == (10, 5)

    settings = RedisSettings(url=redis_url)
    assert write_popular(lists, settings, "v2") == 3
    client = connect(settings)
    assert store.read_popular(client, "v2", b).tolist() == [300, 100, 400]
    client.close()


def test_category_leaders_rank_by_clicks_keep_unshown_ads_last_and_round_trip(spark, redis_url):
    ads = spark.createDataFrame(
        [(1, 10), (2, 10), (3, 10), (4, 20), (5, 30), (6, 10)], "adgroup_id int, cate_id int"
    )
    rows = [(1, 1, "p", 1)] + [(1, 2, "p", 1)] * 2 + [(1, 3, "p", 0)] * 3 + [(1, 4, "p", 0)]
    leaders = collect_category_leaders(
        category_leaders(ads, ad_impressions(samples_frame(spark, rows)), per_category=3)
    )
    assert leaders["cate_id"].tolist() == [10, 10, 10, 20, 30]
    # Ad 2 has the most clicks; ad 3 was shown unclicked, ad 6 never shown: cut at three.
    assert leaders["ad_id"].tolist() == [2, 1, 3, 4, 5]

    settings = RedisSettings(url=redis_url)
    write_category_leaders(leaders, settings, "v2")
    client = connect(settings)
    table = store.read(client, keys.CATEGORY_ADS, "v2")
    client.close()
    by_category = CategoryAds.from_table(table)
    assert by_category.for_category(10).tolist() == [2, 1, 3]
    assert by_category.for_category(30).tolist() == [5]
    assert by_category.for_category(99).tolist() == []


def test_collect_catalog_weights_ads_by_training_impressions(spark):
    ads = spark.createDataFrame([(1, 10), (2, 10), (3, 20)], "adgroup_id int, cate_id int")
    impressions = ad_impressions(samples_frame(spark, [(1, 2, "p", 0)] * 4))
    catalog = collect_catalog(
        ads, impressions, (np.array([10, 20]), np.eye(2, dtype=np.float32)), [2]
    )
    assert catalog.ad_ids.tolist() == [2, 1, 3]
    assert catalog.weights.tolist() == [5, 1, 1]


def test_hit_rate_counts_clicked_pairs_found_in_the_lists(spark):
    lists = spark.createDataFrame([(1, [10, 11, 12], 3), (2, [20, 21], 2)], recall.RECALL_SCHEMA)
    test_day = samples_frame(
        spark,
        [
            (1, 10, "p", 1),
            (1, 10, "p", 1),
            (1, 13, "p", 1),
            (1, 11, "p", 0),
            (2, 21, "p", 1),
            (2, 22, "p", 0),
            (3, 99, "p", 1),  # no recall list: judged on the fallback
        ],
    )
    rate = recall_hit_rate(test_day, lists, fallback=[99, 98])
    assert (rate.clicked_pairs, rate.hits, rate.pairs_on_fallback) == (4, 3, 1)
    assert rate.rate == 0.75

    baseline = recall_hit_rate(test_day, None, fallback=[99, 98, 13])
    assert (baseline.clicked_pairs, baseline.hits, baseline.pairs_on_fallback) == (4, 2, 4)


# ------------------------------------------------------------------ tiny synthetic preset


def test_tiny_preset_end_to_end(spark, redis_url, tmp_path):
    from adrec.core import dataset
    from adrec.synthetic import generate
    from jobs import ingest

    generate("tiny", 5, tmp_path, progress=False)
    base = str(tmp_path)
    behavior = ingest.load_behavior_log(spark, ingest.dataset_path(base, dataset.BEHAVIOR_LOG))
    samples = ingest.load_raw_sample(spark, ingest.dataset_path(base, dataset.RAW_SAMPLE))
    ads = ingest.load_ad_feature(spark, ingest.dataset_path(base, dataset.AD_FEATURE))
    train, test = ingest.split_by_day(samples.data)

    als = train_als(
        ratings_from_behavior(behavior.data), AlsConfig(max_iter=5, blocks=2, holdout_fraction=0)
    )
    fallback = collect_popular(popular_lists(train))[keys.POPULAR_ALL]
    catalog = collect_catalog(ads.data, ad_impressions(train), als.cate_factors, fallback)
    assert catalog.ads_without_factors + len(catalog.ad_ids) == ads.clean_rows

    settings = RedisSettings(url=redis_url)
    stats = publish_recall_lists(
        als.user_factor_frame(),
        catalog,
        RecallConfig(strategy="popular", seed=5),
        settings,
        "v1",
        output_path=str(tmp_path / "recall"),
    )
    assert stats.users == als.users == stats.full_lists

    lists = spark.read.parquet(str(tmp_path / "recall"))
    table = lists.toArrow()
    listed = dict(
        zip(table.column("user_id").to_pylist(), table.column("ad_ids").to_pylist(), strict=True)
    )
    client = connect(settings)
    user = sorted(listed)[len(listed) // 2]
    assert store.read_recall_list(client, "v1", user).tolist() == listed[user]
    client.close()

    rate = recall_hit_rate(test, lists, fallback)
    clicked = {(r.user_id, r.adgroup_id) for r in test.where("clk = 1").collect()}
    hits = sum(ad in set(listed.get(user, fallback.tolist())) for user, ad in clicked)
    assert (rate.clicked_pairs, rate.hits) == (len(clicked), hits)
    assert rate.rate > 500 / ads.clean_rows  # better than 500 ads drawn at random
