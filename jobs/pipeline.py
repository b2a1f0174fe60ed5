"""The batch job: extract -> pure transforms -> load, one stage at a time.

``run_job`` wires the stage modules together:

    ingest    four files, explicit schemas, rejected rows counted per reason
    ratings   the course's (user, category) rating rule over the behaviour log
    als       Spark ML ALS, held-out RMSE
    popular   fallback lists of the training days, overall and per pid
    recall    500 distinct ads per user, vectorized; written from the executors
    features  user features, ad features with smoothed CTRs, category factors
    ctr       LR for the `course` and `full` feature sets, day-8 evaluation
    offline   every recall list scored by the served model, top N kept
    publish   metadata, then the atomic switch of the active version

Every write goes into a new version inside a :class:`Publication`; nothing becomes
visible before the final switch, and a failure anywhere leaves the previous version
serving. Without the ``publish`` stage nothing is written at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
from collections.abc import Iterator
from typing import Any

import redis
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F  # noqa: N812 - the conventional alias

from adrec.core import keys
from adrec.core.catalog import Publication, family_memory
from adrec.core.dataset import TRUTH_FILE
from adrec.core.features import COURSE, FULL, feature_spec
from adrec.core.redis_conn import RedisSettings, connect, redacted
from jobs import ctr, features, ingest, offline, popular, ratings, recall
from jobs.als import AlsConfig, train_als
from jobs.config import JobConfig
from jobs.progress import Progress
from jobs.report import render_report
from jobs.spark import build_session


class JobInputError(Exception):
    """The job cannot start or continue because of its inputs; nothing was published."""


@dataclasses.dataclass
class JobResult:
    version: str | None
    report: dict[str, Any]

    def report_json(self) -> str:
        return json.dumps(self.report, indent=2, sort_keys=True, default=str)

    def report_text(self) -> str:
        return render_report(self.report)


def run_job(
    config: JobConfig,
    redis_settings: RedisSettings,
    spark: SparkSession | None = None,
    progress: Progress | None = None,
) -> JobResult:
    client = connect(redis_settings)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        raise JobInputError(f"cannot reach Redis at {redacted(redis_settings.url)}: {exc}") \
            from None
    run = _JobRun(config, spark or build_session(config.master or None,
                                                    local_memory=config.local_memory),
                  progress or Progress(config.stages))
    with run.work_dir():
        run.ingest()
        publishing = "publish" in config.stages
        with Publication(client, keep_versions=config.keep_versions) if publishing \
                else contextlib.nullcontext() as publication:
            if publication:
                run.publication = publication
                run.sink = (redis_settings, publication.version)
            run.transform_and_load()
            if publication:
                run.publish(client)
    report = run.report
    report["version"] = run.sink[1] if run.sink else None
    report["stages"] = run.progress.as_report()
    report["elapsed_seconds"] = round(run.progress.elapsed, 1)
    return JobResult(report["version"], report)


class _JobRun:
    """One run's state: the stages hand each other frames through it."""

    def __init__(self, config: JobConfig, spark: SparkSession, progress: Progress):
        self.config = config
        self.spark = spark
        self.progress = progress
        self.report: dict[str, Any] = {
            "config": dataclasses.asdict(config),
            "config_digest": config.digest(),
            "feature_spec_id": feature_spec(config.feature_set).spec_id,
            "data": config.data,
        }
        self.publication: Publication | None = None
        # (redis settings, version) for the executors' writes; None: write nothing.
        self.sink: tuple[RedisSettings, str] | None = None
        self.scratch = ""

    def wants(self, stage: str) -> bool:
        return stage in self.config.stages

    @contextlib.contextmanager
    def work_dir(self) -> Iterator[None]:
        if self.config.work_dir:
            self.scratch = self.config.work_dir.rstrip("/")
            yield
            return
        master = self.spark.sparkContext.master
        if not master.startswith("local"):
            raise JobInputError(
                "ADREC_JOB_WORK_DIR (--job-work-dir) must name shared storage on a cluster "
                f"(master {master})"
            )
        with tempfile.TemporaryDirectory(prefix="adrec-job-") as tmp:
            self.scratch = tmp
            yield

    def ingest(self) -> None:
        with self.progress.stage("ingest") as stage:
            try:
                tables = ingest.load_dataset(self.spark, self.config.data,
                                             data_format=self.config.input_format)
            except ingest.IngestError as exc:
                raise JobInputError(str(exc)) from None
            self.report["ingest"] = {
                name: {"rows": t.total_rows, "clean": t.clean_rows, "rejected": t.rejected,
                       "source": t.source}
                for name, t in tables.items()
            }
            for name, table in tables.items():
                if table.clean_rows == 0:
                    raise JobInputError(f"{table.source}: no usable rows in {name}")
            stage.rows = sum(t.clean_rows for t in tables.values())
        self.tables = {name: t.data for name, t in tables.items()}
        self.samples = self.tables["raw_sample"]
        self.train, self.test = ingest.split_by_day(self.samples)

    def transform_and_load(self) -> None:
        for name in ("ratings", "als", "popular", "recall", "features", "ctr", "offline"):
            if not self.wants(name):
                return
            with self.progress.stage(name) as stage:
                stage.rows = getattr(self, f"_{name}")()

    def _ratings(self) -> int:
        self.ratings = ratings.ratings_from_behavior(self.tables["behavior_log"]).persist(
            StorageLevel.MEMORY_AND_DISK
        )
        return self.ratings.count()

    def _als(self) -> int:
        config = self.config
        self.als = train_als(self.ratings, AlsConfig(
            rank=config.als_rank, max_iter=config.als_max_iter, reg_param=config.als_reg_param,
            seed=config.seed,
        ))
        self.ratings.unpersist()
        self.report["als"] = self.als.metrics()
        return len(self.als.user_ids)

    def _popular(self) -> int:
        self.popular_ids = popular.collect_popular(
            popular.popular_lists(self.train, length=self.config.recall_size)
        )
        if self.sink:
            popular.write_popular(self.popular_ids, *self.sink)
        self.report["popular"] = {scope: len(ids) for scope, ids in self.popular_ids.items()}
        return sum(self.report["popular"].values())

    def _recall_config(self, strategy: str) -> recall.RecallConfig:
        return recall.RecallConfig(
            list_length=self.config.recall_size,
            top_categories=self.config.recall_top_categories,
            strategy=strategy, seed=self.config.seed,
        )

    def _recall(self) -> int:
        catalog = recall.collect_catalog(
            self.tables["ad_feature"], popular.ad_impressions(self.train), self.als.cate_factors,
            self.popular_ids[keys.POPULAR_ALL],
        )
        published = self._recall_config(self.config.recall_strategy)
        output = f"{self.scratch}/recall_lists.parquet"
        user_factors = self.als.user_factor_frame()
        if self.sink:
            stats = recall.publish_recall_lists(user_factors, catalog, published, *self.sink,
                                                output_path=output)
            self.recall_lists = self.spark.read.parquet(output)
        else:
            recall.build_recall_lists(user_factors, catalog, published) \
                .write.mode("overwrite").parquet(output)
            self.recall_lists = self.spark.read.parquet(output)
            stats = recall.recall_stats(self.recall_lists, self.config.recall_size)
        self.report["recall"] = {
            "strategy": published.strategy, **stats.as_dict(),
            "hit_rate": self._hit_rates(user_factors, catalog),
        }
        return stats.users

    def _hit_rates(self, user_factors: DataFrame, catalog: recall.RecallCatalog) -> dict:
        """Hit rate of both strategies and of the popularity baseline on day-8 clicks.

        Only users who clicked on day 8 matter, so the strategy that is not published
        is built for those users alone.
        """
        fallback = self.popular_ids[keys.POPULAR_ALL]
        rates = {self.config.recall_strategy: recall.recall_hit_rate(
            self.test, self.recall_lists, fallback).as_dict()}
        clickers = self.test.where(F.col("clk") == 1) \
            .select(F.col("user_id").cast("int")).distinct()
        for strategy in recall.STRATEGIES:
            if strategy not in rates:
                lists = recall.build_recall_lists(
                    user_factors.join(clickers, "user_id"), catalog,
                    self._recall_config(strategy),
                )
                rates[strategy] = recall.recall_hit_rate(self.test, lists, fallback).as_dict()
        rates["popularity_baseline"] = recall.recall_hit_rate(
            self.test, None, fallback).as_dict()
        return rates

    def _features(self) -> int:
        self.smoothing = features.Smoothing()
        self.users = features.user_features(
            self.tables["user_profile"], self.als.user_factors
        ).persist(StorageLevel.MEMORY_AND_DISK)
        self.ads = features.ad_features(self.tables["ad_feature"], self.samples, self.smoothing)
        self.ad_table = features.ad_table(self.ads)
        users = self.users.count()
        if self.sink:
            users = features.write_user_features(self.users, *self.sink)
            features.write_ad_table(self.ad_table, *self.sink)
            features.write_cate_factors(self.als.cate_factors, *self.sink)
        self.report["features"] = {"users": users, "ads": len(self.ad_table["adgroup_id"]),
                                   "categories_with_factors": len(self.als.cate_ids)}
        return users

    def _ctr(self) -> int:
        examples = features.training_examples(
            self.samples, self.users, self.ads, self.als.cate_factors, self.smoothing
        ).persist(StorageLevel.MEMORY_AND_DISK)
        served = feature_spec(self.config.feature_set)
        report = self.report["ctr"] = {"served_feature_set": served.name}
        for spec in (COURSE, FULL):
            model, metrics = ctr.train_ctr_model(
                examples, spec, ctr.CtrConfig(reg_param=self.config.ctr_reg_param)
            )
            report[spec.name] = metrics
            if spec is served:
                self.model = model
            self.progress.note(f"{spec.name}: AUC {metrics['auc']}, logloss {metrics['logloss']}")
        report["oracle"] = self._oracle()
        examples.unpersist()
        if self.publication:
            self.publication.writer.put_model(self.model)
        return report[served.name]["train_rows"]

    def _oracle(self) -> dict | None:
        """Oracle metrics when the data is synthetic (the generator's truth file exists)."""
        path = f"{self.config.data.rstrip('/')}/{TRUTH_FILE}"
        context = self.spark.sparkContext
        jvm_path = context._jvm.org.apache.hadoop.fs.Path(path)
        if not jvm_path.getFileSystem(context._jsc.hadoopConfiguration()).exists(jvm_path):
            return None
        return ctr.oracle_metrics(self.spark, self.config.data)

    def _offline(self) -> int:
        lists = offline.offline_top_n(
            self.recall_lists, self.users, self.ad_table, self.als.cate_factors, self.model,
            top_n=self.config.offline_top_n,
        )
        written = offline.write_offline_lists(lists, *self.sink) if self.sink else lists.count()
        self.report["offline"] = {"lists": written, "pid": offline.OFFLINE_PID,
                                  "top_n": self.config.offline_top_n}
        self.users.unpersist()
        return written

    def publish(self, client) -> None:
        with self.progress.stage("publish") as stage:
            self.report["stages"] = self.progress.as_report()
            self.report["memory"] = family_memory(client, self.publication.version)
            meta = {**_meta_summary(self.report), "report": self.report}
            self.report["previous_version"] = self.publication.commit(meta)
            self.report["removed_versions"] = self.publication.removed_versions
            stage.notes["version"] = self.publication.version


def _meta_summary(report: dict) -> dict:
    """The metadata fields readers look at without parsing the whole report."""
    served = report.get("ctr", {}).get("served_feature_set")
    return {
        "config_digest": report["config_digest"],
        "feature_spec_id": report["feature_spec_id"],
        "counts": {
            "recall_lists": report.get("recall", {}).get("users", 0),
            "offline_lists": report.get("offline", {}).get("lists", 0),
            "users": report.get("features", {}).get("users", 0),
            "ads": report.get("features", {}).get("ads", 0),
        },
        "model_metrics": {k: report["ctr"][served].get(k)
                          for k in ("auc", "logloss", "observed_ctr", "mean_predicted")}
        if served else {},
        "stages": [s["name"] for s in report.get("stages", [])],
    }
