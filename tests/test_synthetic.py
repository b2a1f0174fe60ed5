"""The synthetic generator on the tiny preset: format, domains, planted truth, determinism, CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from adrec.cli import main
from adrec.core.dataset import BIDS_FILE, BTAGS, MANIFEST_FILE, PIDS, TABLES, TRUTH_FILE
from adrec.synthetic import blocks, generate
from adrec.synthetic.manifest import GENERATOR_VERSION
from adrec.synthetic.model import recent_behavior_counts
from adrec.synthetic.presets import PRESETS
from adrec.synthetic.truth import BEHAVIOR_START, SAMPLE_END, SAMPLE_START
from jobs.ingest import load_dataset

TINY = PRESETS["tiny"]
DATA_FILES = [table.csv_file for table in TABLES.values()]
ALL_FILES = [*DATA_FILES, BIDS_FILE, TRUTH_FILE, MANIFEST_FILE]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    generate("tiny", 7, out, progress=False)
    return out


def read(folder, name: str) -> pd.DataFrame:
    """A generated CSV with every field kept as the exact text written."""
    return pd.read_csv(folder / name, dtype=str, keep_default_na=False)


def test_headers_are_the_published_bytes(tiny):
    first_lines = {name: (tiny / name).read_bytes().split(b"\n", 1)[0] for name in DATA_FILES}
    assert first_lines == {
        "raw_sample.csv": b"user,time_stamp,adgroup_id,pid,nonclk,clk",
        "ad_feature.csv": b"adgroup_id,cate_id,campaign_id,customer,brand,price",
        "user_profile.csv": b"userid,cms_segid,cms_group_id,final_gender_code,age_level,"
        b"pvalue_level,shopping_level,occupation,new_user_class_level ",
        "behavior_log.csv": b"user,time_stamp,btag,cate,brand",
    }
    for name in DATA_FILES:
        content = (tiny / name).read_bytes()
        assert b"\r" not in content and b'"' not in content
        assert content.endswith(b"\n")


def test_bids_are_positive_lognormal_prices_for_most_ads(tiny):
    assert (tiny / BIDS_FILE).read_bytes().split(b"\n", 1)[0] == b"adgroup_id,bid"
    bids = read(tiny, BIDS_FILE)
    ads = read(tiny, "ad_feature.csv")
    assert bids.adgroup_id.is_unique and set(bids.adgroup_id) <= set(ads.adgroup_id)
    assert 0.9 < len(bids) / len(ads) < 1.0
    assert bids.adgroup_id.astype(int).is_monotonic_increasing
    assert bids.bid.str.fullmatch(r"\d+\.\d\d").all()
    values = bids.bid.astype(float)
    assert values.min() > 0
    assert 0.35 < values.median() < 0.7
    assert 0.4 < np.log(values).std() < 0.8


def test_manifest_counts_match_the_files(tiny):
    manifest = json.loads((tiny / MANIFEST_FILE).read_text())
    assert (manifest["preset"], manifest["seed"]) == ("tiny", 7)
    assert manifest["generator_version"] == GENERATOR_VERSION
    for name, info in manifest["files"].items():
        lines = (tiny / name).read_bytes().count(b"\n")
        assert info["rows"] == lines - 1, name
    assert manifest["files"]["raw_sample.csv"]["rows"] == TINY.samples
    assert manifest["files"]["behavior_log.csv"]["rows"] == TINY.behavior_rows
    assert "scaled down" in manifest["behavior_log_scale"]["note"]
    assert not list(tiny.glob(".*partial"))


def test_raw_sample_domains_and_shares(tiny):
    samples = read(tiny, "raw_sample.csv")
    assert samples.nunique()["user"] == TINY.users
    assert samples.nunique()["adgroup_id"] == TINY.ads
    assert set(samples.pid) == set(PIDS)
    assert (samples.pid == "430548_1007").mean() == pytest.approx(0.62, abs=0.02)
    assert set(samples.clk) == {"0", "1"}
    assert ((samples.clk.astype(int) + samples.nonclk.astype(int)) == 1).all()
    assert 0.04 <= samples.clk.astype(int).mean() <= 0.06
    time_stamp = samples.time_stamp.astype(np.int64)
    assert time_stamp.between(SAMPLE_START, SAMPLE_END - 1).all()
    china_days = (time_stamp + 8 * 3600) // 86_400
    assert china_days.nunique() == 8


def test_ad_feature_domains(tiny):
    ads = read(tiny, "ad_feature.csv")
    assert len(ads) == TINY.ads
    assert ads.adgroup_id.is_unique
    assert ads.cate_id.nunique() == TINY.ad_categories
    # Sparse ids, as in the real data: nothing may assume ids are 0..n-1.
    assert ads.cate_id.astype(int).min() >= 1
    assert ads.cate_id.astype(int).max() > TINY.ad_categories
    null_share = (ads.brand == "NULL").mean()
    assert 0.2 < null_share < 0.4
    assert ads.brand[ads.brand != "NULL"].str.fullmatch(r"[1-9][0-9]*").all()
    # Prices print like Python floats with at most two decimals: 170.0, 89.9, 32.99.
    assert ads.price.str.fullmatch(r"(0|[1-9][0-9]*)\.[0-9]{1,2}").all()
    assert (ads.price.map(lambda text: repr(float(text))) == ads.price).all()
    price = ads.price.astype(float)
    assert price.between(0.01, 1e8).all()
    assert ads.customer.astype(int).is_monotonic_increasing


def test_user_profile_domains_and_missing_rates(tiny):
    profile = read(tiny, "user_profile.csv")
    profile.columns = [name.strip() for name in profile.columns]
    assert len(profile) == TINY.profile_users
    domains = {
        "cms_segid": set(range(97)),
        "cms_group_id": set(range(13)),
        "final_gender_code": {1, 2},
        "age_level": set(range(7)),
        "pvalue_level": {1, 2, 3},
        "shopping_level": {1, 2, 3},
        "occupation": {0, 1},
        "new_user_class_level": {1, 2, 3, 4},
    }
    for column, allowed in domains.items():
        present = profile[column][profile[column] != ""]
        assert set(present.astype(int)) <= allowed, column
    missing = (profile == "").mean()
    assert missing["pvalue_level"] == pytest.approx(0.54, abs=0.04)
    assert missing["new_user_class_level"] == pytest.approx(0.32, abs=0.04)
    assert missing.drop(["pvalue_level", "new_user_class_level"]).eq(0).all()

    sample_users = set(read(tiny, "raw_sample.csv").user)
    without_profile = len(sample_users - set(profile.userid)) / len(sample_users)
    assert without_profile == pytest.approx(0.07, abs=0.01)


def test_behavior_log_domains_and_btag_mix(tiny):
    behavior = read(tiny, "behavior_log.csv")
    manifest = json.loads((tiny / MANIFEST_FILE).read_text())
    shares = behavior.btag.value_counts(normalize=True)
    assert set(shares.index) == set(BTAGS)
    assert shares["pv"] == pytest.approx(0.952, abs=0.01)
    for btag, share in (("cart", 0.022), ("fav", 0.013), ("buy", 0.013)):
        assert shares[btag] == pytest.approx(share, abs=0.005), btag
    time_stamp = behavior.time_stamp.astype(np.int64)
    bad = time_stamp <= 0
    assert bad.sum() == manifest["counts"]["behavior_rows_with_bad_timestamp"] > 0
    assert time_stamp[~bad].between(BEHAVIOR_START, SAMPLE_END - 1).all()
    ad_categories = set(read(tiny, "ad_feature.csv").cate_id)
    assert len(ad_categories & set(behavior.cate)) >= 0.9 * len(ad_categories)
    assert behavior.cate.nunique() > len(ad_categories)


def test_truth_side_file_is_aligned_and_the_oracle_beats_chance(tiny):
    samples = read(tiny, "raw_sample.csv")
    truth = read(tiny, TRUTH_FILE)
    assert list(truth.columns) == [
        "user",
        "time_stamp",
        "adgroup_id",
        "pid",
        "clk",
        "click_probability",
    ]
    assert truth.drop(columns="click_probability").equals(samples.drop(columns="nonclk"))
    assert truth.click_probability.str.fullmatch(r"[01]\.[0-9]{6}").all()
    probability = truth.click_probability.astype(float)
    assert 0.04 <= probability.mean() <= 0.06
    assert roc_auc_score(truth.clk.astype(int), probability) > 0.6


def test_planted_preferences_show_in_the_behavior_log(tiny):
    """Users click more on ads from the categories they browse most."""
    behavior = read(tiny, "behavior_log.csv")
    samples = read(tiny, "raw_sample.csv").merge(
        read(tiny, "ad_feature.csv")[["adgroup_id", "cate_id"]], on="adgroup_id"
    )
    browsed = behavior.groupby(["user", "cate"]).size().rename("rows").reset_index()
    joined = samples.merge(
        browsed, left_on=["user", "cate_id"], right_on=["user", "cate"], how="left"
    ).fillna({"rows": 0})
    assert roc_auc_score(joined.clk.astype(int), joined["rows"]) > 0.6


def test_same_seed_gives_identical_bytes_whatever_the_workers(tiny, tmp_path):
    generate("tiny", 7, tmp_path / "again", workers=1, progress=False)
    generate("tiny", 8, tmp_path / "other", progress=False)
    for name in ALL_FILES:
        assert (tmp_path / "again" / name).read_bytes() == (tiny / name).read_bytes(), name
    for name in DATA_FILES:
        assert (tmp_path / "other" / name).read_bytes() != (tiny / name).read_bytes(), name


def test_an_interrupted_run_leaves_no_manifest_and_no_partial_file(monkeypatch, tmp_path):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(blocks, "draw_block", fail)
    (tmp_path / MANIFEST_FILE).write_text("{}")  # left by an earlier complete run
    with pytest.raises(KeyboardInterrupt):
        generate("tiny", 7, tmp_path, progress=False)
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["ad_feature.csv", "bids.csv", "user_profile.csv"]


def test_synthetic_package_does_not_import_pyspark():
    code = (
        "import importlib, pkgutil, sys, adrec.synthetic as package\n"
        "names = [m.name for m in pkgutil.iter_modules(package.__path__, 'adrec.synthetic.')]\n"
        "for name in names: importlib.import_module(name)\n"
        "print(len(names) > 1, 'pyspark' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "True False"


def test_loaders_accept_generated_files(spark, tiny):
    manifest = json.loads((tiny / MANIFEST_FILE).read_text())
    results = load_dataset(spark, str(tiny))
    rejected = {name: result.rejected for name, result in results.items()}
    assert rejected == {
        "raw_sample": {},
        "ad_feature": {},
        "user_profile": {},
        "behavior_log": {"bad_timestamp": manifest["counts"]["behavior_rows_with_bad_timestamp"]},
    }
    assert {name: result.total_rows for name, result in results.items()} == {
        name: manifest["files"][f"{name}.csv"]["rows"] for name in TABLES
    }


def test_cli_generate_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "data"
    assert (
        main(["data", "generate", "--preset", "tiny", "--seed", "3", "--out", str(out), "--quiet"])
        == 0
    )
    assert "raw_sample.csv: 40,000 rows" in capsys.readouterr().out
    before = (out / "raw_sample.csv").read_bytes()

    assert main(["data", "generate", "--preset", "tiny", "--seed", "4", "--out", str(out)]) == 2
    assert re.search(r"--out .* is not empty; pass --force", capsys.readouterr().err)
    assert (out / "raw_sample.csv").read_bytes() == before

    assert (
        main(
            [
                "data",
                "generate",
                "--preset",
                "tiny",
                "--seed",
                "4",
                "--out",
                str(out),
                "--quiet",
                "--force",
            ]
        )
        == 0
    )
    assert (out / "raw_sample.csv").read_bytes() != before


def test_cli_generate_rejects_bad_arguments(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main(["data", "generate", "--preset", "tiny", "--seed", "1", "--out", str(afile)]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert (
        main(["data", "generate", "--preset", "tiny", "--seed", "-1", "--out", str(tmp_path / "x")])
        == 2
    )
    assert "--seed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "generate", "--preset", "huge", "--seed", "1", "--out", str(tmp_path)])


def test_cli_inspect_reports_counts_per_file_and_reason(spark, tiny, tmp_path, capsys):
    assert main(["data", "inspect", str(tiny)]) == 0
    out = capsys.readouterr().out
    assert f"raw_sample: {TINY.samples:,} rows, {TINY.samples:,} clean, 0 rejected" in out
    assert re.search(r"behavior_log: 100,000 rows, .* clean, \d+ rejected", out)
    assert "bad_timestamp:" in out

    assert main(["data", "inspect", str(tmp_path)]) == 1
    assert "raw_sample: error: raw_sample: no such file" in capsys.readouterr().err
    assert main(["data", "inspect", str(tmp_path / "absent")]) == 2


def test_the_real_preset_is_full_with_the_real_behaviour_log():
    from adrec.cli.data import PRESET_NAMES
    from adrec.synthetic.presets import REAL_BEHAVIOR_ROWS

    real, full = PRESETS["real"].as_dict(), PRESETS["full"].as_dict()
    assert real["behavior_rows"] == REAL_BEHAVIOR_ROWS == 723_268_134
    differing = {name for name in real if real[name] != full[name]}
    assert differing == {"name", "behavior_rows"}
    PRESETS["real"].validate()
    assert set(PRESET_NAMES) == set(PRESETS)


def test_recent_behavior_counts_take_the_window_before_each_time():
    """Rows at or after the impression's time and before its window are not counted."""
    start = BEHAVIOR_START + 10 * 86_400
    counts = recent_behavior_counts(
        users=np.array([0, 0, 1]),
        categories=np.array([3, 4, 3]),
        times=np.array([start, start, start]),
        behavior_users=np.array([0, 0, 0, 0, 0, 1]),
        behavior_categories=np.array([3, 3, 3, 3, 4, 3]),
        behavior_times=np.array(
            [start - 1, start - 100, start - 100, start, start - 86_401, start - 86_400]
        ),
        window_seconds=86_400,
    )
    assert counts.tolist() == [3, 0, 1]


