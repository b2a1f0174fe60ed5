"""The batch job: extract -> pure transforms -> load, one stage at a time.

Each stage is a function of the outputs of the stages before it:

    ingest    four files, explicit schemas, rejected rows counted per reason
    ratings   the course's (user, category) rating rule over the behaviour log
    als       Spark ML ALS, held-out RMSE
    popular   fallback lists of the training days, overall and per pid
    recall    500 distinct ads per user, vectorized; written from the executors
    features  user features, ad features with smoothed CTRs, category factors
    ctr       LR for every feature set (`course`, `full`, `behaviour`), day-8 evaluation
    offline   every recall list scored by the served model, top N kept
    publish   metadata, then the atomic switch of the active version

A stage returns a small frozen output: the frames and arrays later stages read, its
row count for the progress lines (``rows``) and its section of the quality report
(``report``). Given a :class:`Sink` it also loads its part of the new version; given
none it writes nothing. ``run_job`` only wires the stages together.

Every write goes into a new version inside a :class:`Publication`; nothing becomes
visible before the final switch, and a failure anywhere leaves the previous version
serving. Without the ``publish`` stage nothing is written at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, Protocol, TypeVar

import numpy as np
import redis
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F  # noqa: N812 - the conventional alias

from adrec.core import keys, store
from adrec.core.catalog import Publication, PublishLockedError, family_memory, lock_holder
from adrec.core.dataset import TRUTH_FILE
from adrec.core.features import BEHAVIOUR, FEATURE_SETS, feature_spec
from adrec.core.metadata import VersionContent, VersionCounts
from adrec.core.model import CtrModel
from adrec.core.redis_conn import RedisSettings, connect, redacted
from adrec.core.store import VersionWriter
from jobs import (
    bids,
    ctr,
    evaluation,
    features,
    fm,
    ingest,
    input_checks,
    offline,
    popular,
    ratings,
    recall,
)
from jobs.als import AlsConfig, AlsResult, train_als
from jobs.config import JobConfig
from jobs.progress import Progress, spark_work
from jobs.report import FM_ENTRY, render_report
from jobs.spark import build_session, path_exists


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


@dataclasses.dataclass(frozen=True, eq=False)
class Sink:
    """The version a publishing run builds.

    Executors open their own connections from ``redis``; the driver writes through
    ``writer``, on the publication's connection.
    """

    redis: RedisSettings
    version: str
    writer: VersionWriter


# ------------------------------------------------------------------ stage outputs


@dataclasses.dataclass(frozen=True, eq=False)
class TrainTestSplit:
    train: DataFrame  # raw_sample rows of days 1-7: everything is fitted on these
    test: DataFrame  # raw_sample rows of day 8: everything is evaluated on these


@dataclasses.dataclass(frozen=True, eq=False)
class IngestedTables:
    raw_sample: DataFrame
    ad_feature: DataFrame
    user_profile: DataFrame
    behavior_log: DataFrame
    split: TrainTestSplit
    report: dict[str, dict[str, Any]]  # per file: rows, clean, rejected per reason, source
    bids: bids.Bids | None = None  # None without a bids file

    @property
    def rows(self) -> int:
        return sum(counts["clean"] for counts in self.report.values())


@dataclasses.dataclass(frozen=True, eq=False)
class Ratings:
    frame: DataFrame  # (user_id, cate_id, rating), cached until the ALS stage releases it
    rows: int


@dataclasses.dataclass(frozen=True, eq=False)
class AlsOutput:
    result: AlsResult

    @property
    def rows(self) -> int:
        return self.result.users

    @property
    def report(self) -> dict[str, Any]:
        return self.result.metrics()


@dataclasses.dataclass(frozen=True, eq=False)
class PopularOutput:
    lists: dict[str, np.ndarray]  # ordered ad ids per scope: "all" and each pid

    @property
    def fallback(self) -> np.ndarray:
        return self.lists[keys.POPULAR_ALL]

    @property
    def rows(self) -> int:
        return sum(self.report.values())

    @property
    def report(self) -> dict[str, int]:
        return {scope: len(ids) for scope, ids in self.lists.items()}


@dataclasses.dataclass(frozen=True, eq=False)
class RecallOutput:
    lists: DataFrame  # (user_id, ad_ids, personal) of the published strategy
    strategy: str
    stats: recall.RecallStats
    hit_rate: dict[str, dict[str, Any]]  # day-8 hit rate per strategy and of the baseline

    @property
    def rows(self) -> int:
        return self.stats.users

    @property
    def report(self) -> dict[str, Any]:
        return {"strategy": self.strategy, **self.stats.as_dict(), "hit_rate": self.hit_rate}


@dataclasses.dataclass(frozen=True, eq=False)
class FeaturesOutput:
    users: DataFrame  # cached until the offline stage releases it
    ads: DataFrame
    ad_table: dict[str, np.ndarray]
    smoothing: features.Smoothing
    users_written: int  # users with features: keys written when publishing
    categories_with_factors: int
    ads_with_bid: int | None = None  # None without a bids file
    bids_of_unknown_ads: int = 0  # bids of adgroups ad_feature lacks, left out

    @property
    def rows(self) -> int:
        return self.users_written

    @property
    def report(self) -> dict[str, int | None]:
        return {
            "users": self.users_written,
            "ads": len(self.ad_table["adgroup_id"]),
            "categories_with_factors": self.categories_with_factors,
            "ads_with_bid": self.ads_with_bid,
            "bids_of_unknown_ads": self.bids_of_unknown_ads,
        }


@dataclasses.dataclass(frozen=True, eq=False)
class CtrOutput:
    model: CtrModel  # of the served feature set
    metrics: dict[str, dict[str, Any]]  # day-8 metrics per feature set, the served one included
    oracle: dict[str, Any] | None  # of the generator's true probabilities, on synthetic data

    @property
    def rows(self) -> int:
        return int(self.metrics[self.model.spec.name]["train_rows"])

    @property
    def report(self) -> dict[str, Any]:
        return {"served_feature_set": self.model.spec.name, **self.metrics, "oracle": self.oracle}


@dataclasses.dataclass(frozen=True)
class OfflineOutput:
    lists: int
    top_n: int

    @property
    def rows(self) -> int:
        return self.lists

    @property
    def report(self) -> dict[str, Any]:
        return {"lists": self.lists, "pid": offline.OFFLINE_PID, "top_n": self.top_n}


@dataclasses.dataclass(frozen=True)
class PublishOutput:
    memory: dict[str, dict[str, int]]
    previous_version: str | None
    removed_versions: list[str]

    @property
    def report(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------ the run


def run_job(
    config: JobConfig,
    redis_settings: RedisSettings,
    spark: SparkSession | None = None,
    progress: Progress | None = None,
) -> JobResult:
    """Ingest, then the stages ``config.stages`` selects, then publish when it is selected."""
    client = _reachable(redis_settings)
    # Before Spark starts: a mistyped folder would otherwise cost a JVM start to report.
    problem = input_checks.local_input_problem(config.data, config.input_format)
    if problem is not None:
        raise JobInputError(problem)
    publishing = "publish" in config.stages
    holder = lock_holder(client) if publishing else None
    if holder:
        # Before the work, not after an ingest that can take most of an hour.
        raise PublishLockedError(
            f"another run ({holder}) is publishing to this Redis; wait for it to finish "
            "(adrec publish list shows its version once it has) and run again"
        )
    spark = spark or build_session(config.master or None, local_memory=config.local_memory)
    progress = progress or Progress(config.stages, work=spark_work(spark.sparkContext))
    report: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "config_digest": config.digest(),
        "feature_spec_id": feature_spec(config.feature_set).spec_id,
        "data": config.data,
    }
    version = None
    with _work_dir(config, spark) as scratch:
        active = active_input(client)
        tables = _timed(
            progress, "ingest", ingest_stage, spark, config, f"{scratch}/ingest", active
        )
        report["ingest"] = tables.report
        # Bad input fails above, before the publish lock is taken.
        with (
            Publication(
                client,
                keep_versions=config.keep_versions,
                prune_grace=config.prune_grace_seconds,
            )
            if publishing
            else contextlib.nullcontext() as publication
        ):
            sink = (
                Sink(redis_settings, publication.version, publication.writer)
                if publication
                else None
            )
            report.update(_transform_and_load(config, tables, scratch, sink, progress))
            if publication:
                with progress.stage("publish") as record:
                    published = publish_stage(publication, report, progress.as_report())
                    record.notes["version"] = publication.version
                report.update(published.report)
                version = publication.version
    report["version"] = version
    report["stages"] = progress.as_report()
    report["elapsed_seconds"] = round(progress.elapsed, 1)
    return JobResult(version, report)


def _transform_and_load(
    config: JobConfig,
    tables: IngestedTables,
    scratch: str,
    sink: Sink | None,
    progress: Progress,
) -> dict[str, Any]:
    """The selected stages from ratings to offline, in order; returns their report sections.

    ``config.stages`` is always the stage list up to some stage, so the run stops at the
    first stage left out: each stage reads the outputs of those before it.
    """
    sections: dict[str, Any] = {}
    if "ratings" not in config.stages:
        return sections
    rated = _timed(progress, "ratings", ratings_stage, tables.behavior_log)
    if "als" not in config.stages:
        return sections
    als = _timed(progress, "als", als_stage, rated, config)
    sections["als"] = als.report
    if "popular" not in config.stages:
        return sections
    fallback = _timed(progress, "popular", popular_stage, tables, config, sink)
    sections["popular"] = fallback.report
    if "recall" not in config.stages:
        return sections
    recalled = _timed(
        progress, "recall", recall_stage, tables, als, fallback, config, scratch, sink
    )
    sections["recall"] = recalled.report
    if "features" not in config.stages:
        return sections
    featured = _timed(progress, "features", features_stage, tables, als, sink)
    sections["features"] = featured.report
    if "ctr" not in config.stages:
        return sections
    trained = _timed(
        progress,
        "ctr",
        ctr_stage,
        tables,
        featured,
        als,
        config,
        sink,
        f"{scratch}/examples",
        note=progress.note,
    )
    sections["ctr"] = trained.report
    if "offline" not in config.stages:
        return sections
    ranked = _timed(
        progress, "offline", offline_stage, recalled, featured, als, trained, config, sink
    )
    sections["offline"] = ranked.report
    return sections


class _Counted(Protocol):
    @property
    def rows(self) -> int: ...


_Params = ParamSpec("_Params")
_Output = TypeVar("_Output", bound=_Counted)


def _timed(
    progress: Progress,
    name: str,
    stage: Callable[_Params, _Output],
    *args: _Params.args,
    **kwargs: _Params.kwargs,
) -> _Output:
    with progress.stage(name) as record:
        output = stage(*args, **kwargs)
        record.rows = output.rows
    return output


def _reachable(settings: RedisSettings) -> redis.Redis | redis.cluster.RedisCluster:
    client = connect(settings)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        raise JobInputError(f"cannot reach Redis at {redacted(settings.url)}: {exc}") from None
    return client


@contextlib.contextmanager
def _work_dir(config: JobConfig, spark: SparkSession) -> Iterator[str]:
    """Scratch folder for intermediate data, shared by the driver and every executor."""
    if config.work_dir:
        yield config.work_dir.rstrip("/")
        return
    master = spark.sparkContext.master or ""
    if not master.startswith("local"):
        raise JobInputError(
            "ADREC_JOB_WORK_DIR (--job-work-dir) must name shared storage on a cluster "
            f"(master {master})"
        )
    with tempfile.TemporaryDirectory(prefix="adrec-job-") as tmp:
        yield tmp


# ------------------------------------------------------------------ the stages


@dataclasses.dataclass(frozen=True)
class ActiveInput:
    """The clean input rows the active version was built from, per table."""

    version: str
    rows: dict[str, int]


def active_input(client: Any) -> ActiveInput | None:
    version = store.active_version(client)
    meta = store.read_meta(client, version) if version else None
    if version is None or meta is None or not meta.content.input_rows:
        return None
    return ActiveInput(version, dict(meta.content.input_rows))


def ingest_stage(
    spark: SparkSession, config: JobConfig, staging: str, active: ActiveInput | None = None
) -> IngestedTables:
    """The four tables, staged as Parquet under ``staging``; damaged input stops the run.

    ``active`` is what the active version was built from: a table that shrank by more
    than ``config.max_row_drop`` against it stops the run too.
    """
    try:
        loaded = ingest.load_dataset(
            spark, config.data, data_format=config.input_format, staging=staging
        )
    except ingest.IngestError as exc:
        raise JobInputError(str(exc)) from None
    for name, table in loaded.items():
        if table.clean_rows == 0:
            raise JobInputError(f"{table.source}: no usable rows in {name}")
    report = {
        name: {
            "rows": t.total_rows,
            "clean": t.clean_rows,
            "rejected": t.rejected,
            "source": t.source,
        }
        for name, t in loaded.items()
    }
    problems = input_checks.rejected_share_problems(report, config.max_rejected_share)
    if active is not None:
        problems += input_checks.row_drop_problems(
            report, active.rows, active.version, config.max_row_drop
        )
    if problems:
        raise JobInputError("; ".join(problems) + "; nothing was published")
    try:
        bid_table = bids.read_bids(spark, config.data)
    except bids.BidsError as exc:
        raise JobInputError(f"{exc}; nothing was published") from None
    samples = loaded["raw_sample"].data
    train, test = ingest.split_by_day(samples)
    return IngestedTables(
        raw_sample=samples,
        ad_feature=loaded["ad_feature"].data,
        user_profile=loaded["user_profile"].data,
        behavior_log=loaded["behavior_log"].data,
        split=TrainTestSplit(train, test),
        report=report,
        bids=bid_table,
    )


def ratings_stage(behavior_log: DataFrame) -> Ratings:
    frame = ratings.ratings_from_behavior(behavior_log).persist(StorageLevel.MEMORY_AND_DISK)
    return Ratings(frame, frame.count())


def als_stage(rated: Ratings, config: JobConfig) -> AlsOutput:
    result = train_als(
        rated.frame,
        AlsConfig(
            rank=config.als_rank,
            max_iter=config.als_max_iter,
            reg_param=config.als_reg_param,
            seed=config.seed,
        ),
    )
    rated.frame.unpersist()
    return AlsOutput(result)


def popular_stage(tables: IngestedTables, config: JobConfig, sink: Sink | None) -> PopularOutput:
    """The popular fallback lists, and each category's leading ads for real-time interest."""
    train = tables.split.train
    lists = popular.collect_popular(popular.popular_lists(train, length=config.recall_size))
    leaders = popular.collect_category_leaders(
        popular.category_leaders(
            tables.ad_feature, popular.ad_impressions(train), config.interest_ads_per_category
        )
    )
    if sink:
        popular.write_popular(lists, sink.redis, sink.version)
        popular.write_category_leaders(leaders, sink.redis, sink.version)
    return PopularOutput(lists)


