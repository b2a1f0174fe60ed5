"""Store: the job's writers and the readers agree, byte for byte, on a real redis-server in
each mode (standalone, Redis Cluster, TLS with a password)."""

import numpy as np
import pytest
from redis_fixtures import stored_keys

from adrec.core import keys, store
from adrec.core.codecs import UserFeatures
from adrec.core.features import COURSE
from adrec.core.metadata import VersionContent, VersionCounts, VersionMeta
from adrec.core.model import CtrModel


def publish_minimal(client, version):
    writer = store.VersionWriter(client, version, batch=3)
    lists = [np.arange(1, 501) + i for i in range(7)]
    assert writer.put_recall_lists(range(1, 8), lists) == 7
    writer.put_meta(
        VersionMeta(
            version,
            "run-1",
            "2026-12-01T10:00:00+00:00",
            0,
            VersionContent(counts=VersionCounts(users=7)),
        )
    )
    return lists


def test_written_keys_and_values_round_trip(any_redis):
    lists = publish_minimal(any_redis, "v1")
    assert any_redis.exists(b"adrec:v1:recall:7")
    assert store.read_recall_list(any_redis, "v1", 3).tolist() == lists[2].tolist()
    assert store.read_recall_list(any_redis, "v1", 99) is None

    writer = store.VersionWriter(any_redis, "v1")
    writer.put_offline_lists([5], [(np.array([9, 4]), np.array([0.3, 0.1]))])
    ids, ctrs = store.read_offline_list(any_redis, "v1", 5)
    assert ids.tolist() == [9, 4]
    np.testing.assert_allclose(ctrs, [0.3, 0.1], rtol=1e-3)

    writer.put_user_features([5], [UserFeatures({"age_level": 3}, np.ones(4))])
    user = store.read_user_features(any_redis, "v1", 5)
    assert user.profile["age_level"] == 3 and user.als_factors.tolist() == [1, 1, 1, 1]

    writer.put_popular(keys.POPULAR_ALL, np.array([3, 2, 1]))
    assert store.read_popular(any_redis, "v1", "all").tolist() == [3, 2, 1]

    writer.put_ad_table({"adgroup_id": np.array([1, 2], dtype=np.int32)})
    assert store.read_ad_table(any_redis, "v1")["adgroup_id"].tolist() == [1, 2]

    writer.put_cate_factors(np.array([4, 8]), np.eye(2))
    cate_ids, factors = store.read_cate_factors(any_redis, "v1")
    assert cate_ids.tolist() == [4, 8] and factors.dtype == np.float32

    model = CtrModel(COURSE, np.zeros(COURSE.dim), -2.0)
    writer.put_model(model)
    assert store.read_model(any_redis, "v1").intercept == -2.0


def test_catalog_allocates_activates_and_lists(any_redis):
    first, second = store.allocate_version(any_redis), store.allocate_version(any_redis)
    assert (first, second) == ("v1", "v2")
    assert store.active_version(any_redis) is None
    publish_minimal(any_redis, first)
    assert store.activate(any_redis, first) is None
    publish_minimal(any_redis, second)
    assert store.activate(any_redis, second) == first
    assert store.active_version(any_redis) == second
    assert store.list_versions(any_redis) == ["v1", "v2"]


def test_incomplete_versions_cannot_be_activated(any_redis):
    store.VersionWriter(any_redis, "v4").put_recall_lists([1], [np.array([1])])
    with pytest.raises(store.VersionNotFoundError, match="v4"):
        store.activate(any_redis, "v4")
    assert store.active_version(any_redis) is None


def test_delete_version_removes_only_its_keys_and_never_the_active_one(any_redis):
    publish_minimal(any_redis, "v1")
    publish_minimal(any_redis, "v2")
    store.activate(any_redis, "v1")
    store.activate(any_redis, "v2")
    with pytest.raises(ValueError, match="active"):
        store.delete_version(any_redis, "v2")
    assert store.delete_version(any_redis, "v1", scan_batch=2) == 8
    assert stored_keys(any_redis, b"adrec:v1:*") == []
    assert len(stored_keys(any_redis, b"adrec:v2:*")) == 8
    assert store.list_versions(any_redis) == ["v2"]
