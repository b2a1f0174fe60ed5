"""The ranking half of the batch job: features, smoothed CTRs, LR training, offline top-N.

Real local Spark and a real redis-server; small hand-built frames, plus the tiny
synthetic preset end to end.
"""

from __future__ import annotations

import dataclasses
import math
from datetime import datetime

import numpy as np
import pytest
from pyspark.sql import functions as F  # noqa: N812
from pyspark.sql import types as T  # noqa: N812

from adrec.core import dataset, keys, store
from adrec.core.codecs import UserFeatures
from adrec.core.dataset import PIDS
from adrec.core.features import COURSE, FULL, USER_PROFILE_FIELDS, als_affinity
from adrec.core.model import CtrModel
from adrec.core.redis_conn import RedisSettings
from jobs import ctr, evaluation, ingest, offline, ratings
from jobs import features as job_features
from jobs.als import AlsConfig, train_als
from services.ranking.snapshot import RankingSnapshot

pytestmark = pytest.mark.spark

VERSION = "v1"
TRAIN_TIME = int(datetime(2017, 5, 7, 12, tzinfo=dataset.CHINA_TIME).timestamp())
TEST_TIME = int(datetime(2017, 5, 13, 12, tzinfo=dataset.CHINA_TIME).timestamp())
PID_A, PID_B = PIDS

SAMPLE_SCHEMA = T.StructType(
    [
        T.StructField("user_id", T.IntegerType()),
        T.StructField("time_stamp", T.LongType()),
        T.StructField("adgroup_id", T.IntegerType()),
        T.StructField("pid", T.StringType()),
        T.StructField("nonclk", T.IntegerType()),
        T.StructField("clk", T.IntegerType()),
    ]
)
AD_SCHEMA = T.StructType(
    [
        T.StructField("adgroup_id", T.IntegerType()),
        T.StructField("cate_id", T.IntegerType()),
        T.StructField("campaign_id", T.IntegerType()),
        T.StructField("customer_id", T.IntegerType()),
        T.StructField("brand_id", T.IntegerType()),
        T.StructField("price", T.DoubleType()),
    ]
)
PROFILE_SCHEMA = T.StructType(
    [
        T.StructField("user_id", T.IntegerType()),
        *(T.StructField(field, T.IntegerType()) for field in USER_PROFILE_FIELDS),
    ]
)


def samples_frame(spark, rows):
    """rows: (user_id, time_stamp, adgroup_id, pid, clk) -> loader-shaped raw_sample."""
    full_rows = [(u, t, a, p, 1 - c, c) for u, t, a, p, c in rows]
    frame = spark.createDataFrame(full_rows, SAMPLE_SCHEMA)
    return frame.withColumn("event_day", ingest.event_day_column(F.col("time_stamp")))


def impressions(user, ad, clicks, total, time_stamp=TRAIN_TIME):
    """``total`` impressions of ``ad`` to ``user``, the first ``clicks`` of them clicked."""
    return [(user, time_stamp + i, ad, PID_A, int(i < clicks)) for i in range(total)]


def ads_frame(spark, rows):
    return spark.createDataFrame(rows, AD_SCHEMA)


def profile_frame(spark, rows):
    return spark.createDataFrame(rows, PROFILE_SCHEMA)


def redis_settings(url):
    return RedisSettings(url=url)


# ------------------------------------------------------------------ smoothed CTRs

HAND_ADS = [
    (1, 10, 1, 1, 100, 50.0),
    (2, 10, 1, 1, None, 20.0),
    (3, 20, 2, 1, 100, 300.0),
    (4, 20, 2, 2, 200, 9.9),  # never shown during training
]
HAND_TRAINING = (
    impressions(7, 1, clicks=2, total=4)
    + impressions(8, 2, clicks=0, total=2)
    + impressions(9, 3, clicks=1, total=4)
)


def hand_expected_ctrs(strength):
    prior = 3 / 10
    cate = {
        10: (2 + strength * prior) / (6 + strength),
        20: (1 + strength * prior) / (4 + strength),
    }
    brand = {100: (3 + strength * prior) / (8 + strength), None: prior, 200: prior}
    ad = {
        1: (2 + strength * cate[10]) / (4 + strength),
        2: (0 + strength * cate[10]) / (2 + strength),
        3: (1 + strength * cate[20]) / (4 + strength),
        4: cate[20],
    }
    return {
        ad_id: (ad[ad_id], cate[cate_id], brand[brand_id])
        for ad_id, cate_id, _, _, brand_id, _ in HAND_ADS
    }