def recall_stage(
    tables: IngestedTables,
    als: AlsOutput,
    fallback: PopularOutput,
    config: JobConfig,
    scratch: str,
    sink: Sink | None,
) -> RecallOutput:
    """Lists of the configured strategy, saved under ``scratch`` for the offline stage.

    Publishing writes each list from the executor that computes it, in the same pass.
    """
    catalog = recall.collect_catalog(
        tables.ad_feature,
        popular.ad_impressions(tables.split.train),
        als.result.cate_factors,
        fallback.fallback,
    )
    published = _recall_config(config, config.recall_strategy)
    output = f"{scratch}/recall_lists.parquet"
    user_factors = als.result.user_factor_frame()
    if sink:
        stats = recall.publish_recall_lists(
            user_factors, catalog, published, sink.redis, sink.version, output_path=output
        )
        lists = user_factors.sparkSession.read.parquet(output)
    else:
        recall.save_recall_lists(
            recall.build_recall_lists(user_factors, catalog, published), output
        )
        lists = user_factors.sparkSession.read.parquet(output)
        stats = recall.recall_stats(lists, config.recall_size)
    return RecallOutput(
        lists=lists,
        strategy=published.strategy,
        stats=stats,
        hit_rate=_hit_rates(
            tables.split.test, lists, user_factors, catalog, config, fallback.fallback
        ),
    )


