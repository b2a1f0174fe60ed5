"""adrec.core.scoring: the id lookup, the candidate rules, the tie rule and the CTRs."""

from __future__ import annotations

import numpy as np
import pytest

from adrec.core import events, features
from adrec.core.codecs import UserFeatures
from adrec.core.dataset import PIDS
from adrec.core.model import CtrModel
from adrec.core.scoring import (
    DENSE_ID_LIMIT,
    AdIndex,
    CtrScorer,
    ScoringDataError,
    best_first,
    known_candidates,
)

PID = PIDS[0]
RANK = 4
#: Ads 1, 3, 5, 7 and 9 have equal features: they score equally for any user.
TWINS = [1, 3, 5, 7, 9]
#: A spec whose ALS affinity is not affine in its value, so it cannot be split by column.
UNSPLIT = features.FeatureSpec(
    "unsplit", (*features.COURSE.blocks, features.Numeric("als_affinity", "log_scaled"))
)


def tie_rule(ctrs, top_k):
    """The rule written out: CTR descending, then candidate position; the first top_k."""
    order = sorted(range(len(ctrs)), key=lambda i: (-ctrs[i], i))
    return order[:top_k] if top_k else order


def ad_table(ad_ids, rng, twins=TWINS):
    """An ad table whose `twins` rows are equal; categories 20..29 have no factors."""
    rows = len(ad_ids)
    table = {
        "adgroup_id": np.asarray(ad_ids),
        "cate_id": rng.integers(1, 30, rows).astype(np.int32),
        "price": rng.uniform(1, 500, rows).astype(np.float32),
        **{
            name: rng.uniform(0, 0.2, rows).astype(np.float32)
            for name in ("ctr_ad", "ctr_cate", "ctr_brand")
        },
    }
    equal = np.flatnonzero(np.isin(table["adgroup_id"], twins))
    for column in ("cate_id", "price", "ctr_ad", "ctr_cate", "ctr_brand"):
        table[column][equal] = table[column][equal[0]]
    return table


CATE_IDS = np.arange(1, 20, dtype=np.int32)


def version(spec=features.FULL, ad_ids=None, twins=TWINS, seed=3):
    """A scorer, and the ad table and the factors of CATE_IDS it was built from."""
    rng = np.random.default_rng(seed)
    ad_ids = np.arange(1, 301, dtype=np.int32) if ad_ids is None else ad_ids
    model = CtrModel(spec, rng.normal(0, 0.6, spec.dim), -2.5)
    table = ad_table(ad_ids, rng, twins)
    factors = rng.normal(0, 0.5, (len(CATE_IDS), RANK)).astype(np.float32)
    return CtrScorer.build(model, table, CATE_IDS, factors), table, factors


def user(seed, factors=True):
    rng = np.random.default_rng(seed)
    profile = {field: float(rng.integers(0, 4)) for field in features.USER_PROFILE_FIELDS}
    profile["pvalue_level"] = float("nan")
    return UserFeatures(profile, rng.normal(0, 0.5, RANK).astype(np.float32) if factors else None)


USERS = [user(1), user(2, factors=False), UserFeatures.missing(), user(4)]


# ------------------------------------------------------------------ the tie rule


def test_equal_ctrs_keep_candidate_order():
    ctrs = np.array([0.2, 0.5, 0.2, 0.5, 0.9, 0.5])
    assert best_first(ctrs, 0).tolist() == [4, 1, 3, 5, 0, 2]
    assert best_first(np.full(5, 0.3), 0).tolist() == [0, 1, 2, 3, 4]
    assert best_first(ctrs, 3).tolist() == [4, 1, 3]


@pytest.mark.parametrize("top_k", [0, 1, 3, 40])
def test_many_lists_follow_the_rule_list_by_list(top_k):
    rng = np.random.default_rng(top_k)
    lengths = [0, 1, 7, 25, 3, 12]
    lists = np.repeat(np.arange(len(lengths)), lengths)
    ctrs = rng.choice([0.1, 0.25, 0.5, 0.75], len(lists))  # many ties
    order = best_first(ctrs, top_k, lists)
    start, expected = 0, []
    for length in lengths:
        own = ctrs[start : start + length]
        expected += [start + i for i in tie_rule(own.tolist(), top_k)]
        assert best_first(own, top_k).tolist() == tie_rule(own.tolist(), top_k)
        start += length
    assert order.tolist() == expected


