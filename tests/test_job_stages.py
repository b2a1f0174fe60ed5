"""The job's stage functions on a small hand-written data set, one stage or a few at a time.

Real local Spark and a real redis-server. The whole run on `tiny` is in
test_job_pipeline.py; the transforms inside each stage have their own test modules.
"""

from __future__ import annotations

import dataclasses
import shutil
from datetime import datetime

import numpy as np
import pytest

from adrec.core import keys, store
from adrec.core.catalog import Publication
from adrec.core.dataset import AD_FEATURE, BEHAVIOR_LOG, CHINA_TIME, PIDS, RAW_SAMPLE, USER_PROFILE
from adrec.core.features import COURSE
from adrec.core.metadata import VersionContent
from adrec.core.redis_conn import RedisSettings
from adrec.core.store import VersionWriter
from jobs.config import STAGES, JobConfig
from jobs.pipeline import (
    ActiveInput,
    JobInputError,
    Sink,
    als_stage,
    ctr_stage,
    features_stage,
    ingest_stage,
    offline_stage,
    popular_stage,
    publish_stage,
    ratings_stage,
    recall_stage,
)

TRAIN_TIME = int(datetime(2017, 5, 8, 12, tzinfo=CHINA_TIME).timestamp())
TEST_TIME = int(datetime(2017, 5, 13, 12, tzinfo=CHINA_TIME).timestamp())
CATEGORIES = (10, 20, 30, 40)
ADS_PER_CATEGORY = 8
USERS = range(1, 25)
PROFILED_USERS = range(1, 21)  # the last four users have factors but no profile


