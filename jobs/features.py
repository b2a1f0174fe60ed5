"""Ranking features for the batch job: user features, ad features with smoothed CTRs, examples.

Contract (every transform is DataFrame in, DataFrame out; loaders write to Redis):

- :func:`user_features` ``(profile, user_factors)`` -> one row per user that has a profile
  or ALS factors: ``user_id``, the eight profile fields (int, null = missing) and
  ``als_factors`` (array<float>, null = no factors); ``user_factors`` is the ALS model's
  frame (``user_id``, ``als_factors``).
- :func:`ad_features` ``(ads, samples, smoothing)`` -> one row per ad: ids, ``price`` and
  the smoothed historical CTRs ``ctr_ad``, ``ctr_cate``, ``ctr_brand`` (float), computed
  from the training days of ``samples`` only.
- :func:`training_examples` ``(samples, users, ads, cate_factors, smoothing)`` -> one row
  per impression of a known ad with ``split`` ("train" = days 1-7, "test" = day 8),
  ``label`` and every encoder input column, including ``als_affinity``.
- :func:`ad_table` collects ad features into the column arrays the ranking service keeps
  in memory; :func:`write_user_features`, :func:`write_ad_table` and
  :func:`write_cate_factors` load a version in Redis.

Smoothing is hierarchical Bayesian shrinkage: ``(clicks + m * prior) / (impressions + m)``,
where a category and a brand shrink towards the global training CTR and an ad shrinks
towards its category's smoothed CTR, so an ad without history gets its category's CTR and
a null brand gets the global one. The served values use all training days. Training rows
instead get out-of-fold values (their own fold's impressions left out): an in-sample CTR
contains the row's own click, which the model would learn to trust far more than it
deserves on the unseen test day.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F  # noqa: N812 - the conventional alias
from pyspark.sql import types as T  # noqa: N812

from adrec.core import features as spec_features
from adrec.core.codecs import UserFeatures
from adrec.core.features import USER_PROFILE_FIELDS
from adrec.core.redis_conn import RedisSettings, connect
from adrec.core.store import VersionWriter
from jobs import history
from jobs.ingest import in_training_days, on_test_day
from jobs.load import write_from_executors

#: Ad table columns in storage order, with their stored dtypes.
AD_TABLE_DTYPES = {
    "adgroup_id": np.int32,
    "cate_id": np.int32,
    "campaign_id": np.int32,
    "customer_id": np.int32,
    "brand_id": np.int32,
    "price": np.float32,
    "ctr_ad": np.float32,
    "ctr_cate": np.float32,
    "ctr_brand": np.float32,
}
#: ``brand_id`` stored for ads whose brand is NULL in the source data (ids are positive).
MISSING_BRAND = -1

FACTORS_TYPE = T.ArrayType(T.FloatType())


@dataclasses.dataclass(frozen=True)
class Smoothing:
    """Pseudo-impression counts of the shrinkage priors, and out-of-fold folds for training."""

    ad_strength: float = 100.0
    cate_strength: float = 100.0
    brand_strength: float = 100.0
    folds: int = 5

    def __post_init__(self) -> None:
        for name in ("ad_strength", "cate_strength", "brand_strength"):
            if getattr(self, name) <= 0:
                raise ValueError(f"smoothing {name} must be positive")
        if self.folds < 1:
            raise ValueError("smoothing folds must be at least 1 (1 = in-sample CTRs)")


# ------------------------------------------------------------------ splits


def _is_train() -> Column:
    return in_training_days(F.col("event_day"))


def _is_test() -> Column:
    return on_test_day(F.col("event_day"))


def train_samples(samples: DataFrame) -> DataFrame:
    """Impressions of the training days: days 1-7, 2017-05-06..12 China time."""
    return samples.where(_is_train())


# ------------------------------------------------------------------ user features


def user_features(profile: DataFrame, user_factors: DataFrame | None) -> DataFrame:
    """Profile fields (missing kept null) full-outer-joined with ALS user factors."""
    users = profile.select(
        F.col("user_id").cast("int"), *(F.col(f).cast("int") for f in USER_PROFILE_FIELDS)
    )
    if user_factors is None:
        return users.withColumn("als_factors", F.lit(None).cast(FACTORS_TYPE))
    factors = user_factors.select(
        F.col("user_id").cast("int"), F.col("als_factors").cast(FACTORS_TYPE)
    )
    return users.join(factors, "user_id", "full_outer")


def _user_records(batch: pd.DataFrame) -> list[UserFeatures]:
    profile = {f: batch[f].astype("float64").to_numpy() for f in USER_PROFILE_FIELDS}
    factors = batch["als_factors"].tolist()
    return [
        UserFeatures(
            {f: float(profile[f][row]) for f in USER_PROFILE_FIELDS},
            None if factors[row] is None else np.asarray(factors[row], dtype=np.float32),
        )
        for row in range(len(batch))
    ]


def write_user_features(users: DataFrame, redis: RedisSettings, version: str) -> int:
    """Write every user's features from the executors, one pipelined batch at a time."""

    def put(writer: VersionWriter, batch: pa.RecordBatch) -> int:
        rows = batch.to_pandas()
        return writer.put_user_features(rows["user_id"].to_numpy(), _user_records(rows))

    return write_from_executors(users, redis, version, put)