def reference_ctrs(training_rows, ad_rows, smoothing):
    """The smoothing written out plainly: {ad id: (ctr_ad, ctr_cate, ctr_brand)}."""
    cate_of = {ad[0]: ad[1] for ad in ad_rows}
    brand_of = {ad[0]: ad[4] for ad in ad_rows}
    shown = [(ad, clk) for _, _, ad, _, clk in training_rows if ad in cate_of]

    def counts(key_of):
        totals = {}
        for ad, clk in shown:
            clicks, n = totals.get(key_of(ad), (0, 0))
            totals[key_of(ad)] = (clicks + clk, n + 1)
        return totals

    def smoothed(totals, key, prior, strength):
        clicks, n = totals.get(key, (0, 0))
        return (clicks + strength * prior) / (n + strength)

    prior = sum(clk for _, clk in shown) / len(shown)
    by_ad, by_cate, by_brand = counts(lambda a: a), counts(cate_of.get), counts(brand_of.get)
    expected = {}
    for ad, cate_id in cate_of.items():
        cate = smoothed(by_cate, cate_id, prior, smoothing.cate_strength)
        brand = (
            prior
            if brand_of[ad] is None
            else smoothed(by_brand, brand_of[ad], prior, smoothing.brand_strength)
        )
        expected[ad] = (smoothed(by_ad, ad, cate, smoothing.ad_strength), cate, brand)
    return expected


def collected_ctrs(frame):
    return {
        row["adgroup_id"]: (row["ctr_ad"], row["ctr_cate"], row["ctr_brand"])
        for row in frame.collect()
    }


def test_smoothed_ctrs_are_exact_and_use_training_days_only(spark):
    smoothing = job_features.Smoothing(ad_strength=2, cate_strength=2, brand_strength=2, folds=1)
    ads = ads_frame(spark, HAND_ADS)
    test_day_clicks = impressions(7, 4, clicks=3, total=3, time_stamp=TEST_TIME) + impressions(
        8, 1, clicks=1, total=1, time_stamp=TEST_TIME
    )
    expected = hand_expected_ctrs(2)
    reference = reference_ctrs(HAND_TRAINING, HAND_ADS, smoothing)
    assert all(reference[ad] == pytest.approx(expected[ad]) for ad in expected)
    for rows in (HAND_TRAINING, HAND_TRAINING + test_day_clicks):
        got = collected_ctrs(job_features.ad_features(ads, samples_frame(spark, rows), smoothing))
        assert got.keys() == expected.keys()
        for ad_id, values in expected.items():
            assert got[ad_id] == pytest.approx(values, rel=1e-6), ad_id


def test_ad_table_is_sorted_typed_and_round_trips_through_redis(spark, redis_url, redis_client):
    smoothing = job_features.Smoothing(folds=1)
    ads = job_features.ad_features(
        ads_frame(spark, list(reversed(HAND_ADS))), samples_frame(spark, HAND_TRAINING), smoothing
    )
    table = job_features.ad_table(ads)
    assert list(table) == list(job_features.AD_TABLE_DTYPES)
    assert table["adgroup_id"].tolist() == [1, 2, 3, 4]
    assert table["brand_id"].tolist() == [100, job_features.MISSING_BRAND, 100, 200]
    assert {str(a.dtype) for a in table.values()} == {"int32", "float32"}

    job_features.write_ad_table(table, redis_settings(redis_url), VERSION)
    stored = store.read_ad_table(redis_client, VERSION)
    for name, column in table.items():
        np.testing.assert_array_equal(stored[name], column)