def test_top_k_zero_is_all_and_a_short_list_is_kept_whole():
    ctrs = np.array([0.3, 0.1, 0.2])
    assert best_first(ctrs, 0).tolist() == [0, 2, 1]
    assert best_first(ctrs, 10).tolist() == [0, 2, 1]
    assert best_first(ctrs, 10, np.array([0, 0, 1])).tolist() == [0, 1, 2]
    assert best_first(np.zeros(0), 5).tolist() == []


# ------------------------------------------------------------------ candidates


def test_repeated_ids_keep_their_first_occurrence_in_order():
    index = AdIndex.of(np.arange(1, 101))
    found = known_candidates(index, np.array([7, 3, 7, 9, 3, 3, 1, 9]))
    assert found.ids.tolist() == [7, 3, 9, 1]
    assert found.rows.tolist() == [6, 2, 8, 0]
    assert found.unknown == 0 and found.lists is None


def test_repeats_count_within_a_list_not_across_lists():
    index = AdIndex.of(np.arange(1, 101))
    ids = np.array([5, 6, 5, 6, 5, 7, 500, 500, 6], dtype=np.int32)
    lists = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2])
    found = known_candidates(index, ids, lists)
    assert list(zip(found.lists.tolist(), found.ids.tolist(), strict=True)) == [
        (0, 5),
        (0, 6),
        (1, 6),
        (1, 5),
        (1, 7),
        (2, 6),
    ]
    assert found.unknown == 2  # id 500 in list 1 and in list 2


def test_unknown_ads_are_dropped_and_each_distinct_id_counted_once():
    index = AdIndex.of(np.array([10, 20, 30]))
    found = known_candidates(index, np.array([40, 20, 0, 15, 40, -3, 10, 2**40, 5]))
    assert found.ids.tolist() == [20, 10]
    assert found.unknown == 6
    nothing = known_candidates(index, np.array([11, 12]))
    assert len(nothing.ids) == 0 and nothing.unknown == 2
    assert known_candidates(index, np.zeros(0, dtype=np.int64)).unknown == 0


@pytest.mark.parametrize(
    "ad_ids, dense",
    [
        (np.array([1, 2, 5, 9, 400]), True),
        (np.array([3, 17, DENSE_ID_LIMIT - 1]), True),
        (np.array([3, 17, DENSE_ID_LIMIT]), False),
        (np.array([0, 4, 9]), False),  # id 0 takes the slot the dense table keeps for misses
        (np.array([2**33, 2**33 + 7]), False),
        (np.zeros(0, dtype=np.int64), False),
    ],
)
def test_dense_and_sparse_lookups_find_the_same_rows(ad_ids, dense):
    index = AdIndex.of(ad_ids)
    assert (index.row_by_id is not None) == dense
    probes = np.concatenate(
        [
            ad_ids,
            ad_ids + 1,
            ad_ids - 1,
            [0, -1, -(2**40), 2**40, DENSE_ID_LIMIT, DENSE_ID_LIMIT + 1],
        ]
    )
    expected = [ad_ids.tolist().index(p) if p in ad_ids.tolist() else -1 for p in probes]
    assert index.rows(probes.astype(np.int64)).tolist() == expected


def test_an_unsorted_table_is_refused():
    with pytest.raises(ScoringDataError, match="not sorted by adgroup_id"):
        AdIndex.of(np.array([1, 3, 2]))
    with pytest.raises(ScoringDataError, match="not sorted by adgroup_id"):
        AdIndex.of(np.array([1, 3, 3]))
    scored, table, factors = version()
    with pytest.raises(ScoringDataError, match="category factors are not sorted"):
        CtrScorer.build(scored.model, table, CATE_IDS[::-1], factors)
    with pytest.raises(ScoringDataError, match="lacks columns"):
        CtrScorer.build(scored.model, {"adgroup_id": table["adgroup_id"]}, CATE_IDS, factors)


# ------------------------------------------------------------------ CTRs and ranking


@pytest.mark.parametrize("spec", [features.FULL, features.COURSE, UNSPLIT], ids=lambda s: s.name)
def test_ctrs_are_the_shared_encoder_and_model_predict(spec):
    scored, table, factors = version(spec)
    assert (scored.compiled is None) == (spec is UNSPLIT)
    rows = np.arange(0, 300, 3)
    for person in USERS:
        affinity = (
            np.full(len(rows), np.nan)
            if person.als_factors is None
            else features.als_affinity(
                person.als_factors, table["cate_id"][rows], CATE_IDS, factors
            )
        )
        columns = {
            "pid": PID,
            **person.columns(),
            "als_affinity": affinity,
            **{name: table[name][rows] for name in features.AD_NUMERIC_FIELDS},
        }
        expected = scored.model.predict(spec.encode(columns))
        np.testing.assert_allclose(scored.ctrs(PID, person, rows), expected, rtol=1e-12)


