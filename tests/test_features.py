"""The shared feature encoder: exact layout, missing levels, broadcasting, determinism."""

import numpy as np
import pytest

from adrec.core.dataset import PIDS, USER_PROFILE
from adrec.core.features import (
    COURSE,
    FULL,
    TRANSFORM_CONSTANTS,
    USER_PROFILE_FIELDS,
    als_affinity,
    feature_spec,
    profile_levels,
)

NAN = float("nan")


def rows(n=3, **overrides):
    columns = {
        "pid": np.array(["430548_1007", "430539_1007", "430548_1007"][:n]),
        "cms_segid": np.zeros(n),
        "cms_group_id": np.array([0, 12, NAN][:n]),
        "gender": np.array([1, 2, NAN][:n]),
        "age_level": np.array([0, 6, 3][:n]),
        "pvalue_level": np.array([NAN, 1, 3][:n]),
        "shopping_level": np.array([1, 3, NAN][:n]),
        "occupation": np.array([0, 1, 0][:n]),
        "new_user_class_level": np.array([4, NAN, 1][:n]),
        "price": np.array([170.0, 1e8, 0.01][:n]),
        "ctr_ad": np.array([0.05, 0.5, NAN][:n]),
        "ctr_cate": np.array([0.04, 0.01, 0.1][:n]),
        "ctr_brand": np.array([0.02, 0.03, 0.05][:n]),
        "als_affinity": np.array([1.5, NAN, -0.5][:n]),
    }
    columns.update(overrides)
    return columns


def hot(spec, matrix, row):
    return {n for n, v in zip(spec.feature_names, matrix[row], strict=True) if v == 1.0}


def test_course_layout_is_pinned():
    names = COURSE.feature_names
    assert names[:2] == [f"pid={p}" for p in PIDS]
    assert names[2:16] == [f"cms_group_id={i}" for i in range(13)] + ["cms_group_id=missing"]
    assert names[-1] == "price:linear_capped"
    assert COURSE.dim == 2 + 14 + 3 + 8 + 4 + 3 + 4 + 5 + 1


def test_full_extends_course_with_the_extra_features():
    assert FULL.feature_names[: COURSE.dim] == COURSE.feature_names
    assert FULL.feature_names[COURSE.dim :] == [
        "price:log_scaled",
        "als_affinity:zero_if_missing",
        "als_affinity:missing",
        "ctr_ad:logit",
        "ctr_cate:logit",
        "ctr_brand:logit",
    ]


def test_one_hot_levels_and_missing_slots():
    x = COURSE.encode(rows())
    assert x.dtype == np.float32 and x.shape == (3, COURSE.dim)
    assert hot(COURSE, x, 0) == {
        "pid=430548_1007",
        "cms_group_id=0",
        "gender=1",
        "age_level=0",
        "shopping_level=1",
        "occupation=0",
        "pvalue_level=missing",
        "new_user_class_level=4",
    }
    assert hot(COURSE, x, 2) >= {"cms_group_id=missing", "gender=missing", "shopping_level=missing"}
    # every categorical block has exactly one hot slot per row
    assert (x[:, :-1].sum(axis=1) == 8).all()


def test_out_of_domain_values_fall_into_missing():
    x = COURSE.encode(rows(1, age_level=np.array([99.0]), gender=np.array([-1.0])))
    assert {"age_level=missing", "gender=missing"} <= hot(COURSE, x, 0)


def test_numeric_transforms():
    x = FULL.encode(rows())
    col = {name: i for i, name in enumerate(FULL.feature_names)}
    np.testing.assert_allclose(x[:, col["price:linear_capped"]], [0.017, 1.0, 1e-6], rtol=1e-5)
    assert x[1, col["price:log_scaled"]] == pytest.approx(1.0)
    assert x[0, col["ctr_ad:logit"]] == pytest.approx(np.log(0.05 / 0.95), rel=1e-6)
    assert x[2, col["ctr_ad:logit"]] == 0.0  # missing CTR -> logit(0.5)
    assert x[:, col["als_affinity:zero_if_missing"]].tolist() == [1.5, 0.0, -0.5]
    assert x[:, col["als_affinity:missing"]].tolist() == [0.0, 1.0, 0.0]