def test_training_rows_get_out_of_fold_ctrs_and_test_rows_the_served_ones(spark):
    rng = np.random.default_rng(3)
    training = [
        (
            int(rng.integers(1, 30)),
            TRAIN_TIME + int(rng.integers(0, 5 * 86400)),
            int(rng.integers(1, 5)),
            PIDS[int(rng.integers(0, 2))],
            int(rng.random() < 0.3),
        )
        for _ in range(300)
    ]
    samples = samples_frame(
        spark, training + impressions(5, 2, clicks=1, total=3, time_stamp=TEST_TIME)
    )
    ads = ads_frame(spark, HAND_ADS)
    smoothing = job_features.Smoothing(ad_strength=5, cate_strength=7, brand_strength=3, folds=3)
    served = job_features.ad_features(ads, samples, smoothing)
    users = job_features.user_features(profile_frame(spark, []), None)
    examples = job_features.training_examples(samples, users, served, None, smoothing)
    rows = examples.withColumn("fold", job_features.fold_of_sample(smoothing.folds)).collect()

    fold_of = {(r["user_id"], r["time_stamp"], r["adgroup_id"], r["pid"]): r["fold"] for r in rows}
    train_rows = [r for r in rows if r["split"] == "train"]
    assert len(train_rows) == 300 and {r["fold"] for r in train_rows} == {0, 1, 2}
    for fold in range(smoothing.folds):
        # A fold's rows see exactly the CTRs the other folds' training rows alone give.
        others = [row for row in training if fold_of[row[:4]] != fold]
        expected = reference_ctrs(others, HAND_ADS, smoothing)
        for row in (r for r in train_rows if r["fold"] == fold):
            got = (row["ctr_ad"], row["ctr_cate"], row["ctr_brand"])
            assert got == pytest.approx(expected[row["adgroup_id"]], rel=1e-6)

    served_ctrs = reference_ctrs(training, HAND_ADS, smoothing)
    for ad_id, values in collected_ctrs(served).items():
        assert values == pytest.approx(served_ctrs[ad_id], rel=1e-6)
    test_rows = [r for r in rows if r["split"] == "test"]
    assert len(test_rows) == 3
    for row in test_rows:
        got = (row["ctr_ad"], row["ctr_cate"], row["ctr_brand"])
        assert got == pytest.approx(served_ctrs[2], rel=1e-6)


# ------------------------------------------------------------------ user features

PROFILES = [
    (1, 0, 3, 1, 2, None, 3, 0, None),
    (2, 5, 8, 2, 4, 2, 1, 1, 4),
    (3, None, None, None, None, None, None, None, None),
]
USER_FACTORS = (
    np.array([2, 4], dtype=np.int32),
    np.array([[0.5, -1.0, 2.0], [1.0, 1.0, 1.0]], dtype=np.float32),
)


def factor_rows(spark, factors):
    """ALS user factors as the model's frame: (user_id, als_factors)."""
    ids, vectors = factors
    rows = [(int(i), [float(x) for x in v]) for i, v in zip(ids, vectors, strict=True)]
    return spark.createDataFrame(rows, "user_id int, als_factors array<float>")


CATE_FACTORS = (
    np.array([10, 30], dtype=np.int32),
    np.array([[1.0, 0.0, 0.5], [2.0, 2.0, 2.0]], dtype=np.float32),
)


def test_user_features_keep_missing_fields_and_join_als_factors(spark, redis_url, redis_client):
    factors = factor_rows(spark, USER_FACTORS)
    users = job_features.user_features(profile_frame(spark, PROFILES), factors)
    rows = {row["user_id"]: row for row in users.collect()}
    assert sorted(rows) == [1, 2, 3, 4]
    assert rows[1]["pvalue_level"] is None and rows[1]["als_factors"] is None
    assert rows[4]["gender"] is None and rows[4]["als_factors"] == [1.0, 1.0, 1.0]

    written = job_features.write_user_features(users, redis_settings(redis_url), VERSION)
    assert written == 4
    first = store.read_user_features(redis_client, VERSION, 1)
    assert first.als_factors is None
    assert first.profile["cms_group_id"] == 3 and math.isnan(first.profile["pvalue_level"])
    second = store.read_user_features(redis_client, VERSION, 2)
    assert second.profile == {
        f: float(v) for f, v in zip(USER_PROFILE_FIELDS, PROFILES[1][1:], strict=True)
    }
    np.testing.assert_array_equal(second.als_factors, USER_FACTORS[1][0])
    without_profile = store.read_user_features(redis_client, VERSION, 4)
    assert all(math.isnan(v) for v in without_profile.profile.values())
    np.testing.assert_array_equal(without_profile.als_factors, USER_FACTORS[1][1])


