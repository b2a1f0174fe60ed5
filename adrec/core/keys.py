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

Every key embeds the version, and every read touches one key, so the layout works
on Redis Cluster unchanged. Curly braces never appear in keys: they would be hash
tags and pin a whole version to one cluster slot.

Each :class:`KeyFamily` carries the codec of its values, so a writer and every reader
(the job's, the CLI's, the services' asyncio reads) pair a key with its encoding in one
place: ``family.encode(value)`` and ``family.decode(raw)``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import numpy as np

from adrec.core import codecs
from adrec.core.codecs import UserFeatures
from adrec.core.metadata import VersionMeta
from adrec.core.model import CtrModel

PREFIX = "adrec"

ACTIVE_VERSION = f"{PREFIX}:active".encode()
VERSIONS = f"{PREFIX}:versions".encode()
VERSION_SEQUENCE = f"{PREFIX}:version_seq".encode()
PUBLISH_LOCK = f"{PREFIX}:publish_lock".encode()
PENDING_VERSIONS = f"{PREFIX}:pending".encode()

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

META = KeyFamily("meta", None, METADATA)
RECALL = KeyFamily("recall", "user_id", AD_IDS)
OFFLINE = KeyFamily("offline", "user_id", SCORED_ADS)
USER = KeyFamily("user", "user_id", USER_FEATURES)
POPULAR = KeyFamily("popular", "scope", AD_IDS)
ADS = KeyFamily("ads", None, COLUMN_TABLE)
CATE_FACTORS = KeyFamily("cate_factors", None, COLUMN_TABLE)
MODEL = KeyFamily("model", None, MODEL_ARTIFACT)

VERSIONED_FAMILIES: tuple[KeyFamily[Any], ...] = (
    META,
    RECALL,
    OFFLINE,
    USER,
    POPULAR,
    ADS,
    CATE_FACTORS,
    MODEL,
)

#: Popular-list scope covering every placement.
POPULAR_ALL = "all"


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
