"""Versioned, atomic publishing of one job run into Redis, plus list and rollback.

A run publishes inside a :class:`Publication`::

    with Publication(client, keep_versions=2) as pub:
        pub.writer.put_recall_lists(...)        # every key under pub.version
        ...
        pub.commit(VersionContent(...))         # metadata, then the atomic switch

Guarantees:
- readers only ever follow ``adrec:active``, which moves with one SET after the new
  version's sentinels and then its metadata are written, so they never see a half-written
  version, and can tell when Redis loses part of a complete one;
- one publisher at a time (a lock with a heartbeat: a killed run's lock expires
  within ``lock_ttl`` seconds);
- a run that fails or is killed leaves the previous version serving; its partial
  keys are removed on exit, or by the next run if the process died;
- after a commit only the newest ``keep_versions`` previous versions are kept, and any
  version that was active less than ``prune_grace`` seconds ago: services switch on their
  next poll, so two publishes (or a rollback and a publish) in quick succession must not
  delete the version they still serve.

Nothing here imports Spark, so operators can list and roll back from the
services image.
"""

from __future__ import annotations

import threading
import time
import uuid
from types import TracebackType
from typing import Any

from redis.exceptions import RedisError

from adrec.core import keys, store
from adrec.core.metadata import VersionContent, VersionMeta, now_utc
from adrec.core.store import VersionWriter

_RELEASE_IF_OWNER = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_REFRESH_IF_OWNER = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""


#: How long a version stays after it stopped being active, whatever ``keep_versions`` says:
#: a service finds the new version on its next poll (``ADREC_RELOAD_INTERVAL_SECONDS``) and
#: serves the old one until the new one has loaded, which for a full-size ad table takes
#: seconds.
DEFAULT_PRUNE_GRACE_SECONDS = 60.0


class PublishLockedError(RuntimeError):
    """Another run holds the publish lock."""


class LockLostError(RuntimeError):
    """This run no longer holds the publish lock, so another may have taken over its work."""


class PublishLock:
    """The one-writer lease on the catalog: ``SET NX PX`` renewed by a heartbeat thread.

    Holding it is what entitles a run to delete orphans, switch the active version and
    prune. A run can lose it without knowing (a pause longer than ``ttl``: GC, SIGSTOP, a
    slow disk), so every step that changes what readers see first calls :meth:`renew`,
    which fails once another run holds the key: the renewal also restarts the lease, so the
    step after it has a whole ``ttl`` to finish.
    """

    def __init__(self, client: Any, ttl: float, owner: str | None = None):
        self.client = client
        self.ttl_ms = int(ttl * 1000)
        self.owner = owner or uuid.uuid4().hex
        self._release = client.register_script(_RELEASE_IF_OWNER)
        self._refresh = client.register_script(_REFRESH_IF_OWNER)
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._heartbeat: threading.Thread | None = None

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def acquire(self, heartbeat: bool = True) -> None:
        if not self.client.set(keys.PUBLISH_LOCK, self.owner, nx=True, px=self.ttl_ms):
            raise PublishLockedError(
                f"another run ({lock_holder(self.client) or 'unknown'}) is publishing; "
                f"its lock expires {self.ttl_ms // 1000}s after it stops"
            )
        if heartbeat:
            self._heartbeat = threading.Thread(target=self._beat, name="publish-lock", daemon=True)
            self._heartbeat.start()

    def renew(self) -> None:
        """Restart the lease; raises LockLostError when this run no longer holds it."""
        if self.lost or not self._refresh(keys=[keys.PUBLISH_LOCK], args=[self.owner, self.ttl_ms]):
            self._lost.set()
            raise LockLostError(
                f"run {self.owner} lost the publish lock (paused for longer than its "
                f"{self.ttl_ms // 1000}s lease?); another run may be publishing, so this one "
                "stops without touching the active version"
            )

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        self._release(keys=[keys.PUBLISH_LOCK], args=[self.owner])

    def _beat(self) -> None:
        interval = self.ttl_ms / 4000
        while not self._stop.wait(interval):
            try:
                self.renew()
            except LockLostError:
                return
            except RedisError:
                # A blip must not end the heartbeat: the next beat retries, and if the
                # lease runs out meanwhile, the next renew says so.
                continue