@pytest.mark.parametrize("spec", [features.FULL, UNSPLIT], ids=lambda s: s.name)
def test_tied_ads_come_back_in_candidate_order(spec):
    scored, _, _ = version(spec)
    for order in ([9, 3, 7, 1, 5], [1, 3, 5, 7, 9], [5, 9, 1, 7, 3]):
        for person in USERS:
            ranked = scored.rank(PID, person, np.array(order), 0)
            assert ranked.ad_ids.tolist() == order
            assert len(set(ranked.ctrs.tolist())) == 1
    # Among other ads, the five stay together and in their order.
    candidates = np.array([40, 9, 12, 3, 250, 7, 33, 1, 5, 101])
    ranked = scored.rank(PID, USERS[0], candidates, 0)
    at = ranked.ad_ids.tolist().index(9)
    assert ranked.ad_ids[at : at + 5].tolist() == [9, 3, 7, 1, 5]


def test_equal_ads_score_equally_wherever_they_stand():
    # One ad in ten equals ad 1, over a table larger than one precomputation chunk.
    ad_ids = np.arange(1, 70_001, dtype=np.int32)
    scored, _, _ = version(ad_ids=ad_ids, twins=ad_ids[::10])
    candidates = np.random.default_rng(5).permutation(ad_ids[:1000])
    for person in USERS:
        ranked = scored.rank(PID, person, candidates, 0)
        tied = ranked.ad_ids % 10 == 1
        assert len(set(ranked.ctrs[tied].tolist())) == 1
        assert ranked.ad_ids[tied].tolist() == [a for a in candidates.tolist() if a % 10 == 1]


@pytest.mark.parametrize("spec", [features.FULL, UNSPLIT], ids=lambda s: s.name)
@pytest.mark.parametrize("top_k", [0, 4])
def test_a_batch_of_users_is_ranked_exactly_as_each_alone(spec, top_k):
    scored, _, _ = version(spec)
    rng = np.random.default_rng(top_k)
    lists = [
        rng.permutation(np.arange(1, 301))[:40],
        np.array([9, 3, 7, 1, 5, 9, 3]),  # ties and repeats
        np.array([17]),
        np.array([1000, 2000]),  # nothing known: an empty list
        np.concatenate([rng.choice(np.arange(1, 301), 25), [999, 998, 999]]),
    ]
    people = [USERS[i % len(USERS)] for i in range(len(lists))]
    offsets = np.concatenate([[0], np.cumsum([len(ids) for ids in lists])])
    ids, ctrs, top_offsets = scored.rank_lists(
        PID, people, np.concatenate(lists).astype(np.int32), offsets, top_k
    )
    assert len(top_offsets) == len(lists) + 1 and top_offsets[-1] == len(ids)
    for i, (candidates, person) in enumerate(zip(lists, people, strict=True)):
        alone = scored.rank(PID, person, candidates.astype(np.int64), top_k)
        part = slice(top_offsets[i], top_offsets[i + 1])
        assert ids[part].tolist() == alone.ad_ids.tolist()
        np.testing.assert_array_equal(ctrs[part], alone.ctrs)
    assert top_offsets[4] - top_offsets[3] == 0
    assert scored.rank(PID, people[4], lists[4], 0).unknown_ads == 2


def test_a_version_without_category_factors_scores_every_affinity_as_missing():
    scored, table, _ = version()
    bare = CtrScorer.build(scored.model, table, np.zeros(0, np.int32), np.zeros((0, 0)))
    rows = np.arange(50)
    assert np.isnan(bare.affinity(USERS[0], rows)).all()
    without_factors = UserFeatures(USERS[0].profile)
    np.testing.assert_array_equal(
        bare.ctrs(PID, USERS[0], rows), bare.ctrs(PID, without_factors, rows)
    )
    assert not np.allclose(scored.ctrs(PID, USERS[0], rows), bare.ctrs(PID, USERS[0], rows))


# ------------------------------------------------------------------ behaviour counts