# ------------------------------------------------------------------ ad features


CTR_COLUMNS = ("ctr_ad", "ctr_cate", "ctr_brand")


def fold_of_sample(folds: int) -> Column:
    """The out-of-fold fold of each sample row: a hash of the row, not of its partition."""
    return F.pmod(F.xxhash64("user_id", "time_stamp", "adgroup_id", "pid"), F.lit(folds)).cast(
        "int"
    )


def _smoothed(clicks: Column, impressions: Column, prior: Column, strength: float) -> Column:
    return (F.coalesce(clicks, F.lit(0.0)) + F.lit(strength) * prior) / (
        F.coalesce(impressions, F.lit(0.0)) + F.lit(strength)
    )


_CountLevel = Literal["all", "cate", "brand", "ad"]
# (clicks, impressions) of a level's columns in the CTR table.
_LevelCounts = Callable[[_CountLevel], tuple[Column, Column]]


def _smoothed_ctrs(smoothing: Smoothing, counts: _LevelCounts) -> dict[str, Column]:
    """The three CTRs from ``counts(level) -> (clicks, impressions)``, level "all" = global."""
    clicks, impressions = counts("all")
    prior = clicks / impressions
    cate = _smoothed(*counts("cate"), prior, smoothing.cate_strength)
    # A null brand is "no brand", not one giant brand: it gets the global prior.
    brand = F.when(F.col("brand_id").isNull(), prior).otherwise(
        _smoothed(*counts("brand"), prior, smoothing.brand_strength)
    )
    return {
        "ctr_ad": _smoothed(*counts("ad"), cate, smoothing.ad_strength),
        "ctr_cate": cate,
        "ctr_brand": brand,
    }


def _impression_counts(prefix: str, folds: int) -> list[Column]:
    """Clicks and impressions of sample rows in total and, with folds, per fold (arrays)."""
    columns = [
        F.sum("clk").cast("double").alias(f"{prefix}_clicks"),
        F.count(F.lit(1)).cast("double").alias(f"{prefix}_impressions"),
    ]
    if folds > 1:
        in_fold = [F.col("fold") == fold for fold in range(folds)]
        columns += [
            F.array(
                *(F.sum(F.when(f, F.col("clk")).otherwise(0)).cast("double") for f in in_fold)
            ).alias(f"{prefix}_fold_clicks"),
            F.array(*(F.count(F.when(f, F.lit(1))).cast("double") for f in in_fold)).alias(
                f"{prefix}_fold_impressions"
            ),
        ]
    return columns


def _summed_counts(prefix: str, folds: int) -> list[Column]:
    """The ad-level counts summed over a group of ads (a category, a brand, all ads)."""
    columns = [
        F.sum(f"ad_{count}").alias(f"{prefix}_{count}") for count in ("clicks", "impressions")
    ]
    if folds > 1:
        columns += [
            F.array(*(F.sum(F.col(f"ad_fold_{count}")[fold]) for fold in range(folds))).alias(
                f"{prefix}_fold_{count}"
            )
            for count in ("clicks", "impressions")
        ]
    return columns