def _recall_config(config: JobConfig, strategy: str) -> recall.RecallConfig:
    return recall.RecallConfig(
        list_length=config.recall_size,
        top_categories=config.recall_top_categories,
        strategy=strategy,
        seed=config.seed,
    )


def _hit_rates(
    test: DataFrame,
    lists: DataFrame,
    user_factors: DataFrame,
    catalog: recall.RecallCatalog,
    config: JobConfig,
    fallback: np.ndarray,
) -> dict[str, dict[str, Any]]:
    """Hit rate of both strategies and of the popularity baseline on day-8 clicks.

    Only users who clicked on day 8 matter, so the strategy that is not published
    is built for those users alone.
    """
    rates = {config.recall_strategy: recall.recall_hit_rate(test, lists, fallback).as_dict()}
    clickers = test.where(F.col("clk") == 1).select(F.col("user_id").cast("int")).distinct()
    for strategy in recall.STRATEGIES:
        if strategy not in rates:
            other = recall.build_recall_lists(
                user_factors.join(clickers, "user_id"),
                catalog,
                _recall_config(config, strategy),
            )
            rates[strategy] = recall.recall_hit_rate(test, other, fallback).as_dict()
    rates["popularity_baseline"] = recall.recall_hit_rate(test, None, fallback).as_dict()
    return rates