def test_training_examples_join_users_ads_and_als_affinity(spark):
    ads = job_features.ad_features(
        ads_frame(spark, HAND_ADS),
        samples_frame(spark, HAND_TRAINING),
        job_features.Smoothing(folds=1),
    )
    factors = factor_rows(spark, USER_FACTORS)
    users = job_features.user_features(profile_frame(spark, PROFILES), factors)
    samples = samples_frame(
        spark,
        [
            (2, TRAIN_TIME, 1, PID_A, 1),  # factors, cate 10 has factors
            (2, TRAIN_TIME, 3, PID_B, 0),  # cate 20 has none
            (1, TEST_TIME, 1, PID_A, 0),  # no user factors
            (5, TEST_TIME, 2, PID_B, 1),  # no profile, no factors
            (2, TEST_TIME, 99, PID_A, 1),  # unknown ad: dropped
        ],
    )
    examples = job_features.training_examples(
        samples, users, ads, CATE_FACTORS, job_features.Smoothing(folds=1)
    )
    assert tuple(examples.columns) == job_features.EXAMPLE_COLUMNS
    rows = sorted(examples.collect(), key=lambda r: (r["split"], r["user_id"], r["adgroup_id"]))
    assert [(r["split"], r["user_id"], r["adgroup_id"], r["label"]) for r in rows] == [
        ("test", 1, 1, 0.0),
        ("test", 5, 2, 1.0),
        ("train", 2, 1, 1.0),
        ("train", 2, 3, 0.0),
    ]
    expected_affinity = float(np.dot(USER_FACTORS[1][0], CATE_FACTORS[1][0]))
    assert rows[2]["als_affinity"] == pytest.approx(expected_affinity, rel=1e-12)
    assert all(math.isnan(rows[i]["als_affinity"]) for i in (0, 1, 3))
    assert rows[1]["gender"] is None and rows[0]["cms_group_id"] == 3

    # A training sample drops training rows only; every impression still counts in the CTRs.
    sampled = job_features.training_examples(
        samples,
        users,
        ads,
        CATE_FACTORS,
        job_features.Smoothing(folds=1),
        train_sample=F.col("adgroup_id") == 3,
    )
    kept = sorted(sampled.collect(), key=lambda r: (r["split"], r["user_id"], r["adgroup_id"]))
    assert [(r["split"], r["adgroup_id"]) for r in kept] == [
        ("test", 1),
        ("test", 2),
        ("train", 3),
    ]
    assert [r["ctr_ad"] for r in kept] == [rows[0]["ctr_ad"], rows[1]["ctr_ad"], rows[3]["ctr_ad"]]


# ------------------------------------------------------------------ training parity


def random_examples(spark, rows=400, seed=11):
    """Encoder-ready examples with every kind of value, missing ones included."""
    rng = np.random.default_rng(seed)

    def level(high, missing=0.2, low=0):
        return None if rng.random() < missing else int(rng.integers(low, high + 1))

    records = []
    for i in range(rows):
        affinity = None if rng.random() < 0.3 else float(rng.normal())
        records.append(
            (
                "train" if i % 4 else "test",
                i + 1,
                int(rng.integers(1, 50)),
                TRAIN_TIME,
                float(rng.random() < 0.25),
                int(rng.integers(1, 9)),
                PIDS[i % 2],
                level(96),
                level(12),
                level(2, low=1),
                level(6),
                level(3, 0.5, low=1),
                level(3, low=1),
                level(1),
                level(4, 0.3, low=1),
                float(rng.lognormal(4, 1.5)),
                float(rng.uniform(0.01, 0.2)),
                float(rng.uniform(0.02, 0.1)),
                float(rng.uniform(0.02, 0.1)),
                float("nan") if affinity is None else affinity,
            )
        )
    schema = T.StructType(
        [
            T.StructField("split", T.StringType()),
            T.StructField("user_id", T.IntegerType()),
            T.StructField("adgroup_id", T.IntegerType()),
            T.StructField("time_stamp", T.LongType()),
            T.StructField("label", T.DoubleType()),
            T.StructField("cate_id", T.IntegerType()),
            T.StructField("pid", T.StringType()),
            *(T.StructField(f, T.IntegerType()) for f in USER_PROFILE_FIELDS),
            *(
                T.StructField(f, T.FloatType())
                for f in ("price", "ctr_ad", "ctr_cate", "ctr_brand")
            ),
            T.StructField("als_affinity", T.DoubleType()),
        ]
    )
    return spark.createDataFrame(records, schema)


