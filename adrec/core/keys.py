"""Every Redis key adrec reads or writes, built in one place.

Layout (``V`` is a data version such as ``v17``)::

    adrec:active                  -> active version id (string)
    adrec:versions                -> sorted set: version id scored by creation time
    adrec:version_seq             -> counter that allocates version ids
    adrec:publish_lock            -> held by the one job allowed to publish at a time
    adrec:pending                 -> set of versions being written (orphans of killed runs)
    adrec:V:meta                  -> version metadata (JSON)
    adrec:V:recall:<user_id>      -> recall list (packed int32 ad ids)
    adrec:V:offline:<user_id>     -> offline top-N (packed int32 ids + float16 CTRs)
    adrec:V:user:<user_id>        -> user profile + ALS factors (packed struct)
    adrec:V:popular:<scope>       -> popular fallback list, scope "all" or a pid
    adrec:V:ads                   -> ad feature table (column table)
    adrec:V:cate_factors          -> ALS category factors (column table)
    adrec:V:model                 -> CTR model artifact (JSON)

Every key embeds the version, and every read touches one key, so the layout works
on Redis Cluster unchanged. Curly braces never appear in keys: they would be hash
tags and pin a whole version to one cluster slot.
"""

from __future__ import annotations

import dataclasses
import re

PREFIX = "adrec"

ACTIVE_VERSION = f"{PREFIX}:active".encode()
VERSIONS = f"{PREFIX}:versions".encode()
VERSION_SEQUENCE = f"{PREFIX}:version_seq".encode()
PUBLISH_LOCK = f"{PREFIX}:publish_lock".encode()
PENDING_VERSIONS = f"{PREFIX}:pending".encode()

_VERSION_RE = re.compile(r"v[1-9][0-9]{0,17}")


@dataclasses.dataclass(frozen=True)
class KeyFamily:
    """A kind of per-version key; ``member`` names what distinguishes its keys, if anything."""

    name: str
    member: str | None
    value: str

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


META = KeyFamily("meta", None, "version metadata, JSON")
RECALL = KeyFamily("recall", "user_id", "recall list, packed little-endian int32 ad ids")
OFFLINE = KeyFamily(
    "offline", "user_id", "offline top-N, packed int32 ad ids then float16 CTRs"
)
USER = KeyFamily("user", "user_id", "user profile fields and ALS factors, packed struct")
POPULAR = KeyFamily("popular", "scope", "popular fallback ad ids, packed int32; scope all|pid")
ADS = KeyFamily("ads", None, "ad feature table, column table")
CATE_FACTORS = KeyFamily("cate_factors", None, "ALS category factors, column table")
MODEL = KeyFamily("model", None, "CTR model artifact, JSON")

VERSIONED_FAMILIES: tuple[KeyFamily, ...] = (
    META, RECALL, OFFLINE, USER, POPULAR, ADS, CATE_FACTORS, MODEL,
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