def features_stage(tables: IngestedTables, als: AlsOutput, sink: Sink | None) -> FeaturesOutput:
    smoothing = features.Smoothing()
    users = features.user_features(tables.user_profile, als.result.user_factor_frame()).persist(
        StorageLevel.MEMORY_AND_DISK
    )
    ads = features.ad_features(tables.ad_feature, tables.raw_sample, smoothing)
    ad_table = features.ad_table(ads)
    served_bids = tables.bids.of_ads(ad_table["adgroup_id"]) if tables.bids else None
    if sink:
        users_written = features.write_user_features(users, sink.redis, sink.version)
        features.write_ad_table(ad_table, sink.redis, sink.version)
        features.write_cate_factors(als.result.cate_factors, sink.redis, sink.version)
        if served_bids is not None:
            sink.writer.put_bids(served_bids.ad_ids, served_bids.bids)
    else:
        users_written = users.count()
    return FeaturesOutput(
        users=users,
        ads=ads,
        ad_table=ad_table,
        smoothing=smoothing,
        users_written=users_written,
        categories_with_factors=len(als.result.cate_ids),
        ads_with_bid=None if served_bids is None else len(served_bids.ad_ids),
        bids_of_unknown_ads=(
            len(tables.bids.ad_ids) - len(served_bids.ad_ids)
            if tables.bids and served_bids is not None
            else 0
        ),
    )


