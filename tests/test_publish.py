"""Publishing: atomic switch, failure and kill safety, locking, retention and rollback.

Runs against a real redis-server; the kill test SIGKILLs a real publishing process.
"""

import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from adrec.core import keys, store
from adrec.core.catalog import (
    LockLostError,
    Publication,
    PublishLockedError,
    rollback,
    version_summaries,
)
from adrec.core.metadata import VersionContent, VersionCounts


def publish(client, users=3, offset=0, keep=2):
    with Publication(client, keep_versions=keep) as pub:
        pub.writer.put_recall_lists(
            range(1, users + 1), [np.arange(1, 6) + offset + u for u in range(users)]
        )
        previous = pub.commit(VersionContent(counts=VersionCounts(users=users)))
    return pub, previous


def test_commit_switches_the_active_version_and_records_metadata(redis_client):
    first, previous = publish(redis_client)
    assert previous is None and first.version == "v1"
    second, previous = publish(redis_client, offset=10)
    assert previous == "v1"
    assert store.active_version(redis_client) == "v2"
    meta = store.read_meta(redis_client, "v2")
    assert meta.version == "v2" and meta.run_id == second.run_id
    assert meta.content.counts == VersionCounts(users=3)
    assert meta.memory_bytes > 0 and meta.created_at.endswith("+00:00")
    assert store.read_recall_list(redis_client, "v2", 1).tolist() == [11, 12, 13, 14, 15]
    assert not redis_client.exists(keys.PUBLISH_LOCK)
    assert redis_client.smembers(keys.PENDING_VERSIONS) == set()


def test_a_failed_run_leaves_the_previous_version_serving_and_no_keys(redis_client):
    publish(redis_client)
    before = sorted(redis_client.keys(b"adrec:v1:*"))
    with pytest.raises(RuntimeError, match="boom"), Publication(redis_client) as pub:
        pub.writer.put_recall_lists([1, 2], [np.array([7]), np.array([8])])
        raise RuntimeError("boom")
    assert store.active_version(redis_client) == "v1"
    assert sorted(redis_client.keys(b"adrec:v1:*")) == before
    assert redis_client.keys(b"adrec:v2:*") == []
    assert not redis_client.exists(keys.PUBLISH_LOCK)


def test_only_one_publisher_at_a_time(redis_client):
    with Publication(redis_client), pytest.raises(PublishLockedError, match="publishing"):
        Publication(redis_client).__enter__()


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np, redis
    from adrec.core.catalog import Publication
    client = redis.Redis.from_url(sys.argv[1])
    pub = Publication(client, lock_ttl=1.0).__enter__()
    pub.writer.put_recall_lists(range(1, 1001), [np.arange(1, 501)] * 1000)
    print(pub.version, flush=True)
    time.sleep(60)
