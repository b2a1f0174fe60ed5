"""Value encodings for everything adrec stores in Redis.

Chosen by measurement: a 500-id recall list as one packed binary string writes and reads
in a fraction of the time ``SADD`` and ``SMEMBERS`` take, and keeps its order (figures in
docs/performance.md).
All numbers are little-endian. Decoders validate lengths and never unpickle.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from adrec.core.dataset import USER_PROFILE_FIELDS

AD_ID_DTYPE = np.dtype("<i4")
CTR_DTYPE = np.dtype("<f2")
FACTOR_DTYPE = np.dtype("<f4")
_INT32_MAX = np.iinfo(np.int32).max


class CodecError(ValueError):
    """Bytes that are not a valid encoding of the expected value."""


# ------------------------------------------------------------------ id lists


# The real data's ad ids run 1..846,811, so three bytes hold them: a 500-id list takes
# 1,501 bytes instead of 2,000, which moves it from jemalloc's 2,048-byte size class to
# the 1,536 one (the saving at full size is in docs/performance.md). Larger ids get four.
_NARROW_WIDTH = 3
_WIDE_WIDTH = 4
_NARROW_LIMIT = 1 << (8 * _NARROW_WIDTH)


def encode_ad_ids(ad_ids: np.ndarray | list[int]) -> bytes:
    """Ordered ad ids (recall and popular lists): a width byte (3 or 4), then each id
    little-endian in that many bytes; 3 whenever every id is below 2**24."""
    ids = _checked_ids(ad_ids)
    return _packed_ids(ids)


def decode_ad_ids(raw: bytes) -> np.ndarray:
    return _unpacked_ids(raw, count=None)[0]


def encode_served_ads(ad_ids: np.ndarray | list[int]) -> bytes:
    """Ad ids as served, each little-endian in 4 bytes with no header: Redis APPENDs one
    answer's ids to those before it."""
    return np.ascontiguousarray(_checked_ids(ad_ids), dtype=AD_ID_DTYPE).tobytes()


def decode_served_ads(raw: bytes) -> np.ndarray:
    if len(raw) % _WIDE_WIDTH:
        raise CodecError(f"served ad ids of {len(raw)} bytes are not a multiple of 4")
    return np.frombuffer(raw, dtype=AD_ID_DTYPE)


def encode_scored_ads(ad_ids: np.ndarray, ctrs: np.ndarray) -> bytes:
    """Offline top-N: the ad id list encoding, then one float16 CTR per id.

    float16 keeps ~3 significant digits of a CTR and halves the CTRs' share of the
    offline family at 1M+ users, which is what fits the full data set in budget.
    """
    ids = _checked_ids(ad_ids)
    scores = np.asarray(ctrs, dtype=np.float64)
    if ids.shape != scores.shape:
        raise ValueError(f"{ids.size} ad ids but {scores.size} CTRs")
    if scores.size and (np.isnan(scores).any() or scores.min() < 0 or scores.max() > 1):
        raise ValueError("CTRs must be probabilities in [0, 1]")
    return _packed_ids(ids) + scores.astype(CTR_DTYPE).tobytes()