def history_of(seed: int) -> dict:
    """Window counts of a user with events on a few categories and brands."""
    rng = np.random.default_rng(seed)
    counts = {}
    for kind, scope in features.HISTORY_COUNTS:
        for member in rng.choice(np.arange(1, 30), 4, replace=False):
            one_hour = int(rng.integers(0, 3))
            counts[(kind, scope, int(member))] = (one_hour, one_hour + 2, one_hour + 5)
    return counts


def behaviour_version():
    scorer, table, factors = version(features.BEHAVIOUR)
    table["brand_id"] = np.random.default_rng(9).integers(-1, 30, len(table["adgroup_id"]))
    return CtrScorer.build(scorer.model, table, CATE_IDS, factors), table


def test_the_behaviour_set_splits_by_column_and_scores_counts_as_the_encoder_does():
    scorer, _ = behaviour_version()
    assert scorer.compiled is not None and scorer.uses_history
    rows = np.arange(0, 300, 7)
    for seed, person in enumerate(USERS):
        history = history_of(seed)
        counts = scorer.history_columns(history, rows)
        expected = scorer.encode_and_predict(
            PID, person, rows, scorer.affinity(person, rows), counts
        )
        np.testing.assert_allclose(scorer.ctrs(PID, person, rows, history), expected, rtol=1e-12)
        without = scorer.encode_and_predict(PID, person, rows, scorer.affinity(person, rows))
        np.testing.assert_allclose(scorer.ctrs(PID, person, rows), without, rtol=1e-12)
        assert not np.allclose(expected, without)


def test_history_columns_look_counts_up_by_the_candidates_category_and_brand():
    history = {
        (events.Kind.CART, events.Scope.CATEGORY, 5): (1, 2, 3),
        (events.Kind.PAGE_VIEW, events.Scope.BRAND, 7): (0, 4, 9),
    }
    columns = features.history_inputs(history, np.array([5, 6, 5]), np.array([7, 7, -1]))
    assert columns["cart_cate_1h"].tolist() == [1, 0, 1]
    assert columns["cart_cate_3d"].tolist() == [3, 0, 3]
    assert columns["pv_brand_1d"].tolist() == [4, 4, 0]
    assert columns["pv_cate_1d"].tolist() == [0, 0, 0]
    assert set(columns) == set(features.HISTORY_COLUMNS)


def test_counts_on_a_candidates_category_raise_its_rank_when_the_model_likes_them():
    scorer, table = behaviour_version()
    spec = features.BEHAVIOUR
    weights = np.zeros(spec.dim)
    weights[spec.feature_names.index("clk_cate_1h:log_count")] = 3.0
    model = CtrModel(spec, weights, -3.0)
    scorer = CtrScorer.build(model, table, CATE_IDS, np.zeros((len(CATE_IDS), RANK), np.float32))
    candidates = np.arange(1, 301)
    before = scorer.rank(PID, USERS[0], candidates, 10)
    # A category none of the ads ranked first without counts belongs to.
    shown = set(table["cate_id"][before.ad_ids - 1].tolist())
    clicked = next(int(c) for c in table["cate_id"][candidates - 1] if int(c) not in shown)
    after = scorer.rank(
        PID,
        USERS[0],
        candidates,
        10,
        {(events.Kind.CLICK, events.Scope.CATEGORY, clicked): (1, 1, 1)},
    )
    assert not set(before.ad_ids.tolist()) & set(np.flatnonzero(table["cate_id"] == clicked) + 1)
    assert set(after.ad_ids.tolist()) <= set(
        (np.flatnonzero(table["cate_id"] == clicked) + 1).tolist()
    )


def test_ecpm_order_puts_ads_without_a_bid_last_by_ctr():
    from adrec.core.scoring import by_ecpm, ecpm

    ctrs = np.array([0.10, 0.30, 0.20, 0.05, 0.40])
    bids = np.array([1.0, np.nan, 2.0, 8.0, np.nan])
    ecpms = ecpm(ctrs, bids)
    np.testing.assert_allclose(ecpms[[0, 2, 3]], [100.0, 400.0, 400.0])
    # 2 and 3 tie on eCPM: the higher CTR first; then 4 and 1, without bids, by CTR.
    assert by_ecpm(ctrs, ecpms, 0).tolist() == [2, 3, 0, 4, 1]
    assert by_ecpm(ctrs, ecpms, 2).tolist() == [2, 3]