def test_user_broadcast_equals_row_by_row_encoding():
    many = rows()
    user = {f: np.array([many[f][1]]) for f in USER_PROFILE_FIELDS}
    broadcast = FULL.encode({**many, **user, "pid": "430539_1007"})
    explicit = FULL.encode(
        {
            **many,
            **{f: np.repeat(v, 3) for f, v in user.items()},
            "pid": np.repeat("430539_1007", 3),
        }
    )
    np.testing.assert_array_equal(broadcast, explicit)


def test_encoding_is_deterministic():
    np.testing.assert_array_equal(FULL.encode(rows()), FULL.encode(rows()))


def test_spec_ids_are_pinned():
    # Published models carry these ids; a change here refuses every model trained before it,
    # so it must be deliberate (and SCHEMA_VERSION bumped when the semantics change).
    assert COURSE.spec_id == "course-v1-83e1fbcbae14"
    assert FULL.spec_id == "full-v1-28f149313532"


@pytest.mark.parametrize("constant", sorted(TRANSFORM_CONSTANTS))
def test_every_transform_constant_is_part_of_the_spec_id(monkeypatch, constant):
    before = {spec.name: spec.spec_id for spec in (COURSE, FULL)}
    # A CTR of 1 meets the clipping bound and a NaN the missing value.
    inputs = rows(ctr_ad=np.array([0.05, 1.0, NAN]))
    encoded = FULL.encode(inputs)
    monkeypatch.setitem(TRANSFORM_CONSTANTS, constant, TRANSFORM_CONSTANTS[constant] * 0.5)
    assert FULL.spec_id != before["full"] and COURSE.spec_id != before["course"]
    # and each constant really is used: halving it changes some encoded value
    assert not np.array_equal(FULL.encode(inputs), encoded)


def test_one_hot_index_finds_a_levels_weight_slot():
    for spec in (COURSE, FULL):
        for pid in PIDS:
            assert spec.feature_names[spec.one_hot_index("pid", pid)] == f"pid={pid}"
        assert spec.feature_names[spec.one_hot_index("age_level", 6)] == "age_level=6"
    assert COURSE.one_hot_index("age_level", 7) is None
    assert COURSE.one_hot_index("pid", "1_1") is None
    assert COURSE.one_hot_index("price", 1) is None


def test_profile_levels_are_the_published_value_domains():
    for column in USER_PROFILE.columns:
        if column.name in {block.column for block in COURSE.blocks}:
            low, high = column.domain
            assert profile_levels(column.name) == tuple(range(low, high + 1))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="unknown pid"):
        COURSE.encode(rows(1, pid=np.array(["999_1"])))
    missing = rows()
    del missing["price"]
    with pytest.raises(ValueError, match=r"needs input columns \['price'\]"):
        COURSE.encode(missing)
    with pytest.raises(ValueError, match="column 'price' has 2 rows"):
        COURSE.encode(rows(3, price=np.array([1.0, 2.0])))
    with pytest.raises(ValueError, match="unknown feature set"):
        feature_spec("deep")


def test_als_affinity_lookup():
    cate_ids = np.array([5, 9, 40])
    cate_factors = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)
    user = np.array([2.0, 3.0])
    result = als_affinity(user, np.array([40, 5, 7, 9]), cate_ids, cate_factors)
    assert result[[0, 1, 3]].tolist() == [5.0, 2.0, 3.0]
    assert np.isnan(result[2])  # category without factors
    per_row = als_affinity(
        np.array([[1.0, 1.0], [2.0, 0.0]]), np.array([9, 40]), cate_ids, cate_factors
    )
    assert per_row.tolist() == [1.0, 2.0]


