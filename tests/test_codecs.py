"""Every value codec round-trips, pins its byte layout and rejects torn or foreign bytes."""

import math

import numpy as np
import pytest

from adrec.core import codecs, keys
from adrec.core.features import USER_PROFILE_FIELDS


def test_ad_id_list_layout_is_a_width_byte_then_little_endian_uint24():
    raw = codecs.encode_ad_ids([1, 258, 846811])
    assert raw == b"\x03" + b"\x01\x00\x00" + b"\x02\x01\x00" + b"\xdb\xeb\x0c"
    assert codecs.decode_ad_ids(raw).tolist() == [1, 258, 846811]


def test_ad_id_list_widens_to_int32_when_an_id_needs_it():
    raw = codecs.encode_ad_ids([5, 2**24])
    assert raw == b"\x04" + b"\x05\x00\x00\x00" + b"\x00\x00\x00\x01"
    assert codecs.decode_ad_ids(raw).tolist() == [5, 2**24]
    assert codecs.decode_ad_ids(codecs.encode_ad_ids([2**31 - 1])).tolist() == [2**31 - 1]


def test_ad_id_list_round_trip_keeps_order_and_duplicates_out():
    ids = np.random.default_rng(0).permutation(np.arange(1, 501))
    decoded = codecs.decode_ad_ids(codecs.encode_ad_ids(ids))
    assert decoded.dtype == np.int32
    assert decoded.tolist() == ids.tolist()
    assert len(codecs.encode_ad_ids(ids)) == 1 + 3 * 500


def test_ad_id_list_accepts_strided_views():
    every_other = np.arange(1, 11, dtype=np.int32)[::2]
    assert codecs.decode_ad_ids(codecs.encode_ad_ids(every_other)).tolist() == [1, 3, 5, 7, 9]
    ids, _ = codecs.decode_scored_ads(codecs.encode_scored_ads(every_other, np.zeros(5)))
    assert ids.tolist() == [1, 3, 5, 7, 9]


def test_empty_ad_id_list():
    assert codecs.decode_ad_ids(codecs.encode_ad_ids([])).tolist() == []


@pytest.mark.parametrize("bad", [[0], [-3], [2**31], [[1, 2]]])
def test_ad_id_list_rejects_out_of_range(bad):
    with pytest.raises(ValueError):
        codecs.encode_ad_ids(bad)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"\x03\x01\x00\x00\x02", "multiple of 3"),
        (b"\x04\x01\x00\x00", "multiple of 4"),
        (b"\x01\x00\x00\x00", "width byte 3 or 4, not 01"),
        (b"", "width byte 3 or 4, not nothing"),
    ],
)
def test_ad_id_list_rejects_torn_or_foreign_bytes(raw, problem):
    with pytest.raises(codecs.CodecError, match=problem):
        codecs.decode_ad_ids(raw)


def test_scored_ads_layout_and_round_trip():
    raw = codecs.encode_scored_ads(np.array([7, 9]), np.array([0.5, 0.25]))
    assert raw == b"\x03\x07\x00\x00\x09\x00\x00" + np.array([0.5, 0.25], "<f2").tobytes()
    ids, ctrs = codecs.decode_scored_ads(raw)
    assert ids.tolist() == [7, 9]
    assert ctrs.tolist() == [0.5, 0.25]


def test_scored_ads_keep_three_significant_digits():
    ctrs = np.random.default_rng(1).uniform(0.0005, 0.4, 50)
    _, decoded = codecs.decode_scored_ads(codecs.encode_scored_ads(np.arange(1, 51), ctrs))
    np.testing.assert_allclose(decoded, ctrs, rtol=1e-3)


def test_scored_ads_validation():
    with pytest.raises(ValueError, match="2 ad ids but 1 CTRs"):
        codecs.encode_scored_ads(np.array([1, 2]), np.array([0.1]))
    with pytest.raises(ValueError, match="probabilities"):
        codecs.encode_scored_ads(np.array([1]), np.array([1.5]))
    with pytest.raises(codecs.CodecError, match="1 \\+ a multiple of 5"):
        codecs.decode_scored_ads(b"\x03" + b"\x00" * 7)
    with pytest.raises(codecs.CodecError, match="width byte"):
        codecs.decode_scored_ads(b"\x00" * 6)


def test_bids_layout_and_round_trip():
    raw = keys.BIDS.encode((np.array([7, 9]), np.array([1.5, 0.25])))
    assert raw == b"\x03\x07\x00\x00\x09\x00\x00" + b"\x00\x00\xc0\x3f" + b"\x00\x00\x80\x3e"
    ids, bids = keys.BIDS.decode(raw)
    assert ids.tolist() == [7, 9]
    assert bids.tolist() == [1.5, 0.25]