def ctr_stage(
    tables: IngestedTables,
    featured: FeaturesOutput,
    als: AlsOutput,
    config: JobConfig,
    sink: Sink | None,
    examples_dir: str,
    note: Callable[[str], None] = lambda _: None,
) -> CtrOutput:
    """Every feature set trained and evaluated for the report; the configured one is served.

    The models are fitted on at most ``config.ctr_train_rows`` training impressions. The
    examples are written once to ``examples_dir`` (Parquet) and read back: every training
    iteration then starts from files, not from the plan of joins and windows that built
    them, which each task would otherwise carry.
    """
    available = tables.split.train.count()
    sample = ctr.training_sample(available, config.ctr_train_rows or None, config.seed)
    examples = features.training_examples(
        tables.raw_sample,
        featured.users,
        featured.ads,
        als.result.cate_factors,
        featured.smoothing,
        train_sample=sample,
        behavior_log=tables.behavior_log,
    )
    examples.write.mode("overwrite").parquet(examples_dir)
    examples = examples.sparkSession.read.parquet(examples_dir).persist(
        StorageLevel.MEMORY_AND_DISK
    )
    served = feature_spec(config.feature_set)
    models, metrics = {}, {}
    for spec in FEATURE_SETS.values():
        models[spec.name], metrics[spec.name] = ctr.train_ctr_model(
            examples,
            spec,
            ctr.CtrConfig(reg_param=config.ctr_reg_param, seed=config.seed),
            sampled_from=available,
        )
        note(
            f"{spec.name}: AUC {metrics[spec.name]['auc']}, logloss {metrics[spec.name]['logloss']}"
        )
    if config.ctr_fm_train_rows:
        metrics[FM_ENTRY] = _fm_metrics(examples, metrics[BEHAVIOUR.name], config)
        note(f"fm: AUC {metrics[FM_ENTRY]['auc']}, logloss {metrics[FM_ENTRY]['logloss']}")
    oracle = _oracle(examples.sparkSession, config.data)
    examples.unpersist()
    model = models[served.name]
    if sink:
        sink.writer.put_model(model)
    return CtrOutput(model, metrics, oracle)


