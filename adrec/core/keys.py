"""Every Redis key adrec reads or writes, built in one place.

Layout (``V`` is a data version such as ``v17``)::

    adrec:active                  -> active version id (string)
    adrec:versions                -> sorted set: version id scored by creation time
    adrec:version_seq             -> counter that allocates version ids
    adrec:publish_lock            -> held by the one job allowed to publish at a time
    adrec:pending                 -> set of versions being written (orphans of killed runs)
    adrec:V:meta                  -> version metadata (JSON)
    adrec:V:recall:<user_id>      -> recall list (packed 3- or 4-byte ad ids)
    adrec:V:offline:<user_id>     -> offline top-N (packed ad ids + float16 CTRs)
    adrec:V:user:<user_id>        -> user profile + ALS factors (packed struct)
    adrec:V:popular:<scope>       -> popular fallback list, scope "all" or a pid
    adrec:V:ads                   -> ad feature table (column table)
    adrec:V:cate_factors          -> ALS category factors (column table)
    adrec:V:model                 -> CTR model artifact (JSON)
    adrec:V:category_ads          -> each category's leading ads (column table), for interest
    adrec:V:bids                  -> bid per adgroup (packed ad ids + float32), when given
    adrec:V:sentinel:<number>     -> the publishing run's id, one key per slot range (below)

Real-time state lives outside every version, so a publish, a rollback or a prune never
resets it; each key carries a TTL::

    adrec:events                  -> the event log (a stream of encoded events)
    adrec:rt:user:<user_id>       -> a user's real-time state (JSON: interest and counts)
    adrec:rt:ad:<ad_id>           -> an ad's impression and click counts (JSON)

The ad-serving controls live outside every version too, so a publish never undoes a pause
(values in :mod:`adrec.core.adstate`)::

    adrec:ad_state                -> paused and scheduled adgroups, campaigns, customers (JSON)
    adrec:ad_state_seq            -> id of the last change applied, checked per request
    adrec:ad_state_history        -> every change (a stream), newest last
    adrec:served:<user_id>:<slice> -> ads the gateway returned to the user in one slice of
                                     time (packed 4-byte ad ids, appended), TTL

Every key embeds the version, and every read touches one key, so the layout works
on Redis Cluster unchanged. Curly braces never appear in keys: they would be hash
tags and pin a whole version to one cluster slot.

Each :class:`KeyFamily` carries the codec of its values, so a writer and every reader
(the job's, the CLI's, the services' asyncio reads) pair a key with its encoding in one
place: ``family.encode(value)`` and ``family.decode(raw)``.

A version's sentinels are :data:`SENTINEL_COUNT` small keys spread over the Redis Cluster
hash slots, one in each equal range of them, so every node of a cluster holds some of every
version's. The services read them every poll: a sentinel gone means the node holding it
lost its data (restarted empty, flushed), which no other read would reveal.
"""

from __future__ import annotations

import binascii
import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import numpy as np

from adrec.core import codecs, realtime
from adrec.core.codecs import UserFeatures
from adrec.core.metadata import VersionMeta
from adrec.core.model import CtrModel

PREFIX = "adrec"

ACTIVE_VERSION = f"{PREFIX}:active".encode()
VERSIONS = f"{PREFIX}:versions".encode()
VERSION_SEQUENCE = f"{PREFIX}:version_seq".encode()
PUBLISH_LOCK = f"{PREFIX}:publish_lock".encode()
PENDING_VERSIONS = f"{PREFIX}:pending".encode()
EVENT_LOG = f"{PREFIX}:events".encode()
AD_STATE = f"{PREFIX}:ad_state".encode()
AD_STATE_SEQ = f"{PREFIX}:ad_state_seq".encode()
AD_STATE_HISTORY = f"{PREFIX}:ad_state_history".encode()

_VERSION_RE = re.compile(r"v[1-9][0-9]{0,17}")


Value = TypeVar("Value")


@dataclasses.dataclass(frozen=True)
class Codec(Generic[Value]):
    """How one family's values become bytes and back; ``describe`` says it in words."""

    describe: str
    encode: Callable[[Value], bytes]
    decode: Callable[[bytes], Value]


@dataclasses.dataclass(frozen=True)
class KeyFamily(Generic[Value]):
    """A kind of per-version key; ``member`` names what distinguishes its keys, if anything."""

    name: str
    member: str | None
    codec: Codec[Value]

    def encode(self, value: Value) -> bytes:
        return self.codec.encode(value)

    def decode(self, raw: bytes) -> Value:
        """The stored value; raises :class:`codecs.CodecError` on bytes it cannot be."""
        return self.codec.decode(raw)

    def key(self, version: str, member: int | str | None = None) -> bytes:
        check_version(version)
        if (member is None) != (self.member is None):
            want = f"a {self.member}" if self.member else "no member"
            raise ValueError(f"key family {self.name!r} takes {want}")
        if member is None:
            return f"{PREFIX}:{version}:{self.name}".encode()
        if isinstance(member, bool) or (isinstance(member, int) and member <= 0):
            raise ValueError(f"{self.member} must be a positive integer, got {member!r}")
        text = str(member)
        if not text or any(c in text for c in ":{} \n"):
            raise ValueError(f"{self.member} {text!r} cannot be part of a key")
        return f"{PREFIX}:{version}:{self.name}:{text}".encode()