def driver_columns(frame):
    """Encoder input columns built on the driver from collected rows, None -> NaN."""
    data = frame.toPandas()
    columns = {"pid": data["pid"].to_numpy(dtype=str)}
    for name in (*USER_PROFILE_FIELDS, "price", "ctr_ad", "ctr_cate", "ctr_brand", "als_affinity"):
        columns[name] = data[name].astype("float64").to_numpy()
    return columns


@pytest.mark.parametrize("spec", [COURSE, FULL], ids=lambda s: s.name)
def test_spark_side_encoding_equals_the_shared_encoder(spark, spec):
    examples = random_examples(spark).orderBy("user_id")
    encoded = ctr.encode_features(examples, spec).orderBy("user_id")
    in_spark = np.array(
        encoded.select("features").toPandas()["features"].tolist(), dtype=np.float32
    )
    on_driver = spec.encode(driver_columns(examples))
    assert in_spark.shape == (400, spec.dim)
    np.testing.assert_array_equal(in_spark, on_driver)


def test_ctr_model_predicts_sparks_probabilities(spark):
    examples = random_examples(spark, rows=600).cache()
    config = ctr.CtrConfig(reg_param=0.01, max_iter=50)
    fitted = ctr.fit(examples, FULL, config)
    model = ctr.to_ctr_model(fitted, FULL)

    train = ctr.encode_features(examples.where(F.col("split") == "train"), FULL).orderBy("user_id")
    from pyspark.ml.functions import array_to_vector, vector_to_array

    scored = fitted.transform(train.withColumn("features", array_to_vector("features")))
    spark_probability = np.array(
        scored.select(vector_to_array("probability")[1].alias("p")).toPandas()["p"]
    )
    ours = model.predict(
        FULL.encode(driver_columns(examples.where(F.col("split") == "train").orderBy("user_id")))
    )
    np.testing.assert_allclose(ours, spark_probability, atol=1e-9)

    artifact = ctr.predict(examples.where(F.col("split") == "train").orderBy("user_id"), model)
    np.testing.assert_allclose(artifact.toPandas()["probability"], spark_probability, atol=1e-9)
    examples.unpersist()


def test_trained_model_round_trips_through_redis(spark, redis_client):
    model, metrics = ctr.train_ctr_model(random_examples(spark), COURSE, ctr.CtrConfig())
    held_out = sum(fit["rows"] for fit in metrics["calibration"]["pids"].values())
    # About a tenth of the 300 training rows calibrate instead of training.
    assert metrics["feature_set"] == "course" and metrics["train_rows"] + held_out == 300
    assert 10 <= held_out <= 60
    assert metrics["test_rows"] == 100 and len(metrics["reliability"]) == 10
    # The test day's user ids reach the evaluation: random_examples gives each row its own.
    assert metrics["test_users"] == 100 and metrics["gauc"] is None
    assert metrics["normalized_entropy"] > 0 and len(metrics["roc"]["fpr"]) > 2
    assert model.metrics == metrics

    store.VersionWriter(redis_client, VERSION).put_model(model)
    loaded = store.read_model(redis_client, VERSION)
    np.testing.assert_array_equal(loaded.weights, model.weights)
    assert loaded.intercept == model.intercept
    assert loaded.spec == COURSE and loaded.metrics == metrics
    assert loaded.calibration == model.calibration


