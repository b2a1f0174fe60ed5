"""Recall-list stage at the full data set's size, from ALS factors to Redis, against the course.

Run: ``.venv/bin/python bench/bench_recall.py`` (run time and the RAM its private
redis-server needs: docs/performance.md). ``--users 100000`` gives a quick smaller run.

What it measures:

1. The stage as the job runs it (:func:`jobs.recall.publish_recall_lists`): Spark
   executors score every user, sample 500 distinct ads and write them to a private
   redis-server, per strategy. Users/s, wall time against the 5-minute target, and the
   Redis memory of the recall family (``used_memory`` before and after).
2. The same numpy chunk function and writer from the driver alone, on a sample of users,
   to compare the two ways of loading.
3. The course's way on a few users: a real ALSModel ``transform`` over all categories,
   ``sort``, ``np.random.choice`` per category with replacement and an unpipelined
   ``SADD``, extrapolated to every user.

The factors are random (timing does not depend on their values); category sizes and ad
impressions follow Zipf-like laws like the real data's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    import redis
    import redis.cluster
    from pyspark.sql import DataFrame, SparkSession

    from adrec.core.redis_conn import RedisSettings
    from jobs.recall import RecallCatalog, RecallConfig

    RedisClient: TypeAlias = redis.Redis | redis.cluster.RedisCluster

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

FULL_USERS = 1_141_729
FULL_ADS = 846_811
FULL_CATEGORIES = 6_769
TARGET_SECONDS = 300.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=FULL_USERS)
    parser.add_argument("--ads", type=int, default=FULL_ADS)
    parser.add_argument("--categories", type=int, default=FULL_CATEGORIES)
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--strategies", default="uniform,popular")
    parser.add_argument(
        "--partitions",
        type=int,
        default=10,
        help="user factor partitions (ALS's default numUserBlocks is 10)",
    )
    parser.add_argument("--master", default="local[2]")
    parser.add_argument(
        "--driver-sample",
        type=int,
        default=100_000,
        help="users for the driver-only comparison (0: skip)",
    )
    parser.add_argument(
        "--course-users", type=int, default=20, help="users timed the course's way (0: skip)"
    )
    parser.add_argument(
        "--parquet",
        default="",
        help="also save the lists as parquet here (what offline ranking reads)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per strategy; the summary quotes the median"
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    from adrec.core.redis_conn import RedisSettings, connect
    from adrec.core.redis_server import private_redis
    from jobs.recall import RecallConfig, build_catalog
    from jobs.spark import build_session

    rng = np.random.default_rng(args.seed)
    print(
        f"recall benchmark: {args.users:,} users, {args.ads:,} ads, {args.categories:,} "
        f"categories, rank {args.rank}; machine: {os.cpu_count()} cores"
    )
    print("factors are RANDOM (timing only); category sizes and impressions are Zipf-like")
    started = time.perf_counter()
    world = _world(rng, args.users, args.ads, args.categories, args.rank)
    catalog = build_catalog(
        world["ad_ids"],
        world["ad_cates"],
        world["impressions"],
        (world["cate_ids"], world["cate_factors"]),
        world["popular"],
    )
    print(
        f"catalog built in {time.perf_counter() - started:.1f} s; largest category "
        f"{int(catalog.sizes.max()):,} ads, median {int(np.median(catalog.sizes))}"
    )

    spark = build_session(
        args.master,
        "adrec-bench-recall",
        {"spark.driver.memory": "4g", "spark.ui.enabled": "false"},
    )
    factors = _factor_frame(spark, world["user_ids"], world["user_factors"], args.partitions)
    factors.count()

    results: list[dict[str, Any]] = []
    with private_redis(timeout=30) as server:
        settings = RedisSettings(url=server.url, socket_timeout_s=30.0)
        client = connect(settings)
        for strategy in args.strategies.split(","):
            config = RecallConfig(strategy=strategy, seed=args.seed)
            runs = []
            for number in range(1, args.repeat + 1):
                runs.append(
                    _spark_run(
                        client, settings, factors, catalog, config, version=f"v{number}", args=args
                    )
                )
                client.flushall()
            median = statistics.median(run["seconds"] for run in runs)
            results.append(
                {
                    **runs[0],
                    "seconds": median,
                    "users_per_s": args.users / median,
                    "all_seconds": [run["seconds"] for run in runs],
                }
            )
        if args.driver_sample:
            sample = min(args.driver_sample, args.users)
            _driver_run(client, catalog, RecallConfig(seed=args.seed), world, sample)
            client.flushall()
        course = None
        if args.course_users:
            course = _course_run(spark, client, rng, world, args.course_users)
        client.close()

    print("\nsummary")
    for row in results:
        verdict = "PASS" if row["seconds"] <= TARGET_SECONDS else "FAIL"
        times = ", ".join(f"{seconds:.0f}" for seconds in row["all_seconds"])
        print(
            f"  {row['strategy']:8s} {row['users_per_s']:>9,.0f} users/s  "
            f"{row['seconds']:6.1f} s median of [{times}] s  (target {TARGET_SECONDS:.0f} s: "
            f"{verdict})  {row['bytes_per_user']:,.0f} B/user in Redis"
        )
    if course:
        for row in results:
            ratio = course["seconds_per_user"] / (row["seconds"] / row["users"])
            print(f"  course / adrec ({row['strategy']}): {ratio:,.0f}x faster")
    return 0


def _world(
    rng: np.random.Generator, users: int, ads: int, categories: int, rank: int
) -> dict[str, np.ndarray]:
    """Random factors, Zipf-sized categories, Zipf-like impressions, top-500 fallback."""
    zipf = 1.0 / np.arange(1, categories + 1)
    sizes = 1 + np.floor(zipf / zipf.sum() * (ads - categories)).astype(np.int64)
    sizes[0] += ads - sizes.sum()
    cate_ids = np.sort(rng.choice(np.arange(1, 13_000), categories, replace=False))
    ad_cates = np.repeat(rng.permutation(cate_ids), sizes)
    ad_ids = rng.permutation(np.arange(1, ads + 1))
    impressions = np.minimum(rng.zipf(1.6, ads), 200_000) - 1
    return {
        "user_ids": np.arange(1, users + 1, dtype=np.int32),
        "user_factors": (rng.standard_normal((users, rank)) / np.sqrt(rank)).astype(np.float32),
        "cate_ids": cate_ids,
        "cate_factors": (rng.standard_normal((categories, rank)) / np.sqrt(rank)).astype(
            np.float32
        ),
        "ad_ids": ad_ids,
        "ad_cates": ad_cates,
        "impressions": impressions,
        "popular": ad_ids[np.argsort(-impressions, kind="stable")[:500]],
    }


def _factor_frame(
    spark: SparkSession, user_ids: np.ndarray, factors: np.ndarray, partitions: int
) -> DataFrame:
    rank = factors.shape[1]
    offsets = pa.array(np.arange(0, len(user_ids) * rank + 1, rank, dtype=np.int32))
    table = pa.table(
        {
            "user_id": pa.array(user_ids),
            "als_factors": pa.ListArray.from_arrays(offsets, pa.array(factors.ravel())),
        }
    )
    return spark.createDataFrame(table).repartition(partitions).cache()


def _used_memory(client: RedisClient) -> int:
    return int(client.info("memory")["used_memory"])


def _spark_run(
    client: RedisClient,
    settings: RedisSettings,
    factors: DataFrame,
    catalog: RecallCatalog,
    config: RecallConfig,
    *,
    version: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    from jobs.recall import publish_recall_lists

    users = args.users
    before = _used_memory(client)
    started = time.perf_counter()
    stats = publish_recall_lists(
        factors, catalog, config, settings, version, output_path=args.parquet or None
    )
    seconds = time.perf_counter() - started
    after = _used_memory(client)
    keys = client.dbsize()
    per_user = (after - before) / max(keys, 1)
    print(
        f"\n[{config.strategy}] Spark executors ({args.master}, {args.partitions} partitions)"
        f"{' + parquet' if args.parquet else ''}: {users:,} users in {seconds:.1f} s = "
        f"{users / seconds:,.0f} users/s, {seconds / users * 1e6:.0f} us/user"
    )
    print(
        f"  lists: {stats.full_lists:,} of exactly {config.list_length}, "
        f"{stats.filled_users:,} filled from the fallback; Redis keys {keys:,}"
    )
    print(
        f"  Redis used_memory {before / 2**20:,.0f} -> {after / 2**20:,.0f} MiB: recall "
        f"family {(after - before) / 2**30:.2f} GiB, {per_user:,.0f} B/user "
        f"({per_user / config.list_length:.2f} B per ad id)"
    )
    return {
        "strategy": config.strategy,
        "users": users,
        "seconds": seconds,
        "users_per_s": users / seconds,
        "bytes_per_user": per_user,
    }


def _driver_run(
    client: RedisClient,
    catalog: RecallCatalog,
    config: RecallConfig,
    world: dict[str, np.ndarray],
    sample: int,
) -> None:
    """The same chunk function and writer in the driver process alone."""
    from threadpoolctl import threadpool_limits

    from adrec.core.store import VersionWriter
    from jobs.recall import recall_chunk

    writer = VersionWriter(client, "v99")
    compute = write = 0.0
    with threadpool_limits(limits=1, user_api="blas"):
        for first in range(0, sample, config.chunk_users):
            block = slice(first, min(first + config.chunk_users, sample))
            t0 = time.perf_counter()
            chunk = recall_chunk(
                catalog, config, world["user_ids"][block], world["user_factors"][block]
            )
            t1 = time.perf_counter()
            writer.put_recall_lists(chunk.user_ids, chunk.lists())
            compute, write = compute + t1 - t0, write + time.perf_counter() - t1
    total = compute + write
    print(
        f"\n[uniform] driver only, one process, {sample:,} users: {total:.1f} s = "
        f"{total / sample * 1e6:.0f} us/user (compute {compute / sample * 1e6:.0f}, "
        f"Redis write {write / sample * 1e6:.0f}); all users would take "
        f"{total / sample * FULL_USERS:.0f} s"
    )


def _course_run(
    spark: SparkSession,
    client: RedisClient,
    rng: np.random.Generator,
    world: dict[str, np.ndarray],
    count: int,
) -> dict[str, float]:
    """The seed notebook's loop, timed per user on a real ALSModel with every category."""
    import pandas as pd
    from pyspark.ml.recommendation import ALS

    cate_ids = world["cate_ids"]
    # Every category rated at least once, so the model has factors for all of them.
    raters = 2_000
    users = (
        np.concatenate([np.arange(len(cate_ids)) % raters, rng.integers(0, raters, 20 * raters)])
        + 1
    )
    cates = np.concatenate([cate_ids, rng.choice(cate_ids, 20 * raters)])
    ratings = spark.createDataFrame(
        pd.DataFrame(
            {
                "userId": users.astype(np.int32),
                "cateId": cates.astype(np.int32),
                "rating": rng.uniform(0.2, 44, len(users)).astype(np.float32),
            }
        )
    )
    model = ALS(
        userCol="userId",
        itemCol="cateId",
        ratingCol="rating",
        rank=10,
        maxIter=5,
        regParam=0.1,
        numUserBlocks=2,
        numItemBlocks=2,
    ).fit(ratings)
    pdf = pd.DataFrame({"adgroupId": world["ad_ids"], "cateId": world["ad_cates"]})
    timings: dict[str, list[float]] = {"transform+sort": [], "choice": [], "sadd": []}
    distinct = []
    for user in range(1, count + 1):
        t0 = time.perf_counter()
        cate_df = pd.DataFrame(np.array(list(set(pdf.cateId))).reshape(-1, 1), columns=["cateId"])
        cate_df.insert(0, "userId", np.array([user for _ in range(len(cate_df))]))
        ranked = (
            model.transform(spark.createDataFrame(cate_df))
            .sort("prediction", ascending=False)
            .na.drop()
        )
        top = ranked.head(20)
        t1 = time.perf_counter()
        chosen: set[int] = set()
        for row in top:
            need = 500 - len(chosen)
            chosen = chosen.union(
                np.random.choice(
                    pdf.where(pdf.cateId == row.cateId).adgroupId.dropna().astype(np.int64), need
                )
            )
            if len(chosen) >= 500:
                break
        t2 = time.perf_counter()
        client.sadd(f"course:{user}", *map(int, chosen))
        t3 = time.perf_counter()
        for name, seconds in zip(timings, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            timings[name].append(seconds)
        distinct.append(len(chosen))
    per_user = sum(statistics.median(v) for v in timings.values())
    parts = ", ".join(f"{k} {statistics.median(v) * 1e3:.1f} ms" for k, v in timings.items())
    print(f"\ncourse's way, {count} users (medians): {per_user * 1e3:.0f} ms/user ({parts})")
    print(
        f"  lists hold {statistics.mean(distinct):.0f} distinct ads on average (sampled "
        f"with replacement); all {FULL_USERS:,} users would take "
        f"{per_user * FULL_USERS / 3600:.0f} h"
    )
    return {"seconds_per_user": per_user}


if __name__ == "__main__":
    sys.exit(main())