AD_IDS = Codec[np.ndarray](
    "ad ids in order: a width byte (3 or 4), then each id little-endian in that many bytes",
    codecs.encode_ad_ids,
    codecs.decode_ad_ids,
)
SCORED_ADS = Codec[tuple[np.ndarray, np.ndarray]](
    "ad ids as in an ad id list, then one float16 CTR per id",
    lambda scored: codecs.encode_scored_ads(*scored),
    codecs.decode_scored_ads,
)
USER_FEATURES = Codec[UserFeatures](
    "format byte, one int8 per profile field (-1 missing), then float32 ALS factors",
    codecs.encode_user_features,
    codecs.decode_user_features,
)
COLUMN_TABLE = Codec[dict[str, np.ndarray]](
    "column table: magic, format, JSON header of names, dtypes and shapes, then the arrays",
    codecs.encode_table,
    codecs.decode_table,
)
METADATA = Codec[VersionMeta](
    "version metadata, JSON",
    VersionMeta.to_json,
    VersionMeta.from_json,
)
MODEL_ARTIFACT = Codec[CtrModel](
    "CTR model artifact, JSON",
    CtrModel.to_json,
    CtrModel.from_json,
)
BID_LIST = Codec[tuple[np.ndarray, np.ndarray]](
    "ascending ad ids as in an ad id list, then one float32 bid per id",
    lambda bids: codecs.encode_bids(*bids),
    codecs.decode_bids,
)
RUN_ID = Codec[str](
    "run id of the publishing run, UTF-8",
    str.encode,
    bytes.decode,
)

META = KeyFamily("meta", None, METADATA)
RECALL = KeyFamily("recall", "user_id", AD_IDS)
OFFLINE = KeyFamily("offline", "user_id", SCORED_ADS)
USER = KeyFamily("user", "user_id", USER_FEATURES)
POPULAR = KeyFamily("popular", "scope", AD_IDS)
ADS = KeyFamily("ads", None, COLUMN_TABLE)
CATE_FACTORS = KeyFamily("cate_factors", None, COLUMN_TABLE)
MODEL = KeyFamily("model", None, MODEL_ARTIFACT)
CATEGORY_ADS = KeyFamily("category_ads", None, COLUMN_TABLE)
#: Absent from a version whose input had no bids file.
BIDS = KeyFamily("bids", None, BID_LIST)
SENTINEL = KeyFamily("sentinel", "number", RUN_ID)

VERSIONED_FAMILIES: tuple[KeyFamily[Any], ...] = (
    META,
    RECALL,
    OFFLINE,
    USER,
    POPULAR,
    ADS,
    CATE_FACTORS,
    MODEL,
    CATEGORY_ADS,
    BIDS,
    SENTINEL,
)

#: Popular-list scope covering every placement.
POPULAR_ALL = "all"


@dataclasses.dataclass(frozen=True)
class StateFamily:
    """Real-time state of one kind, one value per member, outside every version.

    The stream job writes values only through :class:`realtime.StateWriter`'s script.
    """

    name: str
    member: str

    def decode(self, raw: bytes) -> realtime.RealtimeState:
        return realtime.decode_state(raw)

    def key(self, member: int) -> bytes:
        if isinstance(member, bool) or not isinstance(member, int) or member <= 0:
            raise ValueError(f"{self.member} must be a positive integer, got {member!r}")
        return f"{PREFIX}:rt:{self.name}:{member}".encode()


REALTIME_USER = StateFamily("user", "user_id")
REALTIME_AD = StateFamily("ad", "ad_id")


def served_key(user_id: int, slice_of: int) -> bytes:
    """The ads the gateway returned to a user in one slice of time (``adstate.ServedAds``);
    values: :func:`codecs.encode_served_ads`."""
    if isinstance(user_id, bool) or not isinstance(user_id, int) or user_id <= 0:
        raise ValueError(f"user_id must be a positive integer, got {user_id!r}")
    if isinstance(slice_of, bool) or not isinstance(slice_of, int) or slice_of < 0:
        raise ValueError(f"slice must be a non-negative integer, got {slice_of!r}")
    return f"{PREFIX}:served:{user_id}:{slice_of}".encode()


def check_version(version: str) -> str:
    if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
        raise ValueError(f"data version must look like 'v17', got {version!r}")
    return version


def version_id(sequence: int) -> str:
    """The version id allocated from the ``adrec:version_seq`` counter value."""
    if sequence <= 0:
        raise ValueError(f"version sequence must be positive, got {sequence}")
    return f"v{sequence}"


def version_sequence(version: str) -> int:
    return int(check_version(version)[1:])


def version_pattern(version: str) -> bytes:
    """SCAN pattern matching every key of one version (for deleting old versions)."""
    return f"{PREFIX}:{check_version(version)}:*".encode()


#: Hash slots of Redis Cluster.
CLUSTER_SLOTS = 16384
#: Sentinels per version: each cluster node of a few holds several, and reading all of them
#: is one small pipelined round trip per node.
SENTINEL_COUNT = 64


def key_slot(key: bytes) -> int:
    """The Redis Cluster hash slot of `key` (CRC16-XMODEM of the whole key: adrec keys
    carry no hash tags)."""
    if b"{" in key:
        raise ValueError(f"key {key!r} holds a hash tag; adrec keys never do")
    return binascii.crc_hqx(key, 0) % CLUSTER_SLOTS


@functools.lru_cache(maxsize=64)
def sentinel_keys(version: str, count: int = SENTINEL_COUNT) -> tuple[bytes, ...]:
    """The sentinel keys of `version`: for each of `count` equal ranges of the hash slots
    in order, the key ``adrec:V:sentinel:<n>`` of the smallest n whose slot falls in it."""
    if not 0 < count <= CLUSTER_SLOTS:
        raise ValueError(f"sentinel count must be in 1..{CLUSTER_SLOTS}, got {count}")
    found: dict[int, bytes] = {}
    number = 0
    while len(found) < count:
        number += 1
        key = SENTINEL.key(version, number)
        found.setdefault(key_slot(key) * count // CLUSTER_SLOTS, key)
    return tuple(found[index] for index in range(count))