def _ctr_table(ads: DataFrame, samples: DataFrame, smoothing: Smoothing, folds: int) -> DataFrame:
    """``ads`` with the served CTRs and, when ``folds > 1``, ``oof_ctr_*`` arrays whose entry
    ``f`` is the CTR computed without the training impressions of fold ``f``."""
    train = train_samples(samples)
    if folds > 1:
        train = train.withColumn("fold", fold_of_sample(folds))
    # The only pass over the samples: counts per ad. Categories, brands and the global
    # prior add up the (much smaller) per-ad counts of the ads in the table.
    per_ad = train.groupBy("adgroup_id").agg(*_impression_counts("ad", folds))
    counted = ads.join(per_ad, "adgroup_id", "left")
    table = (
        counted.join(
            counted.groupBy("cate_id").agg(*_summed_counts("cate", folds)), "cate_id", "left"
        )
        .join(counted.groupBy("brand_id").agg(*_summed_counts("brand", folds)), "brand_id", "left")
        .crossJoin(F.broadcast(counted.agg(*_summed_counts("all", folds))))
    )

    served = _smoothed_ctrs(
        smoothing, lambda level: (F.col(f"{level}_clicks"), F.col(f"{level}_impressions"))
    )
    columns = [served[name].alias(name) for name in CTR_COLUMNS]
    if folds > 1:

        def without_fold(fold: int) -> _LevelCounts:
            def remaining(level: _CountLevel, count: str) -> Column:
                return F.col(f"{level}_{count}") - F.col(f"{level}_fold_{count}")[fold]

            return lambda level: (remaining(level, "clicks"), remaining(level, "impressions"))

        per_fold = [_smoothed_ctrs(smoothing, without_fold(fold)) for fold in range(folds)]
        columns += [
            F.array(*(ctrs[name] for ctrs in per_fold)).alias(f"oof_{name}") for name in CTR_COLUMNS
        ]
    return table.select(*ads.columns, *columns)


def ad_features(ads: DataFrame, samples: DataFrame, smoothing: Smoothing) -> DataFrame:
    """One row per ad with its price and smoothed training CTRs (days 1-7 of ``samples``)."""
    table = _ctr_table(ads, samples, smoothing, folds=1)
    return table.select(
        *(
            F.col(c).cast("int")
            for c in ("adgroup_id", "cate_id", "campaign_id", "customer_id", "brand_id")
        ),
        F.col("price").cast("float"),
        *(F.col(c).cast("float") for c in CTR_COLUMNS),
    )


def ad_table(ads: DataFrame) -> dict[str, np.ndarray]:
    """Collect ad features into column arrays sorted by ``adgroup_id`` (int32 / float32)."""
    frame = ads.select(*AD_TABLE_DTYPES).toPandas()
    frame["brand_id"] = frame["brand_id"].fillna(MISSING_BRAND)
    frame = frame.sort_values("adgroup_id", kind="stable")
    return {
        column: frame[column].to_numpy(dtype=dtype) for column, dtype in AD_TABLE_DTYPES.items()
    }


def write_ad_table(table: dict[str, np.ndarray], redis: RedisSettings, version: str) -> None:
    client = connect(redis)
    try:
        VersionWriter(client, version).put_ad_table(table)
    finally:
        client.close()


def write_cate_factors(
    cate_factors: tuple[np.ndarray, np.ndarray], redis: RedisSettings, version: str
) -> None:
    client = connect(redis)
    try:
        VersionWriter(client, version).put_cate_factors(*cate_factors)
    finally:
        client.close()


# ------------------------------------------------------------------ examples

#: Columns of :func:`training_examples`, encoder inputs included.
EXAMPLE_COLUMNS = (
    "split",
    "user_id",
    "adgroup_id",
    "time_stamp",
    "label",
    *spec_features.INPUT_COLUMNS,
)


