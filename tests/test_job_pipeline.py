"""The whole batch job on `tiny`: spark-submit end to end, the report, and bad input.

The successful run is the session fixture ``published_tiny`` (the documented
spark-submit command, real local Spark, a real redis-server); bad-input runs call
``run_job`` in-process and stop at ingest or at the Redis check.
"""

import shutil

import numpy as np
import pytest
import redis

from adrec.cli import main
from adrec.core import keys, store
from adrec.core.catalog import Publication
from adrec.core.dataset import PIDS
from adrec.core.features import FULL
from adrec.core.metadata import VersionContent
from adrec.core.redis_conn import RedisSettings
from adrec.core.redis_server import free_port
from adrec.core.settings import SettingsError, load
from jobs import plots
from jobs.config import STAGES, JobConfig
from jobs.offline import OFFLINE_PID
from jobs.pipeline import JobInputError, run_job
from jobs.report import ctr_models


@pytest.fixture
def published_client(published_tiny):
    client = redis.Redis.from_url(published_tiny.redis.url)
    yield client
    client.close()


def test_spark_submit_publishes_a_complete_active_version(published_tiny, published_client):
    version = published_tiny.version
    assert store.active_version(published_client) == version
    content = store.read_meta(published_client, version).content
    assert content.feature_spec_id == FULL.spec_id
    assert content.counts.recall_lists > 1000
    assert content.report["config_digest"] == content.config_digest
    assert content.offline_pid == OFFLINE_PID and content.stages == STAGES[:-1]
    assert 0.5 < content.model_metrics["auc"] <= 1.0
    assert [s["name"] for s in published_tiny.report["stages"]] == list(STAGES)
    for family in (keys.ADS, keys.CATE_FACTORS, keys.MODEL):
        assert published_client.exists(family.key(version))
    assert published_client.exists(keys.POPULAR.key(version, keys.POPULAR_ALL))
    assert published_client.smembers(keys.PENDING_VERSIONS) == set()


def test_recall_lists_are_distinct_and_known_ads(published_tiny, published_client):
    version = published_tiny.version
    ad_ids = set(store.read_ad_table(published_client, version)["adgroup_id"].tolist())
    lengths = []
    for key in list(published_client.scan_iter(match=f"adrec:{version}:recall:*", count=500))[:200]:
        ids = store.read_recall_list(published_client, version, int(key.rsplit(b":", 1)[1]))
        assert len(set(ids.tolist())) == len(ids)
        assert set(ids.tolist()) <= ad_ids
        lengths.append(len(ids))
    assert max(lengths) == min(published_tiny.report["config"]["recall_size"], len(ad_ids))


def test_report_has_every_quality_figure(published_tiny):
    report = published_tiny.report
    assert report["als"]["als_holdout_rmse"] > 0
    hit_rate = report["recall"]["hit_rate"]
    assert set(hit_rate) == {"uniform", "popular", "popularity_baseline"}
    assert all(0 <= r["rate"] <= 1 for r in hit_rate.values())
    # The planted tastes are there to be found: personal recall beats the popular list.
    best = max(hit_rate["popular"]["rate"], hit_rate["uniform"]["rate"])
    assert best > 1.15 * hit_rate["popularity_baseline"]["rate"]
    for name in ("course", "full", "oracle"):
        metrics = report["ctr"][name]
        assert 0.5 < metrics["auc"] < 1, name
        assert metrics["logloss"] > 0
    assert report["ctr"]["full"]["auc"] > report["ctr"]["course"]["auc"]
    # The factorization machine is compared on the behaviour set, never served.
    fm_metrics, behaviour = report["ctr"]["fm"], report["ctr"]["behaviour"]
    assert fm_metrics["model"] == "fm" and fm_metrics["feature_set"] == "behaviour"
    assert 0.5 < fm_metrics["auc"] < 1 and fm_metrics["served"] is False
    assert fm_metrics["wins"] == (fm_metrics["auc"] >= behaviour["auc"] + 0.005)
    assert report["ctr"]["served_feature_set"] == "full"
    assert report["memory"]["recall"]["keys"] == report["recall"]["users"]
    assert report["offline"]["lists"] > 0
    calibration = report["ctr"]["full"]["calibration"]
    assert {pid for pid, fit in calibration["pids"].items() if fit["calibrated"]} == set(PIDS)
    for side in ("before", "after"):
        assert 0 <= calibration[side]["calibration_error"] < 0.1, side
    # Fitted on impressions the model never saw, so it must not make day 8 much worse.
    assert calibration["after"]["logloss"] < calibration["before"]["logloss"] * 1.01
    assert 0.9 * report["features"]["ads"] < report["features"]["ads_with_bid"]
    assert report["features"]["ads_with_bid"] < report["features"]["ads"]


