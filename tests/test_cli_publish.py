"""`adrec publish` against a real redis-server: list, rollback, update-user, bad input."""

import math

import numpy as np
import pytest

from adrec.cli import main
from adrec.core import store
from adrec.core.catalog import Publication
from adrec.core.codecs import UserFeatures
from adrec.core.metadata import VersionContent, VersionCounts


def publish(client, offset):
    with Publication(client) as pub:
        pub.writer.put_recall_lists([1, 2], [np.array([1, 2]) + offset, np.array([3]) + offset])
        pub.writer.put_user_features(
            [1], [UserFeatures({"age_level": 2, "gender": 1}, np.ones(3, dtype=np.float32))]
        )
        pub.writer.put_ad_table({"adgroup_id": np.arange(1, 31, dtype=np.int32)})
        pub.commit(VersionContent(counts=VersionCounts(recall_lists=2), config_digest="abc123"))


def test_list_and_rollback(redis_client, redis_url, capsys):
    publish(redis_client, 0)
    publish(redis_client, 10)
    assert main(["publish", "list", "--redis-url", redis_url]) == 0
    out = capsys.readouterr().out
    assert "* v2" in out and "  v1" in out and "abc123" in out
    assert main(["publish", "rollback", "v1", "--redis-url", redis_url]) == 0
    assert "active version: v1 (was v2)" in capsys.readouterr().out
    assert store.active_version(redis_client) == "v1"


def test_rollback_to_a_missing_version_is_a_clear_error(redis_client, redis_url, capsys):
    publish(redis_client, 0)
    assert main(["publish", "rollback", "v7", "--redis-url", redis_url]) == 2
    assert "v7 does not exist" in capsys.readouterr().err
    assert store.active_version(redis_client) == "v1"


def test_update_user_recall_and_profile(redis_client, redis_url):
    publish(redis_client, 0)
    code = main(
        [
            "publish",
            "update-user",
            "1",
            "--recall",
            "9,8,7",
            "--profile",
            "age_level=5",
            "--profile",
            "gender=missing",
            "--redis-url",
            redis_url,
        ]
    )
    assert code == 0
    assert store.read_recall_list(redis_client, "v1", 1).tolist() == [9, 8, 7]
    user = store.read_user_features(redis_client, "v1", 1)
    assert user.profile["age_level"] == 5 and math.isnan(user.profile["gender"])
    assert user.als_factors.tolist() == [1, 1, 1]  # untouched fields survive


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["0", "--recall", "1"], "user_id must be positive"),
        (["1", "--recall", "1,x"], "comma-separated integers"),
        (["1", "--recall", "1,1"], "distinct"),
        (["1", "--recall", "-4"], "positive 32-bit"),
        (["1", "--profile", "shoe=3"], "FIELD one of"),
        (["1", "--profile", "age_level=300"], "0..127"),
        (["1", "--recall", "5", "--profile", "age_level=x"], "0..127"),
        (["1"], "nothing to update"),
        # An ad the version lacks: refused, and the profile change with it.
        (["1", "--recall", "3,999,40", "--profile", "age_level=4"], "2 ads that version v1 does"),
    ],
)
def test_update_user_bad_input_writes_nothing(redis_client, redis_url, capsys, argv, message):
    publish(redis_client, 0)
    before = {k: redis_client.get(k) for k in redis_client.keys(b"adrec:v1:*")}
    assert main(["publish", "update-user", *argv, "--redis-url", redis_url]) == 2
    assert message in capsys.readouterr().err
    assert {k: redis_client.get(k) for k in redis_client.keys(b"adrec:v1:*")} == before


def test_bad_redis_url_is_named(capsys):
    assert main(["publish", "list", "--redis-url", "http://nowhere"]) == 2
    assert "REDIS_URL" in capsys.readouterr().err


def test_unreachable_redis_is_a_clear_error(capsys):
    from adrec.core.redis_server import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    assert main(["publish", "list", "--redis-url", url]) == 1
    assert "cannot reach Redis" in capsys.readouterr().err