""")


def test_a_killed_run_leaves_the_old_version_served_and_is_cleaned_up_later(
    redis_client, redis_url
):
    publish(redis_client)
    v1_keys = sorted(redis_client.keys(b"adrec:v1:*"))
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, redis_url], stdout=subprocess.PIPE, text=True
    )
    try:
        killed_version = proc.stdout.readline().strip()
        assert killed_version == "v2"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    assert store.active_version(redis_client) == "v1"
    assert sorted(redis_client.keys(b"adrec:v1:*")) == v1_keys
    assert len(redis_client.keys(b"adrec:v2:recall:*")) == 1000  # orphaned, never served
    deadline = time.monotonic() + 30
    while redis_client.exists(keys.PUBLISH_LOCK) and time.monotonic() < deadline:
        time.sleep(0.1)
    third, _ = publish(redis_client)
    assert third.version == "v3"
    assert redis_client.keys(b"adrec:v2:*") == []


def test_retention_keeps_the_newest_previous_versions(redis_client):
    for offset in range(4):
        pub, _ = publish(redis_client, offset=offset, keep=1)
    assert pub.removed_versions == ["v2"]
    assert store.list_versions(redis_client) == ["v3", "v4"]
    assert redis_client.keys(b"adrec:v1:*") == [] and redis_client.keys(b"adrec:v2:*") == []


def test_rollback_and_list(redis_client):
    publish(redis_client)
    publish(redis_client, offset=5)
    assert rollback(redis_client, "v1") == "v2"
    assert store.read_recall_list(redis_client, "v1", 1).tolist() == [1, 2, 3, 4, 5]
    rows = version_summaries(redis_client)
    assert [(meta.version, active) for meta, active in rows] == [("v2", False), ("v1", True)]
    with pytest.raises(store.VersionNotFoundError):
        rollback(redis_client, "v9")
    with pytest.raises(ValueError, match="data version"):
        rollback(redis_client, "latest")


def test_reruns_are_idempotent(redis_client):
    publish(redis_client, keep=1)
    publish(redis_client, keep=1)
    publish(redis_client, keep=1)
    assert store.list_versions(redis_client) == ["v2", "v3"]
    assert (
        store.read_recall_list(redis_client, "v3", 2).tolist()
        == store.read_recall_list(redis_client, "v2", 2).tolist()
    )
    assert len(redis_client.keys(b"adrec:v[0-9]*")) == 2 * (3 + 1)


def test_family_memory_counts_every_key_and_estimates_bytes(redis_client):
    from adrec.core.catalog import family_memory

    with Publication(redis_client) as pub:
        pub.writer.put_recall_lists(range(1, 301), [np.arange(1, 501)] * 300)
        pub.writer.put_popular("all", np.arange(1, 11))
        memory = family_memory(redis_client, pub.version, sample_per_family=20)
        pub.commit(VersionContent())
    assert memory["recall"]["keys"] == 300 and memory["popular"]["keys"] == 1
    # 1,501-byte values live in jemalloc's 1,536-byte class, plus key and entry overhead.
    assert 300 * 1536 <= memory["recall"]["bytes"] <= 300 * 2000
    assert set(memory) == {"recall", "popular"}


def test_a_run_that_lost_its_lock_never_activates_its_version(redis_client):
    publish(redis_client)
    paused = Publication(redis_client).__enter__()
    paused.writer.put_recall_lists([1, 2], [np.array([7]), np.array([8])])
    # The paused run's lease runs out (a pause past the lock's TTL) and a second run starts:
    # it takes the lock, removes the paused run's pending version as an orphan, publishes.
    redis_client.delete(keys.PUBLISH_LOCK)
    second, previous = publish(redis_client, offset=20)
    assert previous == "v1" and second.version == "v3"
    assert redis_client.keys(f"adrec:{paused.version}:*".encode()) == []

    with pytest.raises(LockLostError, match="lost the publish lock"):
        paused.commit(VersionContent(counts=VersionCounts(users=2)))
    with pytest.raises(LockLostError):
        paused.writer.put_recall_lists([3], [np.array([9])])
    paused.__exit__(None, None, None)

    assert store.active_version(redis_client) == "v3"
    assert store.read_recall_list(redis_client, "v3", 1).tolist() == [21, 22, 23, 24, 25]
    assert store.list_versions(redis_client) == ["v1", "v3"]


def test_the_heartbeat_notices_when_another_run_holds_the_lock(redis_client):
    with Publication(redis_client, lock_ttl=0.4) as pub:
        redis_client.set(keys.PUBLISH_LOCK, "another-run", px=60_000)
        deadline = time.monotonic() + 20
        while not pub.lock.lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pub.lock.lost
        with pytest.raises(LockLostError):
            pub.commit(VersionContent())
    # The run that lost the lock leaves the other run's lock in place.
    assert redis_client.get(keys.PUBLISH_LOCK) == b"another-run"
    assert store.active_version(redis_client) is None


def test_rollback_takes_the_lock_so_it_cannot_race_a_publishing_job(redis_client):
    publish(redis_client)
    publish(redis_client, offset=5)
    with Publication(redis_client) as running:
        with pytest.raises(PublishLockedError, match=running.run_id):
            rollback(redis_client, "v1")
        assert store.active_version(redis_client) == "v2"
    assert rollback(redis_client, "v1") == "v2"
    assert not redis_client.exists(keys.PUBLISH_LOCK)


def test_rollback_refuses_a_version_that_is_not_completed(redis_client):
    publish(redis_client)
    with Publication(redis_client) as pending:
        pending_version = pending.version
        pending.writer.put_recall_lists([1], [np.array([4])])
        # Written, but its own run is still working on it: not a version to roll back to.
        redis_client.delete(keys.PUBLISH_LOCK)
        with pytest.raises(store.VersionNotFoundError, match="not a completed"):
            rollback(redis_client, pending_version)
        assert store.active_version(redis_client) == "v1"
        redis_client.set(keys.PUBLISH_LOCK, pending.run_id)