class Publication:
    def __init__(
        self,
        client: Any,
        keep_versions: int = 2,
        lock_ttl: float = 60.0,
        prune_grace: float = DEFAULT_PRUNE_GRACE_SECONDS,
    ):
        if keep_versions < 0:
            raise ValueError("keep_versions must be 0 or more")
        if prune_grace < 0:
            raise ValueError("prune_grace must be 0 or more")
        self.client = client
        self.keep_versions = keep_versions
        self.prune_grace = prune_grace
        self.lock = PublishLock(client, lock_ttl)
        self.run_id = self.lock.owner
        self.version = ""
        self.committed = False
        self.removed_versions: list[str] = []
        self._memory_at_start = 0

    @property
    def writer(self) -> VersionWriter:
        if self.lock.lost:
            raise LockLostError(f"run {self.run_id} lost the publish lock; it writes no more")
        return VersionWriter(self.client, self.version)

    def __enter__(self) -> Publication:
        self.lock.acquire()
        try:
            self._remove_orphans()
            self._memory_at_start = used_memory(self.client)
            self.version = store.allocate_version(self.client)
            self.client.sadd(keys.PENDING_VERSIONS, self.version)
        except BaseException:
            self.lock.release()
            raise
        return self

    def commit(self, content: VersionContent) -> str | None:
        """Write the metadata, switch readers to this version, prune old ones.

        Refuses (LockLostError) when the lock was lost: another run may have removed this
        run's keys as an orphan's, and activating them would serve an empty version.
        """
        self.lock.renew()
        if not self.client.sismember(keys.PENDING_VERSIONS, self.version):
            raise LockLostError(
                f"version {self.version} is no longer pending: another run removed it"
            )
        writer = self.writer
        sentinels = writer.put_sentinels(self.run_id)
        writer.put_meta(
            VersionMeta(
                version=self.version,
                run_id=self.run_id,
                created_at=now_utc(),
                memory_bytes=max(used_memory(self.client) - self._memory_at_start, 0),
                content=content,
                sentinels=sentinels,
            )
        )
        self.lock.renew()
        previous = store.activate(self.client, self.version)
        self.committed = True
        self.client.srem(keys.PENDING_VERSIONS, self.version)
        self.removed_versions = prune(
            self.client, self.keep_versions, grace=self.prune_grace, lock=self.lock
        )
        return previous

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            # Without the lock this run's version may already belong to another run's
            # cleanup; the lock's next holder removes whatever is left.
            if not self.committed and self.version and not self.lock.lost:
                store.delete_version(self.client, self.version)
                self.client.srem(keys.PENDING_VERSIONS, self.version)
        finally:
            self.lock.release()

    def _remove_orphans(self) -> None:
        # Holding the lock, any pending version belongs to a run that died mid-write.
        for raw in self.client.smembers(keys.PENDING_VERSIONS):
            orphan = raw.decode()
            if orphan != store.active_version(self.client):
                store.delete_version(self.client, orphan)
            self.client.srem(keys.PENDING_VERSIONS, orphan)


def lock_holder(client: Any) -> str | None:
    """The run holding the publish lock, if any: lets a job fail before hours of work."""
    holder = client.get(keys.PUBLISH_LOCK)
    return holder.decode() if holder is not None else None


def prune(
    client: Any,
    keep_versions: int,
    *,
    grace: float = DEFAULT_PRUNE_GRACE_SECONDS,
    lock: PublishLock | None = None,
) -> list[str]:
    """Delete completed versions beyond the active one, the ``keep_versions`` others most
    recently active, and every one that was active less than ``grace`` seconds ago.

    A version stopped being active when the next one in activation order was activated (a
    rollback re-activates an old version, which moves it last), and services still follow
    it until their next poll has loaded its successor. With ``lock``, the lease is renewed
    before each deletion, so a run paused past it stops before deleting a version a
    rollback, which takes the same lock, may have activated meanwhile.
    """
    if grace < 0:
        raise ValueError("grace must be 0 or more")
    active = store.active_version(client)
    history = store.activations(client)
    now = time.time()
    # Activation times come from the activating clients' clocks: a version with nothing
    # activated after it, yet not active, counts as just replaced.
    replaced_at = [later for (_, later) in history[1:]] + [now]
    others = [
        (version, replaced)
        for (version, _), replaced in zip(history, replaced_at, strict=True)
        if version != active
    ]
    oldest_kept = max(len(others) - keep_versions, 0)
    doomed = [version for version, replaced in others[:oldest_kept] if replaced <= now - grace]
    for version in doomed:
        if lock is not None:
            lock.renew()
        store.delete_version(client, version)
    return doomed


def rollback(client: Any, version: str, lock_ttl: float = 30.0) -> str | None:
    """Make an older completed version active again; returns the one it replaces.

    Takes the publish lock, so it cannot race a job's prune (which could be deleting the
    very version being activated) or a job's switch; PublishLockedError while one holds it.
    """
    keys.check_version(version)
    lock = PublishLock(client, lock_ttl)
    lock.acquire(heartbeat=False)
    try:
        if (
            client.sismember(keys.PENDING_VERSIONS, version)
            or client.zscore(keys.VERSIONS, version) is None
        ):
            raise store.VersionNotFoundError(
                f"version {version} does not exist or is not a completed, kept version "
                "(see adrec publish list)"
            )
        return store.activate(client, version)
    finally:
        lock.release()


def version_summaries(client: Any) -> list[tuple[VersionMeta, bool]]:
    """Every kept version's metadata and whether it is active, newest first."""
    active = store.active_version(client)
    summaries = []
    for version in reversed(store.list_versions(client)):
        meta = store.read_meta(client, version)
        if meta is not None:
            summaries.append((meta, version == active))
    return summaries


def used_memory(client: Any) -> int:
    info = client.info("memory")
    if "used_memory" in info:
        return int(info["used_memory"])
    # Redis Cluster answers per node.
    return sum(int(node["used_memory"]) for node in info.values())


def family_memory(
    client: Any, version: str, sample_per_family: int = 200, scan_batch: int = 10_000
) -> dict[str, dict[str, int]]:
    """Keys and estimated bytes per key family of one version.

    Counts are exact (one SCAN over the version); bytes are the mean ``MEMORY USAGE`` of
    up to ``sample_per_family`` keys times the count, which is what an operator needs
    to size Redis for one more kept version.
    """
    prefix_length = len(keys.version_pattern(version)) - 1
    counts: dict[str, int] = {}
    samples: dict[str, list[bytes]] = {}
    for key in client.scan_iter(match=keys.version_pattern(version), count=scan_batch):
        family = key[prefix_length:].split(b":", 1)[0].decode()
        counts[family] = counts.get(family, 0) + 1
        sampled = samples.setdefault(family, [])
        if len(sampled) < sample_per_family:
            sampled.append(key)
    report = {}
    for family, sampled in sorted(samples.items()):
        pipe = client.pipeline(transaction=False)
        for key in sampled:
            pipe.memory_usage(key, samples=0)
        sizes = [size or 0 for size in pipe.execute()]
        report[family] = {
            "keys": counts[family],
            "bytes": round(sum(sizes) / len(sizes) * counts[family]),
        }
    return report