def training_examples(
    samples: DataFrame,
    users: DataFrame,
    ads: DataFrame,
    cate_factors: tuple[np.ndarray, np.ndarray] | None,
    smoothing: Smoothing,
    train_sample: Column | None = None,
    behavior_log: DataFrame | None = None,
) -> DataFrame:
    """Impressions of known ads with user and ad features, split train (days 1-7) / test (8).

    ``ads`` is the output of :func:`ad_features`: test rows see exactly the CTRs that are
    served; training rows see out-of-fold CTRs when ``smoothing.folds > 1``.
    ``train_sample`` keeps only the training rows it is true for (the CTRs still count
    every impression). With ``behavior_log``, every row gets its history counts as of its
    own time (:mod:`jobs.history`); without, they are 0.
    """
    split = F.when(_is_train(), "train").when(_is_test(), "test")
    kept = F.col("split").isNotNull()
    if train_sample is not None:
        kept = (F.col("split") == "test") | ((F.col("split") == "train") & train_sample)
    rows = (
        samples.withColumn("split", split)
        .where(kept)
        .withColumn("label", F.col("clk").cast("double"))
        .join(_with_out_of_fold_ctrs(ads, samples, smoothing), "adgroup_id")
        .join(users, "user_id", "left")
    )
    rows = _pick_training_ctrs(rows, smoothing)
    if behavior_log is None:
        rows = rows.select(
            "*", *(F.lit(0).cast("int").alias(c) for c in spec_features.HISTORY_COLUMNS)
        )
    else:
        counts = history.history_features(rows, behavior_log, samples, ads)
        rows = rows.join(counts, list(history.KEY_COLUMNS), "left")
    without_affinity = [c for c in EXAMPLE_COLUMNS if c != "als_affinity"]
    examples = _with_als_affinity(rows.select(*without_affinity, "als_factors"), cate_factors)
    return examples.select(*EXAMPLE_COLUMNS)


def _with_out_of_fold_ctrs(ads: DataFrame, samples: DataFrame, smoothing: Smoothing) -> DataFrame:
    """``ads`` plus the ``oof_ctr_*`` arrays when training rows use out-of-fold CTRs."""
    if smoothing.folds == 1:
        return ads
    out_of_fold = _ctr_table(
        ads.select("adgroup_id", "cate_id", "brand_id"), samples, smoothing, smoothing.folds
    )
    return ads.join(
        out_of_fold.select("adgroup_id", *(f"oof_{name}" for name in CTR_COLUMNS)), "adgroup_id"
    )


def _pick_training_ctrs(rows: DataFrame, smoothing: Smoothing) -> DataFrame:
    """Training rows take the out-of-fold CTRs of their own fold; test rows keep the served."""
    if smoothing.folds == 1:
        return rows
    position = F.when(F.col("split") == "train", fold_of_sample(smoothing.folds) + 1)
    for name in CTR_COLUMNS:
        rows = rows.withColumn(
            name, F.coalesce(F.element_at(f"oof_{name}", position).cast("float"), F.col(name))
        )
    return rows


def _with_als_affinity(
    rows: DataFrame, cate_factors: tuple[np.ndarray, np.ndarray] | None
) -> DataFrame:
    """Replaces ``als_factors`` by ``als_affinity``, computed by the shared
    :func:`adrec.core.features.als_affinity` the service calls."""
    if cate_factors is None:
        return rows.drop("als_factors").withColumn("als_affinity", F.lit(float("nan")))
    cate_ids = np.asarray(cate_factors[0], dtype=np.int32)
    # Serving reads float32 factors back from Redis; score with exactly those values.
    vectors = np.asarray(cate_factors[1], dtype=np.float32)
    rank = vectors.shape[1]
    kept = [field for field in rows.schema.fields if field.name != "als_factors"]
    schema = T.StructType([*kept, T.StructField("als_affinity", T.DoubleType())])

    def add_affinity(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            users = factor_matrix(batch.column("als_factors"), rank)
            affinity = spec_features.als_affinity(
                users, batch.column("cate_id").to_numpy(zero_copy_only=False), cate_ids, vectors
            )
            yield pa.RecordBatch.from_arrays(
                [*(batch.column(field.name) for field in kept), pa.array(affinity)],
                names=schema.names,
            )

    return rows.mapInArrow(add_affinity, schema)


def factor_matrix(factors: pa.Array, rank: int) -> np.ndarray:
    """A list<float> column (null = no factors) as an ``(n, rank)`` float32 matrix, NaN rows."""
    matrix = np.full((len(factors), rank), np.nan, dtype=np.float32)
    present = factors.is_valid().to_numpy(zero_copy_only=False)
    if present.any():
        flat = pc.list_flatten(factors.filter(pa.array(present))).to_numpy(zero_copy_only=False)
        if flat.size != present.sum() * rank:
            raise ValueError(f"ALS user factors do not all have rank {rank}")
        matrix[present] = flat.reshape(-1, rank)
    return matrix
