"""Spark ML ALS over (user, category) ratings, with a held-out RMSE.

Contract: :func:`train_als` takes ``(user_id, cate_id, rating)`` rows (see
``jobs.ratings``) and an :class:`AlsConfig` (the course's explicit-feedback
defaults: rank 10, 10 iterations, regParam 0.1) and returns an :class:`AlsResult`:
the user factors as a DataFrame (one row per user, never collected: there is a row for
every user of the data set), the category factors as numpy arrays (ids ascending,
float32 matrix; a few thousand rows, which recall and ranking hold in memory), the
held-out RMSE and the fitted model.

Evaluation, then refit: the ratings are split at random (``holdout_fraction``,
seeded); a model fitted on the larger part is scored on the held-out part, where
pairs of users or categories unseen in training are dropped (ALS cannot score them).
The published factors then come from a second fit on *all* ratings, so every rated
user and category gets factors: a 10% holdout would otherwise strip the factors of
every user whose few ratings all landed in it. The price is a second ALS fit, kept
small by evaluating on the ratings of at most ``evaluation_users`` users (a seeded
sample by user id hash; every user below that): 50,000 users' ratings estimate an
RMSE to the third digit, and at 200k users the evaluation fit costs a quarter of a
full one. ``holdout_fraction=0`` skips the evaluation.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.compute as pc
from pyspark import StorageLevel
from pyspark.ml.recommendation import ALS, ALSModel
from pyspark.sql import DataFrame
from pyspark.sql import functions as sf

from jobs.spark import aggregate_row


@dataclasses.dataclass(frozen=True)
class AlsConfig:
    rank: int = 10
    max_iter: int = 10
    reg_param: float = 0.1
    seed: int = 42
    holdout_fraction: float = 0.1
    evaluation_users: int = 50_000
    # User and item blocks (Spark's numUserBlocks/numItemBlocks): parallelism of each
    # iteration; Spark's default of 10 suits a cluster, fewer suit a laptop.
    blocks: int = 10

    def __post_init__(self) -> None:
        if min(self.rank, self.max_iter, self.blocks) < 1:
            raise ValueError("ALS rank, max_iter and blocks must be positive")
        if self.reg_param < 0:
            raise ValueError("ALS reg_param must not be negative")
        if not 0 <= self.holdout_fraction < 1:
            raise ValueError("holdout_fraction must be in [0, 1)")
        if self.evaluation_users < 1:
            raise ValueError("evaluation_users must be positive")


@dataclasses.dataclass(frozen=True, eq=False)
class AlsResult:
    users: int  # users with factors
    cate_ids: np.ndarray  # int32, ascending
    cate_vectors: np.ndarray  # float32 (categories, rank)
    holdout_rmse: float | None
    # RMSE of predicting the mean training rating on the same held-out pairs: the bar
    # the model has to clear to be worth anything.
    baseline_rmse: float | None
    train_ratings: int
    holdout_ratings: int
    model: ALSModel

    @property
    def rank(self) -> int:
        return int(self.cate_vectors.shape[1])

    @property
    def cate_factors(self) -> tuple[np.ndarray, np.ndarray]:
        return self.cate_ids, self.cate_vectors

    def user_factor_frame(self) -> DataFrame:
        """(user_id int, als_factors array<float>) straight from the model, no driver round trip."""
        return self.model.userFactors.select(
            sf.col("id").alias("user_id"), sf.col("features").alias("als_factors")
        )

    def metrics(self) -> dict[str, float | int | None]:
        return {
            "als_rank": self.rank,
            "als_users": self.users,
            "als_categories": len(self.cate_ids),
            "als_train_ratings": self.train_ratings,
            "als_holdout_ratings": self.holdout_ratings,
            "als_holdout_rmse": self.holdout_rmse,
            "als_baseline_rmse": self.baseline_rmse,
        }


def train_als(ratings: DataFrame, config: AlsConfig = AlsConfig()) -> AlsResult:
    # Every iteration reads the ratings: cache them, unless the caller already has.
    cached_by_caller = ratings.is_cached
    ratings = ratings.select("user_id", "cate_id", "rating")
    if not cached_by_caller:
        ratings = ratings.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        holdout_rmse = baseline_rmse = None
        holdout_count = 0
        if config.holdout_fraction > 0:
            train, holdout = _evaluation_sample(ratings, config).randomSplit(
                [1 - config.holdout_fraction, config.holdout_fraction], seed=config.seed
            )
            holdout_rmse, baseline_rmse, holdout_count = _holdout_errors(
                _estimator(config).fit(train), train, holdout
            )
        model = _estimator(config).fit(ratings)
        train_count = ratings.count()
    finally:
        if not cached_by_caller:
            ratings.unpersist()
    cate_ids, cate_vectors = _factors(model.itemFactors, config.rank)
    return AlsResult(
        users=model.userFactors.count(),
        cate_ids=cate_ids,
        cate_vectors=cate_vectors,
        holdout_rmse=holdout_rmse,
        baseline_rmse=baseline_rmse,
        train_ratings=train_count,
        holdout_ratings=holdout_count,
        model=model,
    )


def _evaluation_sample(ratings: DataFrame, config: AlsConfig) -> DataFrame:
    users = ratings.select("user_id").distinct().count()
    if users <= config.evaluation_users:
        return ratings
    buckets = 1 << 20
    kept = round(buckets * config.evaluation_users / users)
    bucket = sf.pmod(sf.xxhash64(sf.col("user_id"), sf.lit(config.seed)), sf.lit(buckets))
    return ratings.where(bucket < kept)


def _estimator(config: AlsConfig) -> ALS:
    return ALS(
        rank=config.rank,
        maxIter=config.max_iter,
        regParam=config.reg_param,
        implicitPrefs=False,
        userCol="user_id",
        itemCol="cate_id",
        ratingCol="rating",
        coldStartStrategy="drop",
        seed=config.seed,
        numUserBlocks=config.blocks,
        numItemBlocks=config.blocks,
    )


def _holdout_errors(
    model: ALSModel, train: DataFrame, holdout: DataFrame
) -> tuple[float | None, float | None, int]:
    """(model RMSE, mean-rating RMSE, held-out pairs) over the pairs the model can score."""
    mean_rating = aggregate_row(train.agg(sf.avg("rating")))[0]
    scored = model.transform(holdout)
    row = aggregate_row(
        scored.agg(
            sf.sqrt(sf.avg((sf.col("rating") - sf.col("prediction")) ** 2)).alias("rmse"),
            sf.sqrt(sf.avg((sf.col("rating") - sf.lit(mean_rating)) ** 2)).alias("baseline"),
        )
    )
    return row["rmse"], row["baseline"], holdout.count()


def _factors(frame: DataFrame, rank: int) -> tuple[np.ndarray, np.ndarray]:
    table = frame.select("id", "features").toArrow()
    ids = table.column("id").to_numpy().astype(np.int32)
    vectors = pc.list_flatten(table.column("features")).to_numpy().astype(np.float32)
    order = np.argsort(ids, kind="stable")
    return ids[order], vectors.reshape(len(ids), rank)[order]