def decode_scored_ads(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    width = _id_width(raw)
    per_ad = width + CTR_DTYPE.itemsize
    if (len(raw) - 1) % per_ad:
        raise CodecError(f"scored ad list of {len(raw)} bytes is not 1 + a multiple of {per_ad}")
    count = (len(raw) - 1) // per_ad
    ids, rest = _unpacked_ids(raw, count=count)
    ctrs = np.frombuffer(rest, dtype=CTR_DTYPE).astype(np.float32)
    return ids, ctrs


BID_DTYPE = np.dtype("<f4")


def encode_bids(ad_ids: np.ndarray, bids: np.ndarray) -> bytes:
    """A version's bids per adgroup: ascending ad ids as an ad id list, then one float32
    bid per id. Ads without a bid are left out, not stored as 0."""
    ids = _checked_ids(ad_ids)
    values = np.asarray(bids, dtype=np.float64)
    if ids.shape != values.shape:
        raise ValueError(f"{ids.size} ad ids but {values.size} bids")
    if ids.size > 1 and not (np.diff(ids.astype(np.int64)) > 0).all():
        raise ValueError("bid ad ids must be strictly ascending")
    if values.size and not (np.isfinite(values).all() and values.min() > 0):
        raise ValueError("bids must be positive finite numbers")
    return _packed_ids(ids) + values.astype(BID_DTYPE).tobytes()


def decode_bids(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    width = _id_width(raw)
    per_ad = width + BID_DTYPE.itemsize
    if (len(raw) - 1) % per_ad:
        raise CodecError(f"bid list of {len(raw)} bytes is not 1 + a multiple of {per_ad}")
    ids, rest = _unpacked_ids(raw, count=(len(raw) - 1) // per_ad)
    bids = np.frombuffer(rest, dtype=BID_DTYPE).astype(np.float64)
    if len(ids) > 1 and not (np.diff(ids.astype(np.int64)) > 0).all():
        raise CodecError("bid list ad ids are not strictly ascending")
    if len(bids) and not (np.isfinite(bids).all() and bids.min() > 0):
        raise CodecError("bid list holds a bid that is not a positive finite number")
    return ids, bids


def _checked_ids(ad_ids: np.ndarray | list[int]) -> np.ndarray:
    ids = np.asarray(ad_ids)
    if ids.ndim != 1:
        raise ValueError("ad ids must be a 1-d sequence")
    if ids.size and (ids.min() <= 0 or ids.max() > _INT32_MAX):
        raise ValueError("ad ids must be positive 32-bit integers")
    return ids


def _packed_ids(ids: np.ndarray) -> bytes:
    wide = np.ascontiguousarray(ids, dtype=AD_ID_DTYPE)
    if ids.size and int(ids.max()) >= _NARROW_LIMIT:
        return bytes([_WIDE_WIDTH]) + wide.tobytes()
    narrow = wide.view(np.uint8).reshape(-1, _WIDE_WIDTH)[:, :_NARROW_WIDTH]
    return bytes([_NARROW_WIDTH]) + narrow.tobytes()


def _id_width(raw: bytes) -> int:
    if not raw or raw[0] not in (_NARROW_WIDTH, _WIDE_WIDTH):
        head = raw[:1].hex() or "nothing"
        raise CodecError(f"ad id list must start with a width byte 3 or 4, not {head}")
    return raw[0]


def _unpacked_ids(raw: bytes, count: int | None) -> tuple[np.ndarray, memoryview]:
    """The ids after the width byte (all of them, or ``count``) and the bytes after them."""
    width = _id_width(raw)
    body = memoryview(raw)[1:]
    if count is None:
        if len(body) % width:
            raise CodecError(f"ad id list of {len(body)} bytes is not a multiple of {width}")
        count = len(body) // width
    end = count * width
    if width == _WIDE_WIDTH:
        ids = np.frombuffer(body, dtype=AD_ID_DTYPE, count=count)
    else:
        widened = np.zeros((count, _WIDE_WIDTH), dtype=np.uint8)
        widened[:, :_NARROW_WIDTH] = np.frombuffer(body, dtype=np.uint8, count=end).reshape(
            count, _NARROW_WIDTH
        )
        ids = widened.view(AD_ID_DTYPE).reshape(count)
    return ids, body[end:]


# ------------------------------------------------------------------ user features

_USER_FORMAT = 1
_PROFILE_DTYPE = np.dtype("i1")
_MISSING = -1


@dataclasses.dataclass(frozen=True)
class UserFeatures:
    """One user's profile fields (NaN = missing) and ALS factors (None = no factors)."""

    profile: Mapping[str, float]
    als_factors: np.ndarray | None = None

    @classmethod
    def missing(cls) -> UserFeatures:
        """The features of a user who has neither a profile nor ALS factors."""
        return cls({field: float("nan") for field in USER_PROFILE_FIELDS}, None)

    def columns(self) -> dict[str, np.ndarray]:
        """Profile fields as length-1 arrays, ready for FeatureSpec.encode broadcasting."""
        return {
            field: np.array([self.profile[field]], dtype=np.float64)
            for field in USER_PROFILE_FIELDS
        }


def encode_user_features(features: UserFeatures) -> bytes:
    """Format byte, one int8 per profile field (-1 missing), then float32 ALS factors."""
    unknown = set(features.profile) - set(USER_PROFILE_FIELDS)
    if unknown:
        raise ValueError(f"unknown profile fields {sorted(unknown)}")
    profile = np.full(len(USER_PROFILE_FIELDS), _MISSING, dtype=_PROFILE_DTYPE)
    for i, field in enumerate(USER_PROFILE_FIELDS):
        value = features.profile.get(field, float("nan"))
        if value is None or np.isnan(value):
            continue
        if not 0 <= value <= 127 or value != int(value):
            raise ValueError(f"profile field {field}={value!r} is not an integer in 0..127")
        profile[i] = int(value)
    factors = b""
    if features.als_factors is not None:
        vector = np.asarray(features.als_factors, dtype=np.float64)
        if vector.ndim != 1 or not np.isfinite(vector).all():
            raise ValueError("ALS factors must be a finite 1-d vector")
        factors = vector.astype(FACTOR_DTYPE).tobytes()
    return bytes([_USER_FORMAT]) + profile.tobytes() + factors


def decode_user_features(raw: bytes) -> UserFeatures:
    header = 1 + len(USER_PROFILE_FIELDS)
    if len(raw) < header or raw[0] != _USER_FORMAT:
        raise CodecError("not an adrec user feature record (bad length or format byte)")
    if (len(raw) - header) % FACTOR_DTYPE.itemsize:
        raise CodecError(f"user feature record of {len(raw)} bytes has a torn factor vector")
    profile_codes = np.frombuffer(
        raw, dtype=_PROFILE_DTYPE, count=len(USER_PROFILE_FIELDS), offset=1
    )
    profile = {
        field: float("nan") if code == _MISSING else float(code)
        for field, code in zip(USER_PROFILE_FIELDS, profile_codes.tolist(), strict=True)
    }
    factors = np.frombuffer(raw, dtype=FACTOR_DTYPE, offset=header) if len(raw) > header else None
    return UserFeatures(profile, factors)


# ------------------------------------------------------------------ column tables

_TABLE_MAGIC = b"ADRT"
_TABLE_FORMAT = 1
_HEADER_LEN = struct.Struct("<4sBI")  # magic, format, JSON header length
_TABLE_DTYPES = frozenset({"<i4", "<i8", "<f2", "<f4", "<f8", "|i1", "|u1"})


def encode_table(columns: Mapping[str, np.ndarray]) -> bytes:
    """Named, row-aligned numeric arrays (1-d or 2-d) as one self-describing blob.

    Used for the ad feature table and the ALS category factors: the ranking service
    loads each with one GET and gets plain numpy arrays, no per-ad keys, no pickle.
    """
    if not columns:
        raise ValueError("a table needs at least one column")
    arrays = {name: np.ascontiguousarray(a) for name, a in columns.items()}
    rows = {len(a) for a in arrays.values()}
    if len(rows) != 1:
        raise ValueError(f"table columns have different row counts: {sorted(rows)}")
    specs, payload = [], []
    for name, array in arrays.items():
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        if dtype.str not in _TABLE_DTYPES:
            raise ValueError(f"column {name!r} has unsupported dtype {array.dtype}")
        if array.ndim not in (1, 2):
            raise ValueError(f"column {name!r} must be 1-d or 2-d")
        specs.append({"name": name, "dtype": dtype.str, "shape": list(array.shape)})
        payload.append(array.astype(dtype, copy=False).tobytes())
    header = json.dumps({"rows": rows.pop(), "columns": specs}, separators=(",", ":")).encode()
    return _HEADER_LEN.pack(_TABLE_MAGIC, _TABLE_FORMAT, len(header)) + header + b"".join(payload)


def decode_table(raw: bytes) -> dict[str, np.ndarray]:
    if len(raw) < _HEADER_LEN.size:
        raise CodecError("column table is truncated")
    magic, fmt, header_len = _HEADER_LEN.unpack_from(raw)
    if magic != _TABLE_MAGIC or fmt != _TABLE_FORMAT:
        raise CodecError("not an adrec column table (bad magic or format)")
    start = _HEADER_LEN.size
    try:
        header = json.loads(raw[start : start + header_len])
    except ValueError as exc:
        raise CodecError(f"column table header is not JSON: {exc}") from None
    offset = start + header_len
    out = {}
    for spec in header["columns"]:
        if spec["dtype"] not in _TABLE_DTYPES:
            raise CodecError(f"column {spec['name']!r} has unsupported dtype {spec['dtype']}")
        dtype = np.dtype(spec["dtype"])
        shape = tuple(spec["shape"])
        count = int(np.prod(shape))
        end = offset + count * dtype.itemsize
        if end > len(raw):
            raise CodecError(f"column table is truncated inside column {spec['name']!r}")
        out[spec["name"]] = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(
            shape
        )
        offset = end
    if offset != len(raw):
        raise CodecError(f"column table has {len(raw) - offset} trailing bytes")
    return out


# ------------------------------------------------------------------ JSON documents


def encode_json(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def decode_json(raw: bytes) -> dict[str, Any]:
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise CodecError(f"not a JSON document: {exc}") from None
    if not isinstance(document, dict):
        raise CodecError("expected a JSON object")
    return document