def test_price_levels_cut_at_the_edges_and_keep_missing_apart():
    from adrec.core.features import PRICE_LEVEL_EDGES, PRICE_LEVELS, price_levels

    prices = np.array([0.0, 10.0, 10.01, 150.0, 2000.0, 2001.0, NAN])
    assert price_levels(prices).tolist() == [0, 0, 1, 4, 7, 8, 9]
    assert len(PRICE_LEVEL_EDGES) + 2 == PRICE_LEVELS


def test_price_crosses_set_the_slot_of_the_users_level_and_the_ads_price_level():
    from adrec.core.features import BEHAVIOUR

    inputs = {column: np.zeros(2) for column in BEHAVIOUR.input_columns}
    inputs.update(pid="430548_1007", price=np.array([150.0, 5.0]))
    inputs.update(pvalue_level=np.array([2.0, NAN]), age_level=np.array([3.0, 3.0]))
    encoded = BEHAVIOUR.encode(inputs)
    names = BEHAVIOUR.feature_names
    first = {n for n, v in zip(names, encoded[0], strict=True) if v and "price_level" in n}
    second = {n for n, v in zip(names, encoded[1], strict=True) if v and "price_level" in n}
    assert first == {
        "age_level=3*price_level=4",
        "gender=missing*price_level=4",
        "pvalue_level=2*price_level=4",
        "shopping_level=missing*price_level=4",
    }
    assert "pvalue_level=missing*price_level=0" in second
    assert "age_level=3*price_level=0" in second


def test_category_cross_slots_are_a_fixed_hash_of_field_level_and_category():
    from adrec.core.features import BEHAVIOUR, CategoryCross

    (cross,) = [block for block in BEHAVIOUR.blocks if isinstance(block, CategoryCross)]
    levels = [np.array([1.0, NAN]) for _ in cross.fields]
    # Pinned: a model's weights for these slots mean nothing under another hash.
    assert cross.slots(*levels, np.array([6261.0, 6261.0])).tolist() == [
        [239, 8, 97, 104, 44, 225, 159],
        [2, 218, 164, 169, 7, 72, 134],
    ]
    assert cross.slots(*[v[:1] for v in levels], np.array([6262.0])).tolist() == [
        [93, 163, 19, 91, 189, 78, 202]
    ]
    inputs = {column: np.ones(1) for column in BEHAVIOUR.input_columns}
    inputs.update(pid="430548_1007", cate_id=np.array([6261.0]))
    encoded = BEHAVIOUR.encode(inputs)[0]
    start = BEHAVIOUR.feature_names.index("profile*cate_id#0")
    block = encoded[start : start + cross.buckets]
    assert block.sum() == len(cross.fields)
    assert sorted(np.flatnonzero(block).tolist()) == sorted({239, 8, 97, 104, 44, 225, 159})


def test_crossed_set_has_its_own_pinned_id_and_the_others_keep_theirs():
    from adrec.core.features import BEHAVIOUR, CATEGORY_CROSS_BUCKETS, PRICE_LEVELS

    assert BEHAVIOUR.spec_id == "behaviour-v1-da56d9a3a16d"
    assert BEHAVIOUR.dim == FULL.dim + 30 + (8 + 3 + 4 + 4) * PRICE_LEVELS + CATEGORY_CROSS_BUCKETS


def test_one_users_level_is_the_encoders_level():
    from adrec.core.features import BEHAVIOUR, CategoryCross, level_of, level_slots

    (cross,) = [block for block in BEHAVIOUR.blocks if isinstance(block, CategoryCross)]
    values = [NAN, -1.0, 0.0, 1.0, 2.0, 2.5, 3.0, 5.0, 12.0, 13.0, 200.0]
    for levels in cross.levels:
        by_encoder = level_slots(levels, np.array(values)).tolist()
        assert [level_of(levels, value) for value in values] == by_encoder
