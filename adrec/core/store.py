"""Reads and writes of adrec data in Redis, each through its key family and that family's codec.

The batch job writes through :class:`VersionWriter` (from the driver or from Spark
executors, one pipelined batch at a time), the CLI updates a single user through
the same writer, and the services read through the same key builders and decoders.

Version lifecycle (the catalog): a version id is allocated from a counter, every key
is written under it, its metadata is written last, and only then does
``adrec:active`` switch to it with one SET - the atomic step readers observe.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from adrec.core import keys
from adrec.core.codecs import UserFeatures
from adrec.core.metadata import VersionMeta
from adrec.core.model import CtrModel

Value = TypeVar("Value")

#: Keys per pipeline round trip: large enough to amortise latency, small enough
#: that one batch of recall lists (about 1.5 KB each) stays a few MB.
WRITE_BATCH = 2000


class VersionNotFoundError(LookupError):
    """The requested data version does not exist or was never completed."""


class VersionWriter:
    """Writes the keys of one version through a Redis (or Redis Cluster) client."""

    def __init__(self, client: Any, version: str, batch: int = WRITE_BATCH):
        self.client = client
        self.version = keys.check_version(version)
        self.batch = batch

    def _put_many(self, entries: Iterable[tuple[bytes, bytes]]) -> int:
        written = 0
        pipe = self.client.pipeline(transaction=False)
        for key, value in entries:
            pipe.set(key, value)
            written += 1
            if written % self.batch == 0:
                pipe.execute()
        pipe.execute()
        return written

    def put_recall_lists(
        self, user_ids: Sequence[int] | np.ndarray, lists: Iterable[np.ndarray]
    ) -> int:
        return self._put_many(
            (keys.RECALL.key(self.version, int(u)), keys.RECALL.encode(ids))
            for u, ids in zip(user_ids, lists, strict=True)
        )

    def put_offline_lists(
        self, user_ids: Sequence[int] | np.ndarray, lists: Iterable[tuple[np.ndarray, np.ndarray]]
    ) -> int:
        return self._put_many(
            (keys.OFFLINE.key(self.version, int(u)), keys.OFFLINE.encode(scored))
            for u, scored in zip(user_ids, lists, strict=True)
        )

    def put_user_features(
        self, user_ids: Sequence[int] | np.ndarray, users: Iterable[UserFeatures]
    ) -> int:
        return self._put_many(
            (keys.USER.key(self.version, int(u)), keys.USER.encode(f))
            for u, f in zip(user_ids, users, strict=True)
        )

    def put_popular(self, scope: str, ad_ids: np.ndarray) -> None:
        self.client.set(keys.POPULAR.key(self.version, scope), keys.POPULAR.encode(ad_ids))

    def put_ad_table(self, table: Mapping[str, np.ndarray]) -> None:
        self.client.set(keys.ADS.key(self.version), keys.ADS.encode(dict(table)))

    def put_category_ads(self, table: Mapping[str, np.ndarray]) -> None:
        self.client.set(keys.CATEGORY_ADS.key(self.version), keys.CATEGORY_ADS.encode(dict(table)))

    def put_cate_factors(self, cate_ids: np.ndarray, factors: np.ndarray) -> None:
        table = {
            "cate_id": np.asarray(cate_ids, dtype=np.int32),
            "factors": np.asarray(factors, dtype=np.float32),
        }
        self.client.set(keys.CATE_FACTORS.key(self.version), keys.CATE_FACTORS.encode(table))

    def put_bids(self, ad_ids: np.ndarray, bids: np.ndarray) -> None:
        self.client.set(keys.BIDS.key(self.version), keys.BIDS.encode((ad_ids, bids)))

    def put_model(self, model: CtrModel) -> None:
        self.client.set(keys.MODEL.key(self.version), keys.MODEL.encode(model))

    def put_sentinels(self, run_id: str, count: int = keys.SENTINEL_COUNT) -> int:
        """Write the version's sentinels (``keys.sentinel_keys``), each holding `run_id`."""
        value = keys.SENTINEL.encode(run_id)
        return self._put_many((key, value) for key in keys.sentinel_keys(self.version, count))

    def put_meta(self, meta: VersionMeta) -> None:
        self.client.set(keys.META.key(self.version), keys.META.encode(meta))


