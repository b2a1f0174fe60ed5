"""CTR models on a synthetic preset: `course` against `full` against the planted oracle.

Run: ``.venv/bin/python bench/bench_ctr.py --preset medium`` (generates the preset into
``--data-dir`` unless a generated copy is already there); run times per preset are in
docs/performance.md.

What it measures, with the wall time of every step:

1. the job's own stages up to the CTR models: ingest, ratings and ALS, user features,
   ad features with smoothed CTRs, training examples (days 1-7 / day 8);
2. for each feature set, Spark ML logistic regression on days 1-7 and the evaluation of
   the resulting model artifact on day 8: AUC, logloss, mean predicted against observed
   CTR and the 10-bin reliability table;
3. the oracle: the same metrics for the generator's true click probabilities on day 8,
   the best any model can do;
4. with ``--load``, the Redis loads into a private redis-server: every user's features
   (users/s, bytes per user) and the offline ranking stage on ``--offline-users`` of the
   preset's users with random 500-ad candidate lists (users/s, bytes per user).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from pyspark.sql import DataFrame, SparkSession

    from adrec.core.model import CtrModel
    from jobs.als import AlsResult

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

RECALL_LENGTH = 500


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--data-dir",
        default="",
        help="where the preset is (or is generated); default: a temporary dir",
    )
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--driver-memory", default="8g")
    parser.add_argument(
        "--folds",
        type=int,
        default=None,
        help="out-of-fold CTR folds for training rows (1: in-sample)",
    )
    parser.add_argument(
        "--strength",
        type=float,
        default=None,
        help="smoothing pseudo-impressions for ad, category and brand CTRs",
    )
    parser.add_argument("--reg-param", type=float, default=None)
    parser.add_argument("--load", action="store_true", help="also time the Redis loads")
    parser.add_argument("--offline-users", type=int, default=20_000)
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="adrec-bench-ctr-") as scratch:
        data_dir = Path(args.data_dir or scratch)
        results = run(args, data_dir)
    print(_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


def run(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    import dataclasses

    from pyspark import StorageLevel

    from adrec.core.dataset import MANIFEST_FILE
    from adrec.core.features import COURSE, FULL
    from adrec.synthetic import generate
    from jobs import ctr, evaluation, ingest, ratings
    from jobs import features as job_features
    from jobs.als import AlsConfig, train_als
    from jobs.spark import build_session

    timings: dict[str, float] = {}

    def clock(name: str) -> AbstractContextManager[None]:
        return _step(timings, name)

    manifest_path = data_dir / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if manifest.get("preset") != args.preset or manifest.get("seed") != args.seed:
        with clock("generate"):
            generate(args.preset, args.seed, data_dir, progress=False)

    spark = build_session(
        args.master,
        "adrec-bench-ctr",
        {
            "spark.driver.memory": args.driver_memory,
            "spark.ui.enabled": "false",
        },
    )
    with clock("ingest"):
        tables = ingest.load_dataset(spark, str(data_dir), staging=str(data_dir / "staging"))
        samples = (
            tables["raw_sample"]
            .data.select("user_id", "time_stamp", "adgroup_id", "pid", "clk", "event_day")
            .persist(StorageLevel.MEMORY_AND_DISK)
        )
        samples.count()
    with clock("ratings and ALS"):
        als = train_als(
            ratings.ratings_from_behavior(tables["behavior_log"].data),
            AlsConfig(holdout_fraction=0.0, blocks=4),
        )

    defaults = job_features.Smoothing()
    smoothing = job_features.Smoothing(
        ad_strength=args.strength or defaults.ad_strength,
        cate_strength=args.strength or defaults.cate_strength,
        brand_strength=args.strength or defaults.brand_strength,
        folds=args.folds or defaults.folds,
    )
    config = ctr.CtrConfig(reg_param=args.reg_param or ctr.CtrConfig().reg_param)
    with clock("user features"):
        users = job_features.user_features(tables["user_profile"].data, als.user_factor_frame())
        users = users.persist(StorageLevel.MEMORY_AND_DISK)
        user_count = users.count()
    with clock("ad features"):
        ads = job_features.ad_features(tables["ad_feature"].data, samples, smoothing).persist()
        ad_table = job_features.ad_table(ads)
    with clock("training examples"):
        examples = job_features.training_examples(
            samples, users, ads, als.cate_factors, smoothing
        ).persist(StorageLevel.MEMORY_AND_DISK)
        example_count = examples.count()

    models, metrics = {}, {}
    for spec in (COURSE, FULL):
        with clock(f"{spec.name} train and evaluate"):
            models[spec.name], metrics[spec.name] = ctr.train_ctr_model(examples, spec, config)
    with clock("oracle"):
        metrics["oracle"] = evaluation.oracle_metrics(spark, str(data_dir))

    loads = None
    if args.load:
        loads = _loads(
            spark, clock, users, ad_table, als, models["full"], args.offline_users, args.seed
        )
    return {
        "preset": args.preset,
        "seed": args.seed,
        "machine_cores": os.cpu_count(),
        "smoothing": dataclasses.asdict(smoothing),
        "lr": dataclasses.asdict(config),
        "rows": {
            "examples": example_count,
            "users": user_count,
            "ads": len(ad_table["adgroup_id"]),
        },
        "metrics": metrics,
        "full_weights": dict(
            zip(FULL.feature_names, models["full"].weights.round(4).tolist(), strict=True)
        ),
        "loads": loads,
        "seconds": {name: round(value, 1) for name, value in timings.items()},
    }


def _loads(
    spark: SparkSession,
    clock: Callable[[str], AbstractContextManager[None]],
    users: DataFrame,
    ad_table: dict[str, np.ndarray],
    als: AlsResult,
    model: CtrModel,
    offline_users: int,
    seed: int,
) -> dict[str, dict[str, float]]:
    import numpy as np
    import pyarrow as pa

    from adrec.core.redis_conn import RedisSettings, connect
    from adrec.core.redis_server import private_redis
    from jobs import features as job_features
    from jobs import offline

    rng = np.random.default_rng(seed)
    first_users = als.user_factor_frame().select("user_id").orderBy("user_id").limit(offline_users)
    user_ids = np.array([row.user_id for row in first_users.collect()], dtype=np.int32)
    ad_ids = ad_table["adgroup_id"]
    lists = np.stack([rng.choice(ad_ids, RECALL_LENGTH, replace=False) for _ in user_ids])
    offsets = pa.array(np.arange(0, lists.size + 1, RECALL_LENGTH, dtype=np.int32))
    recall_lists = spark.createDataFrame(
        pa.table(
            {
                "user_id": pa.array(user_ids.astype(np.int32)),
                "ad_ids": pa.ListArray.from_arrays(
                    offsets, pa.array(lists.ravel().astype(np.int32))
                ),
            }
        )
    )
    recall_lists.count()
    results: dict[str, dict[str, float]] = {}
    with private_redis() as server:
        settings = RedisSettings(url=server.url)
        client = connect(settings)
        timed_loads: tuple[tuple[str, Callable[[], int]], ...] = (
            ("user features", lambda: job_features.write_user_features(users, settings, "v1")),
            (
                "offline top-N",
                lambda: offline.write_offline_lists(
                    offline.offline_top_n(recall_lists, users, ad_table, als.cate_factors, model),
                    settings,
                    "v1",
                ),
            ),
        )
        for name, load in timed_loads:
            before = client.info("memory")["used_memory"]
            started = time.perf_counter()
            with clock(name):
                written = load()
            seconds = time.perf_counter() - started
            used = client.info("memory")["used_memory"] - before
            results[name] = {
                "keys": written,
                "keys_per_second": round(written / seconds, 1),
                "redis_bytes_per_key": round(used / max(written, 1), 1),
            }
        client.close()
    return results


@contextlib.contextmanager
def _step(timings: dict[str, float], name: str) -> Iterator[None]:
    print(f"... {name}", flush=True)
    started = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - started
    print(f"    {name}: {timings[name]:.1f} s", flush=True)


def _table(results: dict[str, Any]) -> str:
    lines = [
        f"preset {results['preset']} (seed {results['seed']}), {results['rows']['examples']:,} "
        f"examples, {results['machine_cores']} cores",
        f"{'model':<8} {'AUC':>7} {'logloss':>8} {'mean pred':>10} {'observed':>9} "
        f"{'calib err':>10} {'seconds':>8}",
    ]
    seconds = results["seconds"]
    for name, metrics in results["metrics"].items():
        took = seconds.get(f"{name} train and evaluate", seconds.get(name, 0.0))
        lines.append(
            f"{name:<8} {metrics['auc']:>7.4f} {metrics['logloss']:>8.4f} "
            f"{metrics['mean_predicted']:>10.4f} {metrics['observed_ctr']:>9.4f} "
            f"{metrics['calibration_error']:>10.4f} {took:>8.1f}"
        )
    full, course, oracle = (results["metrics"][k] for k in ("full", "course", "oracle"))
    lines.append(
        f"full - course AUC: {full['auc'] - course['auc']:+.4f}; "
        f"oracle - full AUC: {oracle['auc'] - full['auc']:+.4f}"
    )
    lines.append("reliability of full (deciles of prediction): mean predicted / observed")
    lines += [
        f"  {b['mean_predicted']:.4f} / {b['observed_ctr']:.4f}  ({b['rows']:,} rows)"
        for b in full["reliability"]
    ]
    lines.append("wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    for name, load in (results["loads"] or {}).items():
        lines.append(f"load {name}: {load}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