def _fm_metrics(
    examples: DataFrame, lr_metrics: dict[str, Any], config: JobConfig
) -> dict[str, Any]:
    """Spark's factorization machine on the behaviour set, for the report: fitted on a
    sample of the regressions' training rows, evaluated on the same day 8. Never served:
    the ranking service scores the regression; ``wins`` says whether the FM beat it by the
    margin that would make serving it worth its cost."""
    train = examples.where(F.col("split") == "train")
    available = train.count()
    sampled = examples.where(
        (F.col("split") != "train")
        | ctr.training_sample(available, config.ctr_fm_train_rows, config.seed + 1)
    )
    _, fm_metrics = fm.train_fm_model(
        sampled, BEHAVIOUR, fm.FmConfig(seed=config.seed), sampled_from=available
    )
    return {
        **fm_metrics,
        "wins": fm.fm_wins(fm_metrics, lr_metrics),
        "serving_margin": fm.MIN_AUC_GAIN,
        "served": False,
    }


def _oracle(spark: SparkSession, data: str) -> dict[str, Any] | None:
    """Oracle metrics when the data is synthetic (the generator's truth file exists)."""
    if not path_exists(spark, f"{data.rstrip('/')}/{TRUTH_FILE}"):
        return None
    return evaluation.oracle_metrics(spark, data)


def offline_stage(
    recalled: RecallOutput,
    featured: FeaturesOutput,
    als: AlsOutput,
    trained: CtrOutput,
    config: JobConfig,
    sink: Sink | None,
) -> OfflineOutput:
    lists = offline.offline_top_n(
        recalled.lists,
        featured.users,
        featured.ad_table,
        als.result.cate_factors,
        trained.model,
        top_n=config.offline_top_n,
    )
    written = (
        offline.write_offline_lists(lists, sink.redis, sink.version) if sink else lists.count()
    )
    featured.users.unpersist()
    return OfflineOutput(written, config.offline_top_n)


def publish_stage(
    publication: Publication, report: dict[str, Any], stages: list[dict[str, Any]]
) -> PublishOutput:
    """Commit ``publication`` with the report so far (``stages``: the ones already run)."""
    memory = family_memory(publication.client, publication.version)
    full_report = {**report, "stages": stages, "memory": memory}
    previous = publication.commit(version_content(full_report))
    return PublishOutput(memory, previous, publication.removed_versions)


def version_content(report: dict[str, Any]) -> VersionContent:
    """What the version's metadata says of it: the fields readers use, and the report."""
    served = report.get("ctr", {}).get("served_feature_set")
    return VersionContent(
        config_digest=report["config_digest"],
        feature_spec_id=report["feature_spec_id"],
        counts=VersionCounts(
            recall_lists=report.get("recall", {}).get("users", 0),
            offline_lists=report.get("offline", {}).get("lists", 0),
            users=report.get("features", {}).get("users", 0),
            ads=report.get("features", {}).get("ads", 0),
        ),
        model_metrics={
            k: report["ctr"][served].get(k)
            for k in ("auc", "logloss", "observed_ctr", "mean_predicted")
        }
        if served
        else {},
        stages=tuple(s["name"] for s in report.get("stages", [])),
        offline_pid=report.get("offline", {}).get("pid"),
        input_rows={name: counts["clean"] for name, counts in report.get("ingest", {}).items()},
        report=report,
    )
