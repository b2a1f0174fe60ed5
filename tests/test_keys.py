"""The Redis key schema: exact bytes are pinned, since any change strands published data."""

import pytest

from adrec.core import keys


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
    ],
)
def test_versioned_keys_are_pinned(family, member, expected):
    assert family.key("v17", member) == expected


def test_every_family_is_pinned_above():
    pinned = {"meta", "recall", "offline", "user", "popular", "ads", "cate_factors", "model"}
    assert {f.name for f in keys.VERSIONED_FAMILIES} == pinned


def test_keys_never_contain_hash_tags():
    for family in keys.VERSIONED_FAMILIES:
        key = family.key("v3", 5 if family.member == "user_id" else None
                         if family.member is None else "all")
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