def category_of(ad: int) -> int:
    return CATEGORIES[(ad - 1) // ADS_PER_CATEGORY]


def liked(user: int) -> int:
    return CATEGORIES[user % len(CATEGORIES)]


def dataset_files() -> dict[str, list[str]]:
    """Users click and buy in the category they like, and browse a little elsewhere."""
    ads = range(1, len(CATEGORIES) * ADS_PER_CATEGORY + 1)
    samples, behavior = [], []
    for user in USERS:
        other = CATEGORIES[(user + 1) % len(CATEGORIES)]
        behavior += [f"{user},{TRAIN_TIME + i},pv,{liked(user)},1" for i in range(6)]
        behavior += [
            f"{user},{TRAIN_TIME},buy,{liked(user)},1",
            f"{user},{TRAIN_TIME},pv,{other},1",
        ]
        for n, ad in enumerate(ads):
            if (ad + user) % 3:
                continue
            click = int(category_of(ad) == liked(user) and n % 2 == 0)
            samples.append(f"{user},{TRAIN_TIME + n},{ad},{PIDS[n % 2]},{1 - click},{click}")
        for n, ad in enumerate(a for a in ads if category_of(a) == liked(user)):
            click = int(n == user % ADS_PER_CATEGORY)
            samples.append(f"{user},{TEST_TIME + n},{ad},{PIDS[0]},{1 - click},{click}")
    behavior.append("1,-5,pv,10,1")  # a bad timestamp, rejected
    return {
        RAW_SAMPLE.csv_file: [RAW_SAMPLE.header, *samples],
        AD_FEATURE.csv_file: [AD_FEATURE.header]
        + [
            f"{ad},{category_of(ad)},{ad},{ad % 5 + 1},{ad % 3 + 1 if ad % 7 else 'NULL'},"
            f"{10.0 + ad}"
            for ad in ads
        ],
        USER_PROFILE.csv_file: [USER_PROFILE.header]
        + [
            f"{user},0,{user % 12},{user % 2 + 1},{user % 6},{user % 3 + 1},3,0,{user % 4 + 1}"
            for user in PROFILED_USERS
        ],
        BEHAVIOR_LOG.csv_file: [BEHAVIOR_LOG.header, *behavior],
    }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("stages-data")
    for name, lines in dataset_files().items():
        (path / name).write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def config(data_dir):
    return JobConfig(
        data=str(data_dir),
        als_rank=4,
        als_max_iter=5,
        recall_size=12,
        recall_top_categories=2,
        offline_top_n=5,
        seed=3,
    )


@pytest.fixture(scope="module")
def tables(spark, config, tmp_path_factory):
    return ingest_stage(spark, config, str(tmp_path_factory.mktemp("staging")))


@pytest.fixture(scope="module")
def als(tables, config):
    return als_stage(ratings_stage(tables.behavior_log), config)


@pytest.fixture(scope="module")
def fallback(tables, config):
    return popular_stage(tables, config, None)


def sink_at(redis_url, client, version):
    return Sink(RedisSettings(url=redis_url), version, VersionWriter(client, version))


def by_user(lists):
    return {row.user_id: row.ad_ids for row in lists.collect()}


def test_ingest_stage_reports_every_file_and_splits_the_days(tables):
    files = dataset_files()
    expected_rows = {name.removesuffix(".csv"): len(lines) - 1 for name, lines in files.items()}
    assert {name: t["rows"] for name, t in tables.report.items()} == expected_rows
    assert tables.report["behavior_log"]["rejected"] == {"bad_timestamp": 1}
    assert tables.rows == sum(expected_rows.values()) - 1
    test_rows = len(USERS) * ADS_PER_CATEGORY
    assert tables.split.test.count() == test_rows
    assert tables.split.train.count() == expected_rows["raw_sample"] - test_rows


def test_ingest_stage_refuses_a_file_without_usable_rows(spark, data_dir, tmp_path):
    shutil.copytree(data_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / USER_PROFILE.csv_file).write_text(f"{USER_PROFILE.header}\nx,0,1,1,1,1,1,0,1\n")
    with pytest.raises(JobInputError, match="no usable rows in user_profile"):
        ingest_stage(spark, JobConfig(data=str(tmp_path)), str(tmp_path / "staging"))


def test_ingest_stage_stops_on_a_file_that_is_mostly_junk(spark, data_dir, tmp_path):
    shutil.copytree(data_dir, tmp_path, dirs_exist_ok=True)
    ads = (tmp_path / AD_FEATURE.csv_file).read_text().splitlines()
    junk = [f"junk line {n}" for n in range(len(ads))]
    (tmp_path / AD_FEATURE.csv_file).write_text("\n".join([*ads, *junk]) + "\n")
    config = JobConfig(data=str(tmp_path))
    with pytest.raises(JobInputError) as refused:
        ingest_stage(spark, config, str(tmp_path / "staging"))
    message = str(refused.value)
    assert f"{len(junk):,} of {len(ads) - 1 + len(junk):,} rows rejected" in message
    assert "ad_feature.csv" in message and "wrong_field_count" in message
    assert "ADREC_JOB_MAX_REJECTED_SHARE=0.01" in message and "nothing was published" in message
    # A looser setting lets the same files through.
    loose = dataclasses.replace(config, max_rejected_share=0.6)
    assert ingest_stage(spark, loose, str(tmp_path / "staging")).report["ad_feature"]["clean"]


def test_ingest_stage_stops_when_a_table_shrinks_against_the_active_version(
    spark, data_dir, tmp_path
):
    shutil.copytree(data_dir, tmp_path, dirs_exist_ok=True)
    profiles = (tmp_path / USER_PROFILE.csv_file).read_text().splitlines()
    kept = profiles[: 1 + (len(profiles) - 1) // 2]
    (tmp_path / USER_PROFILE.csv_file).write_text("\n".join(kept) + "\n")
    before = len(profiles) - 1
    active = ActiveInput("7", {"user_profile": before, "raw_sample": 1})
    with pytest.raises(JobInputError) as refused:
        ingest_stage(spark, JobConfig(data=str(tmp_path)), str(tmp_path / "staging"), active)
    message = str(refused.value)
    assert f"{len(kept) - 1:,} clean rows" in message
    assert f"the {before:,} active version 7" in message
    assert "ADREC_JOB_MAX_ROW_DROP=0.2" in message
    # Growing tables and a disabled check pass.
    allowed = JobConfig(data=str(tmp_path), max_row_drop=1.0)
    assert ingest_stage(spark, allowed, str(tmp_path / "staging"), active).rows


def test_recall_stage_computes_the_same_whether_it_publishes_or_not(
    tables, als, fallback, config, tmp_path, redis_url, redis_client
):
    sink = sink_at(redis_url, redis_client, "v3")
    published = recall_stage(tables, als, fallback, config, str(tmp_path / "a"), sink)
    dry = recall_stage(tables, als, fallback, config, str(tmp_path / "b"), None)

    assert published.report == dry.report
    assert published.rows == als.result.users == len(USERS)
    lists = by_user(dry.lists)
    assert by_user(published.lists) == lists
    for user, ads in lists.items():
        assert len(ads) == config.recall_size
        assert store.read_recall_list(redis_client, "v3", user).tolist() == ads


def test_recall_stage_hit_rates_do_not_depend_on_the_published_strategy(
    tables, als, fallback, config, tmp_path
):
    """The strategy left unpublished is built for day-8 clickers only, to the same rates."""
    rates = {
        strategy: recall_stage(
            tables,
            als,
            fallback,
            dataclasses.replace(config, recall_strategy=strategy),
            str(tmp_path / strategy),
            None,
        ).report["hit_rate"]
        for strategy in ("uniform", "popular")
    }
    assert rates["uniform"] == rates["popular"]
    assert set(rates["uniform"]) == {"uniform", "popular", "popularity_baseline"}
    assert rates["uniform"]["popular"]["clicked_pairs"] == len(USERS)


def test_ranking_stages_serve_the_configured_feature_set(
    tables, als, fallback, config, tmp_path, redis_url, redis_client
):
    version = "v4"
    sink = sink_at(redis_url, redis_client, version)
    course = dataclasses.replace(config, feature_set="course")
    recalled = recall_stage(tables, als, fallback, course, str(tmp_path), None)

    featured = features_stage(tables, als, sink)
    assert featured.report == {
        "users": len(USERS),
        "ads": len(CATEGORIES) * ADS_PER_CATEGORY,
        "categories_with_factors": len(CATEGORIES),
        # Hand-built tables carry no bids file: the version has no bids key.
        "ads_with_bid": None,
        "bids_of_unknown_ads": 0,
    }
    assert redis_client.get(keys.BIDS.key(version)) is None
    assert (
        store.read_ad_table(redis_client, version)["adgroup_id"].tolist()
        == featured.ad_table["adgroup_id"].tolist()
    )

    notes = []
    trained = ctr_stage(
        tables, featured, als, course, sink, str(tmp_path / "examples"), note=notes.append
    )
    assert trained.model.spec is COURSE
    assert trained.report["served_feature_set"] == "course"
    assert set(trained.report) == {
        "served_feature_set",
        "course",
        "full",
        "behaviour",
        "fm",
        "oracle",
    }
    assert trained.report["fm"]["feature_set"] == "behaviour" and not trained.report["fm"]["served"]
    assert trained.report["oracle"] is None  # no truth file: not synthetic data
    # Every training impression either trains the model or is held out to calibrate it.
    held_out = sum(fit["rows"] for fit in trained.metrics["course"]["calibration"]["pids"].values())
    assert 0 < held_out < trained.rows
    assert trained.rows + held_out == tables.split.train.count()
    assert [note.split(":")[0] for note in notes] == ["course", "full", "behaviour", "fm"]
    assert store.read_model(redis_client, version).spec is COURSE

    ranked = offline_stage(recalled, featured, als, trained, course, sink)
    assert ranked.lists == len(USERS)
    recall_lists = by_user(recalled.lists)
    for user in USERS:
        ids, _ = store.read_offline_list(redis_client, version, user)
        assert len(ids) == course.offline_top_n
        assert set(ids.tolist()) <= set(recall_lists[user])
    # The offline stage is the last to read the user features.
    assert not featured.users.is_cached


def test_publish_stage_commits_the_report_summary(redis_client):
    report = {
        "config_digest": "abc",
        "feature_spec_id": "full-x",
        "recall": {"users": 7},
        "features": {"users": 9, "ads": 4},
        "offline": {"lists": 6, "pid": PIDS[0]},
        "ctr": {
            "served_feature_set": "full",
            "full": {
                "auc": 0.75,
                "logloss": 0.2,
                "observed_ctr": 0.05,
                "mean_predicted": 0.06,
                "train_rows": 100,
            },
        },
    }
    stages = [{"name": name, "seconds": 1.0, "rows": None, "notes": {}} for name in STAGES[:-1]]
    with Publication(redis_client) as first:
        first.commit(VersionContent())
    with Publication(redis_client, keep_versions=0, prune_grace=0) as second:
        second.writer.put_popular(keys.POPULAR_ALL, np.array([3, 1], dtype=np.int32))
        published = publish_stage(second, report, stages)

    assert published.previous_version == first.version
    assert published.removed_versions == [first.version]
    assert published.memory[keys.POPULAR.name]["keys"] == 1
    assert store.active_version(redis_client) == second.version
    content = store.read_meta(redis_client, second.version).content
    assert (content.config_digest, content.feature_spec_id) == ("abc", "full-x")
    assert (
        content.counts.recall_lists,
        content.counts.offline_lists,
        content.counts.users,
        content.counts.ads,
    ) == (7, 6, 9, 4)
    assert content.model_metrics == {
        "auc": 0.75,
        "logloss": 0.2,
        "observed_ctr": 0.05,
        "mean_predicted": 0.06,
    }
    assert content.stages == STAGES[:-1]
    assert content.offline_pid == PIDS[0]
    assert content.report["memory"] == published.memory
    assert "previous_version" not in content.report