def test_bids_validation():
    with pytest.raises(ValueError, match="2 ad ids but 1 bids"):
        codecs.encode_bids(np.array([1, 2]), np.array([0.1]))
    with pytest.raises(ValueError, match="positive finite"):
        codecs.encode_bids(np.array([1]), np.array([0.0]))
    with pytest.raises(ValueError, match="ascending"):
        codecs.encode_bids(np.array([2, 1]), np.array([1.0, 1.0]))
    with pytest.raises(codecs.CodecError, match="1 \\+ a multiple of 7"):
        codecs.decode_bids(b"\x03" + b"\x00" * 8)
    negative = b"\x03\x01\x00\x00" + np.array([-1.0], "<f4").tobytes()
    with pytest.raises(codecs.CodecError, match="positive finite"):
        codecs.decode_bids(negative)


def test_user_features_layout_and_round_trip():
    profile = dict.fromkeys(USER_PROFILE_FIELDS, float("nan"))
    profile.update(cms_segid=96, cms_group_id=12, gender=2, age_level=0, occupation=1)
    factors = np.array([0.5, -1.25], dtype=np.float32)
    raw = codecs.encode_user_features(codecs.UserFeatures(profile, factors))
    assert raw[:9] == bytes([1, 96, 12, 2, 0, 0xFF, 0xFF, 1, 0xFF])
    assert raw[9:] == factors.astype("<f4").tobytes()
    decoded = codecs.decode_user_features(raw)
    assert decoded.profile["cms_segid"] == 96
    assert decoded.profile["age_level"] == 0
    assert math.isnan(decoded.profile["pvalue_level"])
    assert decoded.als_factors.tolist() == [0.5, -1.25]


def test_user_features_without_profile_or_factors():
    raw = codecs.encode_user_features(codecs.UserFeatures.missing())
    assert raw == bytes([1]) + b"\xff" * len(USER_PROFILE_FIELDS)
    decoded = codecs.decode_user_features(raw)
    assert decoded.als_factors is None
    assert all(math.isnan(v) for v in decoded.profile.values())


def test_user_features_validation():
    with pytest.raises(ValueError, match="unknown profile fields"):
        codecs.encode_user_features(codecs.UserFeatures({"shoe_size": 3}))
    with pytest.raises(ValueError, match="age_level"):
        codecs.encode_user_features(codecs.UserFeatures({"age_level": 2.5}))
    with pytest.raises(codecs.CodecError, match="format byte"):
        codecs.decode_user_features(b"\x02" + b"\x00" * 8)
    with pytest.raises(codecs.CodecError, match="torn"):
        codecs.decode_user_features(bytes([1]) + b"\x00" * 8 + b"\x00\x00")


def test_table_round_trip_mixed_dtypes_and_2d():
    table = {
        "adgroup_id": np.array([3, 1, 2], dtype=np.int32),
        "price": np.array([1.5, 2.0, 1e8], dtype=np.float32),
        "ctr_ad": np.array([0.1, 0.2, 0.3], dtype=np.float64),
        "factors": np.arange(6, dtype=np.float32).reshape(3, 2),
    }
    raw = codecs.encode_table(table)
    assert raw.startswith(b"ADRT\x01")
    decoded = codecs.decode_table(raw)
    assert list(decoded) == list(table)
    for name, array in table.items():
        assert decoded[name].dtype == array.dtype
        np.testing.assert_array_equal(decoded[name], array)


def test_table_validation():
    with pytest.raises(ValueError, match="different row counts"):
        codecs.encode_table({"a": np.zeros(2), "b": np.zeros(3)})
    with pytest.raises(ValueError, match="unsupported dtype"):
        codecs.encode_table({"a": np.array(["x"])})
    raw = codecs.encode_table({"a": np.arange(4, dtype=np.int32)})
    with pytest.raises(codecs.CodecError, match="truncated"):
        codecs.decode_table(raw[:-1])
    with pytest.raises(codecs.CodecError, match="trailing"):
        codecs.decode_table(raw + b"\x00")
    with pytest.raises(codecs.CodecError, match="magic"):
        codecs.decode_table(b"\x80\x04\x95" + raw[3:])


def test_json_documents():
    raw = codecs.encode_json({"b": 1, "a": [1, 2]})
    assert raw == b'{"a":[1,2],"b":1}'
    assert codecs.decode_json(raw) == {"a": [1, 2], "b": 1}
    with pytest.raises(codecs.CodecError):
        codecs.decode_json(b"[1]")
    with pytest.raises(ValueError):
        codecs.encode_json({"x": float("nan")})