# ------------------------------------------------------------------ catalog


def allocate_version(client: Any) -> str:
    return keys.version_id(int(client.incr(keys.VERSION_SEQUENCE)))


def active_version(client: Any) -> str | None:
    raw = client.get(keys.ACTIVE_VERSION)
    return raw.decode() if raw is not None else None


def read_meta(client: Any, version: str) -> VersionMeta | None:
    return read(client, keys.META, version)


def activate(client: Any, version: str) -> str | None:
    """Point readers at ``version`` (which must be complete); returns the previous one."""
    if read_meta(client, version) is None:
        raise VersionNotFoundError(f"version {version} does not exist or was never completed")
    # Scored by the latest activation, so a version rolled back to counts as recent and the
    # prune after the next publish keeps it while the services still follow it.
    client.zadd(keys.VERSIONS, {version: time.time()})
    previous = client.set(keys.ACTIVE_VERSION, version, get=True)
    return previous.decode() if previous is not None else None


def list_versions(client: Any) -> list[str]:
    """Completed versions, oldest first."""
    members = client.zrange(keys.VERSIONS, 0, -1)
    return sorted((m.decode() for m in members), key=keys.version_sequence)


def versions_by_activation(client: Any) -> list[str]:
    """Completed versions, the least recently activated first."""
    return [version for version, _ in activations(client)]


def activations(client: Any) -> list[tuple[str, float]]:
    """Completed versions with the time (Unix) each was last activated, the least recent first."""
    return [
        (member.decode(), float(score))
        for member, score in client.zrange(keys.VERSIONS, 0, -1, withscores=True)
    ]


def delete_version(client: Any, version: str, scan_batch: int = 5000) -> int:
    """Remove every key of ``version``; refuses the active one."""
    if version == active_version(client):
        raise ValueError(f"refusing to delete the active version {version}")
    client.zrem(keys.VERSIONS, version)
    deleted = 0
    pending: list[bytes] = []
    for key in client.scan_iter(match=keys.version_pattern(version), count=scan_batch):
        pending.append(key)
        if len(pending) >= scan_batch:
            deleted += _unlink(client, pending)
            pending = []
    return deleted + (_unlink(client, pending) if pending else 0)


def _unlink(client: Any, batch: list[bytes]) -> int:
    # One UNLINK per key keeps every command single-key, which Redis Cluster needs.
    pipe = client.pipeline(transaction=False)
    for key in batch:
        pipe.unlink(key)
    return sum(pipe.execute())


# ------------------------------------------------------------------ reads


def read(
    client: Any, family: keys.KeyFamily[Value], version: str, member: int | str | None = None
) -> Value | None:
    """One key's decoded value, None when the key does not exist."""
    raw = client.get(family.key(version, member))
    return family.decode(raw) if raw is not None else None


def read_recall_list(client: Any, version: str, user_id: int) -> np.ndarray | None:
    return read(client, keys.RECALL, version, user_id)


def read_offline_list(
    client: Any, version: str, user_id: int
) -> tuple[np.ndarray, np.ndarray] | None:
    return read(client, keys.OFFLINE, version, user_id)


def read_user_features(client: Any, version: str, user_id: int) -> UserFeatures | None:
    return read(client, keys.USER, version, user_id)


def read_popular(client: Any, version: str, scope: str) -> np.ndarray | None:
    return read(client, keys.POPULAR, version, scope)


def read_ad_table(client: Any, version: str) -> dict[str, np.ndarray] | None:
    return read(client, keys.ADS, version)


def read_cate_factors(client: Any, version: str) -> tuple[np.ndarray, np.ndarray] | None:
    table = read(client, keys.CATE_FACTORS, version)
    return (table["cate_id"], table["factors"]) if table is not None else None


def read_model(client: Any, version: str) -> CtrModel | None:
    return read(client, keys.MODEL, version)