def test_the_report_json_has_its_pictures_beside_it(published_tiny):
    folder = published_tiny.report_path.parent
    for name in (plots.ROC_FILE, plots.RELIABILITY_FILE):
        picture = (folder / name).read_bytes()
        assert picture.startswith(b"\x89PNG\r\n\x1a\n"), name
    page = (folder / plots.HTML_FILE).read_text()
    ctr = published_tiny.report["ctr"]
    # Every model of the report has its row on the page, the served one marked.
    for name, _ in ctr_models(ctr):
        assert f">{name}" in page, name
    assert f"{ctr['served_feature_set']} (served)" in page


def test_the_version_carries_the_bids_file_and_the_calibration(published_tiny, published_client):
    version = published_tiny.version
    ids, bids = keys.BIDS.decode(published_client.get(keys.BIDS.key(version)))
    written = (published_tiny.data_dir / "bids.csv").read_text().splitlines()[1:]
    expected = dict(line.split(",") for line in written)
    assert len(ids) == published_tiny.report["features"]["ads_with_bid"] == len(expected)
    for ad_id, bid in zip(ids.tolist()[:200], bids.tolist()[:200], strict=True):
        assert bid == pytest.approx(float(expected[str(ad_id)]), rel=1e-6)
    model = store.read_model(published_client, version)
    fitted = published_tiny.report["ctr"]["full"]["calibration"]["pids"]
    for pid in PIDS:
        assert model.calibration.for_pid(pid).slope == fitted[pid]["slope"]
        assert model.calibration.for_pid(pid).offset == fitted[pid]["offset"]


def test_offline_lists_are_the_models_top_n(published_tiny, published_client):
    from test_job_ctr import model_top_n

    version = published_tiny.version
    assert store.read_model(published_client, version).spec is FULL
    top_n = published_tiny.report["config"]["offline_top_n"]
    pid = published_tiny.report["offline"]["pid"]
    found = list(published_client.scan_iter(match=f"adrec:{version}:offline:*", count=500))
    assert len(found) == published_tiny.report["offline"]["lists"]
    for key in found[:100]:
        user_id = int(key.rsplit(b":", 1)[1])
        ids, ctrs = store.read_offline_list(published_client, version, user_id)
        expected_ids, expected_ctrs = model_top_n(published_client, version, user_id, pid, top_n)
        assert ids.tolist() == expected_ids, user_id
        np.testing.assert_allclose(ctrs, expected_ctrs, rtol=1e-3)  # float16 storage


def snapshot(client):
    """Every adrec key with its serialized value, whatever its type."""
    return {k: client.dump(k) for k in client.keys(b"adrec:*")}


def job_config(data, **overrides):
    env = {"ADREC_JOB_DATA": str(data), **overrides}
    return load(JobConfig, env=env)


def redis_at(url):
    return load(RedisSettings, env={"REDIS_URL": url})


@pytest.fixture
def served_version(redis_client):
    """A previously published version that bad runs must leave untouched and active."""
    from adrec.core.catalog import Publication
    from adrec.core.metadata import VersionContent

    with Publication(redis_client) as pub:
        pub.writer.put_recall_lists([1], [np.array([5, 6])])
        pub.commit(VersionContent())
    return snapshot(redis_client)


@pytest.mark.parametrize("damage", ["missing_file", "wrong_header", "empty_file"])
def test_bad_input_fails_clearly_and_leaves_the_previous_version(
    spark, tiny_data, tmp_path, redis_client, redis_url, served_version, damage
):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    target = data / "ad_feature.csv"
    if damage == "missing_file":
        target.unlink()
        expected = "ad_feature"
    elif damage == "wrong_header":
        target.write_text("adgroup,cate,campaign,customer,brand,price\n1,2,3,4,5,6.0\n")
        expected = "header"
    else:
        target.write_text("")
        expected = "empty"
    with pytest.raises(JobInputError, match=expected):
        run_job(job_config(data), redis_at(redis_url), spark=spark)
    assert snapshot(redis_client) == served_version


