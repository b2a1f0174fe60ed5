"""The shared feature encoder: exact layout, missing levels, broadcasting, determinism."""

import numpy as np
import pytest

from adrec.core.features import (
    COURSE,
    FULL,
    KNOWN_PIDS,
    USER_PROFILE_FIELDS,
    als_affinity,
    feature_spec,
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
    assert names[:2] == [f"pid={p}" for p in KNOWN_PIDS]
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
        "pid=430548_1007", "cms_group_id=0", "gender=1", "age_level=0", "shopping_level=1",
        "occupation=0", "pvalue_level=missing", "new_user_class_level=4",
    }
    assert hot(COURSE, x, 2) >= {"cms_group_id=missing", "gender=missing",
                                 "shopping_level=missing"}
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
    explicit = FULL.encode({**many, **{f: np.repeat(v, 3) for f, v in user.items()},
                            "pid": np.repeat("430539_1007", 3)})
    np.testing.assert_array_equal(broadcast, explicit)


def test_encoding_is_deterministic_and_spec_ids_are_stable():
    np.testing.assert_array_equal(FULL.encode(rows()), FULL.encode(rows()))
    assert COURSE.spec_id.startswith("course-v1-")
    assert FULL.spec_id.startswith("full-v1-")
    assert COURSE.spec_id != FULL.spec_id
    # the id depends only on the declared features, never on process state
    assert COURSE.spec_id == feature_spec("course").spec_id


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
    per_row = als_affinity(np.array([[1.0, 1.0], [2.0, 0.0]]), np.array([9, 40]), cate_ids,
                           cate_factors)
    assert per_row.tolist() == [1.0, 2.0]
