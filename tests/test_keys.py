"""The Redis key schema: exact bytes are pinned, since any change strands published data."""

import numpy as np
import pytest

from adrec.core import keys
from adrec.core.codecs import UserFeatures


def test_global_keys_are_pinned():
    assert keys.ACTIVE_VERSION == b"adrec:active"
    assert keys.VERSIONS == b"adrec:versions"
    assert keys.VERSION_SEQUENCE == b"adrec:version_seq"
    assert keys.PUBLISH_LOCK == b"adrec:publish_lock"
    assert keys.PENDING_VERSIONS == b"adrec:pending"


@pytest.mark.parametrize(
    ("family", "member", "expected"),
    [
        (keys.META, None, b"adrec:v17:meta"),
        (keys.RECALL, 1141729, b"adrec:v17:recall:1141729"),
        (keys.OFFLINE, 8, b"adrec:v17:offline:8"),
        (keys.USER, 234, b"adrec:v17:user:234"),
        (keys.POPULAR, keys.POPULAR_ALL, b"adrec:v17:popular:all"),
        (keys.POPULAR, "430548_1007", b"adrec:v17:popular:430548_1007"),
        (keys.ADS, None, b"adrec:v17:ads"),
        (keys.CATE_FACTORS, None, b"adrec:v17:cate_factors"),
        (keys.MODEL, None, b"adrec:v17:model"),
        (keys.BIDS, None, b"adrec:v17:bids"),
        (keys.SENTINEL, 148, b"adrec:v17:sentinel:148"),
    ],
)
def test_versioned_keys_are_pinned(family, member, expected):
    assert family.key("v17", member) == expected


def test_every_family_is_pinned_above():
    pinned = {
        "meta",
        "recall",
        "offline",
        "user",
        "popular",
        "ads",
        "cate_factors",
        "model",
        "category_ads",
        "bids",
        "sentinel",
    }
    assert {f.name for f in keys.VERSIONED_FAMILIES} == pinned


def test_keys_never_contain_hash_tags():
    for family in keys.VERSIONED_FAMILIES:
        key = family.key(
            "v3", 5 if family.member == "user_id" else None if family.member is None else "all"
        )
        assert b"{" not in key and b"}" not in key


@pytest.mark.parametrize("bad", ["17", "v0", "v-1", "V17", "v17:x", "", None, "v1{x}"])
def test_bad_versions_are_refused(bad):
    with pytest.raises(ValueError, match="data version"):
        keys.RECALL.key(bad, 1)


@pytest.mark.parametrize("bad", [0, -5, True, "a:b", "{tag}", ""])
def test_bad_members_are_refused(bad):
    with pytest.raises(ValueError):
        keys.RECALL.key("v1", bad)


def test_member_presence_is_checked():
    with pytest.raises(ValueError, match="takes a user_id"):
        keys.RECALL.key("v1")
    with pytest.raises(ValueError, match="takes no member"):
        keys.MODEL.key("v1", 3)


def test_version_ids_and_patterns():
    assert keys.version_id(42) == "v42"
    assert keys.version_sequence("v42") == 42
    assert keys.version_pattern("v42") == b"adrec:v42:*"
    with pytest.raises(ValueError):
        keys.version_id(0)


def test_every_family_pairs_its_key_with_one_codec():
    samples = {
        "recall": np.array([7, 3, 9]),
        "popular": np.array([2, 1]),
        "offline": (np.array([4, 8]), np.array([0.25, 0.5])),
        "user": UserFeatures({"age_level": 3.0}, np.array([0.5, -1.0], dtype=np.float32)),
        "ads": {"adgroup_id": np.array([1, 2], dtype=np.int32)},
        "cate_factors": {
            "cate_id": np.array([5], dtype=np.int32),
            "factors": np.ones((1, 2), dtype=np.float32),
        },
    }
    for family in keys.VERSIONED_FAMILIES:
        if family.name not in samples:
            continue
        value = samples[family.name]
        decoded = family.decode(family.encode(value))
        if family.name == "offline":
            assert decoded[0].tolist() == [4, 8] and decoded[1].tolist() == [0.25, 0.5]
        elif family.name == "user":
            assert decoded.profile["age_level"] == 3.0
            assert decoded.als_factors.tolist() == [0.5, -1.0]
        elif isinstance(value, dict):
            assert {k: v.tolist() for k, v in decoded.items()} == {
                k: v.tolist() for k, v in value.items()
            }
        else:
            assert decoded.tolist() == value.tolist()
    assert keys.RECALL.codec is keys.POPULAR.codec  # both are ordered ad id lists
    assert keys.RECALL.codec.describe.startswith("ad ids in order: a width byte (3 or 4)")


def test_key_slots_are_redis_clusters():
    # The CRC16 check value of the Redis Cluster specification.
    assert keys.key_slot(b"123456789") == 12739
    assert keys.key_slot(b"adrec:active") == 4261
    with pytest.raises(ValueError, match="hash tag"):
        keys.key_slot(b"adrec:{v1}:meta")


def test_sentinel_keys_are_pinned_and_one_falls_in_each_range_of_slots():
    sentinels = keys.sentinel_keys("v17")
    assert len(sentinels) == keys.SENTINEL_COUNT == 64
    assert sentinels[:2] == (b"adrec:v17:sentinel:148", b"adrec:v17:sentinel:12")
    assert sentinels[-1] == b"adrec:v17:sentinel:4"
    width = keys.CLUSTER_SLOTS // keys.SENTINEL_COUNT
    assert [keys.key_slot(key) // width for key in sentinels] == list(range(64))
    assert keys.sentinel_keys("v18") != sentinels  # the version is part of every key
    assert len(keys.sentinel_keys("v17", 4)) == 4
    assert keys.SENTINEL.decode(keys.SENTINEL.encode("run-7")) == "run-7"
