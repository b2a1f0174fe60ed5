"""Version metadata: one typed document, pinned JSON, tolerant of new fields, strict on types."""

import json

import pytest

from adrec.core import keys
from adrec.core.codecs import CodecError
from adrec.core.metadata import VersionContent, VersionCounts, VersionMeta

META = VersionMeta(
    version="v7",
    run_id="3f2a",
    created_at="2026-12-01T10:00:00+00:00",
    memory_bytes=1234,
    content=VersionContent(
        config_digest="abc",
        feature_spec_id="full-v1-x",
        counts=VersionCounts(recall_lists=5, offline_lists=4, users=6, ads=9),
        model_metrics={"auc": 0.7, "logloss": None},
        stages=("ingest", "publish"),
        offline_pid="430548_1007",
        input_rows={"raw_sample": 100, "user_profile": 7},
        report={"offline": {"pid": "430548_1007", "top_n": 50}},
    ),
    sentinels=64,
)


def test_metadata_json_is_pinned():
    assert keys.META.encode(META) == (
        b'{"config_digest":"abc","counts":{"ads":9,"offline_lists":4,"recall_lists":5,'
        b'"users":6},"created_at":"2026-12-01T10:00:00+00:00","feature_spec_id":"full-v1-x",'
        b'"input_rows":{"raw_sample":100,"user_profile":7},'
        b'"memory_bytes":1234,"model_metrics":{"auc":0.7,"logloss":null},'
        b'"offline_pid":"430548_1007","report":{"offline":{"pid":"430548_1007","top_n":50}},'
        b'"run_id":"3f2a","sentinels":64,"stages":["ingest","publish"],"version":"v7"}'
    )


def test_metadata_round_trips():
    assert keys.META.decode(keys.META.encode(META)) == META


def test_unknown_fields_are_ignored_and_missing_ones_default():
    raw = json.dumps(
        {"version": "v2", "run_id": "r", "created_at": "x", "written_by_a_newer_job": {"a": 1}}
    ).encode()
    meta = VersionMeta.from_json(raw)
    assert meta.version == "v2" and meta.content == VersionContent()
    assert meta.memory_bytes == 0 and meta.created_at_unix is None


def test_an_older_version_keeps_its_offline_placement_in_the_report():
    raw = json.dumps({"version": "v2", "report": {"offline": {"pid": "430539_1007"}}}).encode()
    assert VersionMeta.from_json(raw).content.offline_pid == "430539_1007"


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ({"run_id": 5}, "'run_id' must be str"),
        ({"memory_bytes": "big"}, "'memory_bytes' must be int"),
        ({"memory_bytes": True}, "'memory_bytes' must be int"),
        ({"counts": {"users": 1.5}}, "'counts.users' must be int"),
        ({"input_rows": {"raw_sample": "many"}}, "'input_rows.raw_sample' must be int"),
        ({"model_metrics": {"auc": "high"}}, "'model_metrics.auc' must be a number"),
        ({"stages": ["ingest", 3]}, "'stages' must list strings"),
        ({"report": []}, "'report' must be dict"),
    ],
)
def test_a_field_of_the_wrong_type_is_named(document, field):
    with pytest.raises(CodecError, match=field):
        VersionMeta.from_json(json.dumps(document).encode())


def test_metadata_that_is_not_a_json_object_is_refused():
    with pytest.raises(CodecError):
        VersionMeta.from_json(b"[1, 2]")
    with pytest.raises(CodecError):
        VersionMeta.from_json(b"\x00not json")