def test_training_rows_are_sampled_the_same_whatever_the_partitioning(spark):
    examples = random_examples(spark, rows=2_000)
    available = examples.count()
    sample = ctr.training_sample(available, available // 4, seed=5)

    def sampled(frame):
        return sorted((r.user_id, r.time_stamp) for r in frame.where(sample).collect())

    first, second = sampled(examples.repartition(1)), sampled(examples.repartition(7))
    assert first == second
    assert abs(len(first) - available // 4) < available * 0.08
    assert sampled(examples) != sorted(
        (r.user_id, r.time_stamp)
        for r in examples.where(ctr.training_sample(available, available // 4, seed=6)).collect()
    )
    assert examples.where(ctr.training_sample(available, None, seed=5)).count() == available
    assert examples.where(ctr.training_sample(available, available, seed=5)).count() == available


# ------------------------------------------------------------------ offline ranking


def model_top_n(client, version, user_id, pid, top_n):
    """The model's top N of a user's recall list, from what Redis holds, written plainly.

    Each distinct recall candidate the ad table holds is encoded by the shared encoder and
    scored by the model's weights, summed per row with math.fsum (correctly rounded, so
    equal ads score exactly equal); then CTR descending, ties in recall order, first N.
    """
    model = store.read_model(client, version)
    ads = store.read_ad_table(client, version)
    cate_ids, cate_factors = store.read_cate_factors(client, version)
    user = store.read_user_features(client, version, user_id) or UserFeatures.missing()
    row_of = {int(ad): row for row, ad in enumerate(ads["adgroup_id"])}
    recalled = dict.fromkeys(store.read_recall_list(client, version, user_id).tolist())
    candidates = [ad for ad in recalled if ad in row_of]
    rows = np.array([row_of[ad] for ad in candidates], dtype=np.int64)
    columns = {
        "pid": pid,
        **user.columns(),
        **{name: ads[name][rows] for name in ("price", "ctr_ad", "ctr_cate", "ctr_brand")},
        "als_affinity": (
            np.full(len(rows), np.nan)
            if user.als_factors is None
            else als_affinity(user.als_factors, ads["cate_id"][rows], cate_ids, cate_factors)
        ),
    }
    encoded = model.spec.encode(columns).astype(np.float64)
    margins = np.array([math.fsum([*(row * model.weights), model.intercept]) for row in encoded])
    ctrs = 1.0 / (1.0 + np.exp(-margins))
    order = sorted(range(len(candidates)), key=lambda i: (-ctrs[i], i))[:top_n]
    return [candidates[i] for i in order], ctrs[order]


def served_snapshot(client, version):
    """The ranking service's state for `version`, built from the bytes the job published."""
    return RankingSnapshot.build(
        version,
        *(client.get(family.key(version)) for family in (keys.MODEL, keys.ADS, keys.CATE_FACTORS)),
    )


#: Ads with every feature equal and never shown in training, so equal CTRs for any user.
TIED_ADS = [1, 3, 5, 7, 9]
TWIN_ADS = [41, 42]


def test_offline_lists_are_the_models_top_n_as_the_ranking_service_ranks_them(
    spark, redis_url, redis_client
):
    rng = np.random.default_rng(5)
    ad_rows = [
        (
            ad_id,
            int(rng.choice([10, 20, 30])),
            1,
            1,
            None if rng.random() < 0.3 else int(rng.integers(100, 104)),
            float(rng.lognormal(4, 1)),
        )
        for ad_id in range(1, 41)
    ]
    for ad_id in TIED_ADS:
        ad_rows[ad_id - 1] = (ad_id, 20, 1, 1, 101, 75.0)
    ad_rows += [(ad_id, 10, 1, 1, 100, 50.0) for ad_id in TWIN_ADS]
    shown = [ad for ad in range(1, 41) if ad not in TIED_ADS]
    training = [
        (
            int(rng.integers(1, 9)),
            TRAIN_TIME,
            int(rng.choice(shown)),
            PID_A,
            int(rng.random() < 0.2),
        )
        for _ in range(200)
    ]
    ad_features = job_features.ad_features(
        ads_frame(spark, ad_rows), samples_frame(spark, training), job_features.Smoothing(folds=1)
    )
    table = job_features.ad_table(ad_features)
    factors = factor_rows(spark, USER_FACTORS)
    users = job_features.user_features(profile_frame(spark, PROFILES), factors)
    model = CtrModel(FULL, rng.normal(0, 1, FULL.dim), -3.0)

    recall = {
        1: [42, 41, 7, 999, 12],  # 999 is not in the ad table
        2: list(rng.permutation(np.arange(1, 43))[:30]),
        3: [9, 3, 7, 1, 5],  # tied, in an order that is not their id order
        4: list(range(1, 43)),
        5: [12, 9, 12, 3, 30, 7, 1, 9, 5, 18],  # repeats: the first occurrence counts
        6: [5, 41, 42, 17],  # no stored features at all
        7: [999],  # nothing known: no list
    }
    recall_df = spark.createDataFrame(
        [(u, [int(a) for a in ids]) for u, ids in recall.items()],
        "user_id int, ad_ids array<int>",
    )
    settings = redis_settings(redis_url)
    writer = store.VersionWriter(redis_client, VERSION)
    writer.put_recall_lists(list(recall), [np.array(ids) for ids in recall.values()])
    writer.put_ad_table(table)
    writer.put_cate_factors(*CATE_FACTORS)
    writer.put_model(model)
    job_features.write_user_features(users, settings, VERSION)

    top_n = 5
    lists = offline.offline_top_n(recall_df, users, table, CATE_FACTORS, model, top_n=top_n)
    assert offline.write_offline_lists(lists, settings, VERSION) == 6
    assert store.read_offline_list(redis_client, VERSION, 7) is None
    snapshot = served_snapshot(redis_client, VERSION)
    offline_ids = {}
    for user_id in (1, 2, 3, 4, 5, 6):
        ids, ctrs = store.read_offline_list(redis_client, VERSION, user_id)
        offline_ids[user_id] = ids.tolist()
        expected_ids, expected_ctrs = model_top_n(
            redis_client, VERSION, user_id, offline.OFFLINE_PID, top_n
        )
        assert ids.tolist() == expected_ids, user_id
        np.testing.assert_allclose(ctrs, expected_ctrs, rtol=1e-3)
        # What the service answers a ranking request for the user's recall list, as the
        # gateway sends it: the same ads and the same CTRs, stored as the job stores them.
        stored = store.read_user_features(redis_client, VERSION, user_id)
        served = snapshot.score(
            offline.OFFLINE_PID,
            stored or UserFeatures.missing(),
            store.read_recall_list(redis_client, VERSION, user_id).astype(np.int64),
            top_n,
        )
        assert ids.tolist() == served.ad_ids, user_id
        np.testing.assert_array_equal(
            ctrs, np.asarray(served.ctrs, dtype=np.float32).astype(np.float16)
        )

    assert offline_ids[3] == [9, 3, 7, 1, 5]
    # The twins: next to each other, in each user's recall order.
    for user_id, first, second in ((1, 42, 41), (6, 41, 42)):
        assert offline_ids[user_id].index(first) + 1 == offline_ids[user_id].index(second)


def test_offline_order_is_the_same_for_every_pid():
    rng = np.random.default_rng(8)
    ads = {
        "adgroup_id": np.arange(1, 21, dtype=np.int32),
        "cate_id": rng.choice([10, 30], 20).astype(np.int32),
        "price": rng.lognormal(4, 1, 20).astype(np.float32),
        **{
            name: rng.uniform(0.01, 0.1, 20).astype(np.float32)
            for name in ("ctr_ad", "ctr_cate", "ctr_brand")
        },
    }
    model = CtrModel(FULL, rng.normal(0, 1, FULL.dim), -2.0)
    data = offline.RankingData.as_served(ads, CATE_FACTORS, model)
    profiles = {field: np.array([1.0, np.nan]) for field in USER_PROFILE_FIELDS}
    factors = np.array([[0.3, 0.1, -0.2], [np.nan] * 3], dtype=np.float32)
    candidates = np.concatenate([np.arange(1, 21), np.arange(20, 0, -1)]).astype(np.int32)
    orders = [
        offline.rank_users(
            profiles, factors, candidates, np.array([0, 20, 40]), data, pid=pid, top_n=8
        )
        for pid in PIDS
    ]
    np.testing.assert_array_equal(orders[0][0], orders[1][0])
    np.testing.assert_array_equal(orders[0][2], [0, 8, 16])
    assert not np.allclose(orders[0][1], orders[1][1])


# ------------------------------------------------------------------ the tiny preset


def test_both_feature_sets_beat_chance_on_the_tiny_preset(spark, tiny_data):
    tables = ingest.load_dataset(spark, str(tiny_data))
    samples = tables["raw_sample"].data
    als = train_als(
        ratings.ratings_from_behavior(tables["behavior_log"].data),
        AlsConfig(max_iter=5, holdout_fraction=0.0, blocks=2),
    )
    smoothing = job_features.Smoothing()
    users = job_features.user_features(tables["user_profile"].data, als.user_factor_frame())
    ads = job_features.ad_features(tables["ad_feature"].data, samples, smoothing).cache()
    examples = job_features.training_examples(
        samples, users, ads, als.cate_factors, smoothing
    ).cache()

    metrics = {spec.name: ctr.train_ctr_model(examples, spec)[1] for spec in (COURSE, FULL)}
    oracle = evaluation.oracle_metrics(spark, str(tiny_data))
    assert metrics["course"]["test_rows"] == oracle["test_rows"] > 0
    assert metrics["course"]["auc"] > 0.5
    assert 0.5 < metrics["full"]["auc"] < oracle["auc"]
    for result in metrics.values():
        assert result["mean_predicted"] == pytest.approx(result["observed_ctr"], rel=0.25)
    examples.unpersist()
    ads.unpersist()


# ------------------------------------------------------------------ calibration


def _reference_platt(z, y):
    """Maximum-likelihood slope and offset of sigmoid(a z + b), Newton in plain numpy."""
    a, b = 1.0, 0.0
    for _ in range(50):
        p = 1 / (1 + np.exp(-(a * z + b)))
        w = p * (1 - p)
        gradient = np.array([np.sum((y - p) * z), np.sum(y - p)])
        hessian = np.array([[np.sum(w * z * z), np.sum(w * z)], [np.sum(w * z), np.sum(w)]])
        a, b = np.array([a, b]) + np.linalg.solve(hessian, gradient)
    return a, b


def test_calibration_is_fitted_per_pid_and_served_by_the_same_function(spark):
    from test_scoring import CATE_IDS, USERS, version

    from adrec.core.scoring import CtrScorer
    from jobs import calibration

    rng = np.random.default_rng(11)
    truth = {PID_A: (1.6, -0.4), PID_B: (0.7, 0.5)}
    rows = []
    for pid, (slope, offset) in truth.items():
        z = rng.normal(-2.5, 1.0, 8000)
        clicked = rng.random(8000) < 1 / (1 + np.exp(-(slope * z + offset)))
        rows += [
            (float(c), pid, float(1 / (1 + np.exp(-v)))) for v, c in zip(z, clicked, strict=True)
        ]
    rows.append((1.0, "unknown_pid", 0.5))  # too few rows: left uncalibrated
    scored = spark.createDataFrame(rows, "label double, pid string, probability double")
    fitted, report = calibration.fit_calibration(scored)
    assert set(fitted.by_pid) == {PID_A, PID_B}
    assert report["unknown_pid"]["calibrated"] is False
    for pid, (slope, offset) in truth.items():
        mine = [r for r in rows if r[1] == pid]
        y = np.array([r[0] for r in mine])
        z = np.log(np.array([r[2] for r in mine]) / (1 - np.array([r[2] for r in mine])))
        expected = _reference_platt(z, y)
        got = fitted.for_pid(pid)
        assert (got.slope, got.offset) == pytest.approx(expected, abs=1e-6)
        assert got.slope == pytest.approx(slope, abs=0.25)
        assert got.offset == pytest.approx(offset, abs=0.6)
        assert report[pid]["rows"] == 8000

    # The job's calibrated pCTRs, on the executors, are the ranking service's to 1e-6.
    plain, table, factors = version()
    model = dataclasses.replace(plain.model, calibration=fitted)
    scorer = CtrScorer.build(model, table, CATE_IDS, factors)
    for pid in PIDS:
        ranked = scorer.rank(pid, USERS[0], np.arange(1, 301), 0)
        frame = spark.createDataFrame(
            [(pid, float(ctr)) for ctr in ranked.ctrs], "pid string, probability double"
        )
        job_pctrs = [row["probability"] for row in calibration.calibrated(frame, fitted).collect()]
        np.testing.assert_allclose(ranked.pctrs, job_pctrs, rtol=0, atol=1e-6)
        assert not np.allclose(ranked.pctrs, ranked.ctrs, atol=1e-4)