def test_a_recent_burst_of_browsing_lifts_the_planted_click_probability(tiny):
    """Of a user's impressions in one category, those after a day of browsing it click more."""
    behavior = read(tiny, "behavior_log.csv")
    truth = read(tiny, "raw_sample_truth.csv").merge(
        read(tiny, "ad_feature.csv")[["adgroup_id", "cate_id"]], on="adgroup_id"
    )
    user_index = {user: i for i, user in enumerate(sorted(set(truth.user) | set(behavior.user)))}
    cate_index = {cate: i for i, cate in enumerate(sorted(set(truth.cate_id) | set(behavior.cate)))}
    recent = recent_behavior_counts(
        truth.user.map(user_index).to_numpy(),
        truth.cate_id.map(cate_index).to_numpy(),
        truth.time_stamp.astype(np.int64).to_numpy(),
        behavior.user.map(user_index).to_numpy(),
        behavior.cate.map(cate_index).to_numpy(),
        behavior.time_stamp.astype(np.int64).to_numpy(),
        86_400,
    )
    truth["recent"] = recent
    truth["probability"] = truth.click_probability.astype(float)
    pairs = truth.groupby(["user", "cate_id"])
    mixed = pairs.recent.transform(lambda r: r.min() == 0 and r.max() > 0).astype(bool)
    within = truth[mixed]
    assert len(within) > 50
    browsed = within[within.recent > 0].probability.mean()
    quiet = within[within.recent == 0].probability.mean()
    assert browsed > quiet * 1.2
