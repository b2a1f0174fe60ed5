"""Publishing: atomic switch, failure and kill safety, locking, retention and rollback.

Runs against a real redis-server in each mode (standalone, Redis Cluster, TLS with a
password); the kill test SIGKILLs a real publishing process.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from redis_fixtures import stored_keys

from adrec.core import keys, store
from adrec.core.catalog import (
    LockLostError,
    Publication,
    PublishLockedError,
    prune,
    rollback,
    version_summaries,
)
from adrec.core.metadata import VersionContent, VersionCounts


def publish(client, users=3, offset=0, keep=2, grace=0.0):
    # Immediate prune unless a test asks for a grace: the tests publish within milliseconds.
    with Publication(client, keep_versions=keep, prune_grace=grace) as pub:
        pub.writer.put_recall_lists(
            range(1, users + 1), [np.arange(1, 6) + offset + u for u in range(users)]
        )
        previous = pub.commit(VersionContent(counts=VersionCounts(users=users)))
    return pub, previous


def test_commit_switches_the_active_version_and_records_metadata(any_redis):
    first, previous = publish(any_redis)
    assert previous is None and first.version == "v1"
    second, previous = publish(any_redis, offset=10)
    assert previous == "v1"
    assert store.active_version(any_redis) == "v2"
    meta = store.read_meta(any_redis, "v2")
    assert meta.version == "v2" and meta.run_id == second.run_id
    assert meta.content.counts == VersionCounts(users=3)
    assert meta.memory_bytes > 0 and meta.created_at.endswith("+00:00")
    assert meta.sentinels == keys.SENTINEL_COUNT
    sentinels = [any_redis.get(key) for key in keys.sentinel_keys("v2")]
    assert sentinels == [second.run_id.encode()] * keys.SENTINEL_COUNT
    assert store.read_recall_list(any_redis, "v2", 1).tolist() == [11, 12, 13, 14, 15]
    assert not any_redis.exists(keys.PUBLISH_LOCK)
    assert any_redis.smembers(keys.PENDING_VERSIONS) == set()


def test_a_failed_run_leaves_the_previous_version_serving_and_no_keys(any_redis):
    publish(any_redis)
    before = sorted(stored_keys(any_redis, b"adrec:v1:*"))
    with pytest.raises(RuntimeError, match="boom"), Publication(any_redis) as pub:
        pub.writer.put_recall_lists([1, 2], [np.array([7]), np.array([8])])
        raise RuntimeError("boom")
    assert store.active_version(any_redis) == "v1"
    assert sorted(stored_keys(any_redis, b"adrec:v1:*")) == before
    assert stored_keys(any_redis, b"adrec:v2:*") == []
    assert not any_redis.exists(keys.PUBLISH_LOCK)


def test_only_one_publisher_at_a_time(any_redis):
    with Publication(any_redis), pytest.raises(PublishLockedError, match="publishing"):
        Publication(any_redis).__enter__()


KILLED_WRITER = textwrap.dedent("""
    import time
    import numpy as np
    from adrec.core.catalog import Publication
    from adrec.core.redis_conn import RedisSettings, connect
    from adrec.core.settings import load
    client = connect(load(RedisSettings))
    pub = Publication(client, lock_ttl=1.0).__enter__()
    pub.writer.put_recall_lists(range(1, 1001), [np.arange(1, 501)] * 1000)
    print(pub.version, flush=True)
    time.sleep(60)