def test_a_bad_bids_file_stops_the_run_naming_line_and_field(
    spark, tiny_data, tmp_path, redis_client, redis_url, served_version
):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    lines = (tiny_data / "bids.csv").read_text().splitlines()
    first_id = lines[1].split(",")[0]
    lines[5] = f"{first_id},-2"
    (data / "bids.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(JobInputError) as refused:
        run_job(job_config(data), redis_at(redis_url), spark=spark)
    message = str(refused.value)
    for part in ("bids.csv", "line 6", "field bid", "'-2'", "nothing was published"):
        assert part in message, message
    assert snapshot(redis_client) == served_version


@pytest.mark.parametrize("damage", ["profile_cut_in_half", "ads_mostly_junk"])
def test_a_damaged_file_stops_the_run_before_it_publishes(
    spark, tiny_data, tmp_path, redis_client, redis_url, damage
):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    profile_rows = len((tiny_data / "user_profile.csv").read_text().splitlines()) - 1
    with Publication(redis_client) as pub:
        pub.writer.put_recall_lists([1], [np.array([5, 6])])
        pub.commit(VersionContent(input_rows={"user_profile": profile_rows}))
    before = snapshot(redis_client)
    if damage == "profile_cut_in_half":
        lines = (tiny_data / "user_profile.csv").read_text().splitlines()
        (data / "user_profile.csv").write_text("\n".join(lines[: len(lines) // 2]) + "\n")
        expected = ["user_profile", "fewer than the", "ADREC_JOB_MAX_ROW_DROP"]
    else:
        lines = (tiny_data / "ad_feature.csv").read_text().splitlines()
        # 99% junk: far past the 1% allowed, and small enough to parse in seconds.
        junk = [f"{n},junk" for n in range(len(lines) * 99)]
        (data / "ad_feature.csv").write_text("\n".join([*lines, *junk]) + "\n")
        expected = ["ad_feature", "ad_feature.csv", "rows rejected", "ADREC_JOB_MAX_REJECTED_SHARE"]
    with pytest.raises(JobInputError) as refused:
        run_job(job_config(data), redis_at(redis_url), spark=spark)
    assert all(part in str(refused.value) for part in expected), str(refused.value)
    assert snapshot(redis_client) == before


def test_unreachable_redis_fails_before_any_work(tiny_data):
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(JobInputError, match="cannot reach Redis"):
        run_job(job_config(tiny_data), redis_at(url))


def test_a_second_job_is_refused_before_any_work(tiny_data, redis_client, redis_url, capsys):
    with Publication(redis_client) as running:
        code = main(["job", "run", "--data", str(tiny_data), "--redis-url", redis_url])
        assert code == 1
        error = capsys.readouterr().err.strip()
        assert error.startswith("adrec job: error: another run") and running.run_id in error
        assert "Traceback" not in error and len(error.splitlines()) == 1
    assert store.active_version(redis_client) is None


def test_stages_without_publish_write_nothing(
    spark, tiny_data, redis_client, redis_url, served_version
):
    config = job_config(tiny_data, ADREC_JOB_STAGES="ingest,ratings,als,popular")
    result = run_job(config, redis_at(redis_url), spark=spark)
    assert result.version is None
    assert [s["name"] for s in result.report["stages"]] == ["ingest", "ratings", "als", "popular"]
    assert snapshot(redis_client) == served_version


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"ADREC_JOB_LOCAL_MEMORY": "4gb"}, "ADREC_JOB_LOCAL_MEMORY"),
        ({"ADREC_JOB_STAGES": "ratings,ingest"}, "ADREC_JOB_STAGES"),
        ({"ADREC_JOB_ALS_RANK": "0"}, "ADREC_JOB_ALS_RANK"),
    ],
)
def test_bad_job_settings_are_named(env, problem):
    with pytest.raises(SettingsError, match=problem):
        load(JobConfig, env={"ADREC_JOB_DATA": "data", **env})


def test_job_settings_accept_a_local_memory_size():
    config = load(JobConfig, env={"ADREC_JOB_DATA": "data", "ADREC_JOB_LOCAL_MEMORY": "6g"})
    assert config.local_memory == "6g"
    assert config.digest() == load(JobConfig, env={"ADREC_JOB_DATA": "data"}).digest()