""")


def test_a_killed_run_leaves_the_old_version_served_and_is_cleaned_up_later(
    any_redis, redis_target
):
    publish(any_redis)
    v1_keys = sorted(stored_keys(any_redis, b"adrec:v1:*"))
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **redis_target.env()},
    )
    try:
        killed_version = proc.stdout.readline().strip()
        assert killed_version == "v2"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    assert store.active_version(any_redis) == "v1"
    assert sorted(stored_keys(any_redis, b"adrec:v1:*")) == v1_keys
    assert len(stored_keys(any_redis, b"adrec:v2:recall:*")) == 1000  # orphaned, never served
    deadline = time.monotonic() + 30
    while any_redis.exists(keys.PUBLISH_LOCK) and time.monotonic() < deadline:
        time.sleep(0.1)
    third, _ = publish(any_redis)
    assert third.version == "v3"
    assert stored_keys(any_redis, b"adrec:v2:*") == []


def test_retention_keeps_the_newest_previous_versions(any_redis):
    for offset in range(4):
        pub, _ = publish(any_redis, offset=offset, keep=1)
    assert pub.removed_versions == ["v2"]
    assert store.list_versions(any_redis) == ["v3", "v4"]
    assert (
        stored_keys(any_redis, b"adrec:v1:*") == [] and stored_keys(any_redis, b"adrec:v2:*") == []
    )


def test_rollback_and_list(any_redis):
    publish(any_redis)
    publish(any_redis, offset=5)
    assert rollback(any_redis, "v1") == "v2"
    assert store.read_recall_list(any_redis, "v1", 1).tolist() == [1, 2, 3, 4, 5]
    rows = version_summaries(any_redis)
    assert [(meta.version, active) for meta, active in rows] == [("v2", False), ("v1", True)]
    with pytest.raises(store.VersionNotFoundError):
        rollback(any_redis, "v9")
    with pytest.raises(ValueError, match="data version"):
        rollback(any_redis, "latest")


def test_the_prune_after_a_rollback_keeps_the_version_the_services_follow(any_redis):
    publish(any_redis)
    publish(any_redis, offset=5)
    rollback(any_redis, "v1")
    # The services follow v1 until their next poll after v3 is activated: it must survive.
    publish(any_redis, offset=9, keep=1)
    assert store.list_versions(any_redis) == ["v1", "v3"]
    assert store.read_recall_list(any_redis, "v1", 1).tolist() == [1, 2, 3, 4, 5]


def test_two_publishes_within_the_grace_keep_the_version_the_services_still_follow(any_redis):
    publish(any_redis)
    publish(any_redis, offset=5, keep=1, grace=60)
    # v1 was active a moment ago: a service polling every few seconds may still serve it.
    third, _ = publish(any_redis, offset=9, keep=1, grace=60)
    assert third.removed_versions == []
    assert store.list_versions(any_redis) == ["v1", "v2", "v3"]
    assert store.read_recall_list(any_redis, "v1", 1).tolist() == [1, 2, 3, 4, 5]


def test_a_version_replaced_longer_ago_than_the_grace_is_pruned(any_redis):
    publish(any_redis)
    publish(any_redis, offset=5)
    # v2 replaced v1 two minutes ago (its activation time is when v1 stopped serving).
    any_redis.zadd(keys.VERSIONS, {"v1": time.time() - 180, "v2": time.time() - 120})
    third, _ = publish(any_redis, offset=9, keep=1, grace=60)
    assert third.removed_versions == ["v1"]
    assert store.list_versions(any_redis) == ["v2", "v3"]
    assert stored_keys(any_redis, b"adrec:v1:*") == []


def test_the_grace_protects_the_version_a_rollback_replaced(any_redis):
    publish(any_redis)
    publish(any_redis, offset=5)
    any_redis.zadd(keys.VERSIONS, {"v1": time.time() - 180, "v2": time.time() - 120})
    # Rolled back to v1 just now: v2 served until this moment, v1 serves now.
    rollback(any_redis, "v1")
    publish(any_redis, offset=9, keep=0, grace=60)
    assert store.list_versions(any_redis) == ["v1", "v2", "v3"]
    assert store.read_recall_list(any_redis, "v2", 1).tolist() == [6, 7, 8, 9, 10]


def test_a_negative_grace_is_refused(any_redis):
    with pytest.raises(ValueError, match="prune_grace"):
        Publication(any_redis, prune_grace=-1)


def test_a_run_that_lost_its_lock_before_the_prune_deletes_nothing(any_redis):
    publish(any_redis)
    publish(any_redis, offset=5)
    running = Publication(any_redis, keep_versions=0, prune_grace=0).__enter__()
    try:
        # The lease lapses and another holder (a rollback) takes the lock, between the
        # switch and the prune: the prune must not delete what that holder may activate.
        prune_lock = running.lock
        any_redis.delete(keys.PUBLISH_LOCK)
        any_redis.set(keys.PUBLISH_LOCK, "a-rollback", px=60_000)
        with pytest.raises(LockLostError):
            prune(any_redis, 0, grace=0, lock=prune_lock)
        assert store.list_versions(any_redis) == ["v1", "v2"]
    finally:
        running.__exit__(None, None, None)
        any_redis.delete(keys.PUBLISH_LOCK)


def test_reruns_are_idempotent(any_redis):
    publish(any_redis, keep=1)
    publish(any_redis, keep=1)
    publish(any_redis, keep=1)
    assert store.list_versions(any_redis) == ["v2", "v3"]
    assert (
        store.read_recall_list(any_redis, "v3", 2).tolist()
        == store.read_recall_list(any_redis, "v2", 2).tolist()
    )
    assert len(stored_keys(any_redis, b"adrec:v[0-9]*")) == 2 * (3 + 1 + keys.SENTINEL_COUNT)


def test_family_memory_counts_every_key_and_estimates_bytes(any_redis):
    from adrec.core.catalog import family_memory

    with Publication(any_redis) as pub:
        pub.writer.put_recall_lists(range(1, 301), [np.arange(1, 501)] * 300)
        pub.writer.put_popular("all", np.arange(1, 11))
        memory = family_memory(any_redis, pub.version, sample_per_family=20)
        pub.commit(VersionContent())
    assert memory["recall"]["keys"] == 300 and memory["popular"]["keys"] == 1
    # 1,501-byte values live in jemalloc's 1,536-byte class, plus key and entry overhead.
    assert 300 * 1536 <= memory["recall"]["bytes"] <= 300 * 2000
    assert set(memory) == {"recall", "popular"}


def test_a_run_that_lost_its_lock_never_activates_its_version(any_redis):
    publish(any_redis)
    paused = Publication(any_redis).__enter__()
    paused.writer.put_recall_lists([1, 2], [np.array([7]), np.array([8])])
    # The paused run's lease runs out (a pause past the lock's TTL) and a second run starts:
    # it takes the lock, removes the paused run's pending version as an orphan, publishes.
    any_redis.delete(keys.PUBLISH_LOCK)
    second, previous = publish(any_redis, offset=20)
    assert previous == "v1" and second.version == "v3"
    assert stored_keys(any_redis, f"adrec:{paused.version}:*".encode()) == []

    with pytest.raises(LockLostError, match="lost the publish lock"):
        paused.commit(VersionContent(counts=VersionCounts(users=2)))
    with pytest.raises(LockLostError):
        paused.writer.put_recall_lists([3], [np.array([9])])
    paused.__exit__(None, None, None)

    assert store.active_version(any_redis) == "v3"
    assert store.read_recall_list(any_redis, "v3", 1).tolist() == [21, 22, 23, 24, 25]
    assert store.list_versions(any_redis) == ["v1", "v3"]


def test_the_heartbeat_notices_when_another_run_holds_the_lock(any_redis):
    with Publication(any_redis, lock_ttl=0.4) as pub:
        any_redis.set(keys.PUBLISH_LOCK, "another-run", px=60_000)
        deadline = time.monotonic() + 20
        while not pub.lock.lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pub.lock.lost
        with pytest.raises(LockLostError):
            pub.commit(VersionContent())
    # The run that lost the lock leaves the other run's lock in place.
    assert any_redis.get(keys.PUBLISH_LOCK) == b"another-run"
    assert store.active_version(any_redis) is None


def test_rollback_takes_the_lock_so_it_cannot_race_a_publishing_job(any_redis):
    publish(any_redis)
    publish(any_redis, offset=5)
    with Publication(any_redis) as running:
        with pytest.raises(PublishLockedError, match=running.run_id):
            rollback(any_redis, "v1")
        assert store.active_version(any_redis) == "v2"
    assert rollback(any_redis, "v1") == "v2"
    assert not any_redis.exists(keys.PUBLISH_LOCK)


def test_rollback_refuses_a_version_that_is_not_completed(any_redis):
    publish(any_redis)
    with Publication(any_redis) as pending:
        pending_version = pending.version
        pending.writer.put_recall_lists([1], [np.array([4])])
        # Written, but its own run is still working on it: not a version to roll back to.
        any_redis.delete(keys.PUBLISH_LOCK)
        with pytest.raises(store.VersionNotFoundError, match="not a completed"):
            rollback(any_redis, pending_version)
        assert store.active_version(any_redis) == "v1"
        any_redis.set(keys.PUBLISH_LOCK, pending.run_id)
