"""The gateway's selection of one answer (services/gateway/controls.py): each candidate's
filter reason, in precedence order, and each filtered ad counted once."""

from __future__ import annotations

import numpy as np

from adrec.core.events import Scope
from adrec.core.scoring import AdIndex
from services.gateway.controls import (
    CAPPED,
    DIVERSITY,
    EXCLUDED,
    PAUSED,
    UNKNOWN_AD,
    AdCatalog,
    Limits,
    PausedAds,
    RequestControls,
    Selection,
    UserCounts,
)

NO_LIMITS = Limits()
#: Ads 1..12: campaign = (id + 1) // 2, customer = (id + 3) // 4, category = id % 3.
IDS = np.arange(1, 13, dtype=np.int64)


def catalog(sparse: bool) -> AdCatalog:
    """The table, its ids found by the dense index or (`sparse`) by binary search."""
    return AdCatalog.of(
        "v1",
        IDS,
        (IDS + 1) // 2,
        (IDS + 3) // 4,
        IDS % 3,
        IDS * 10,
        index=AdIndex(IDS, None) if sparse else AdIndex.of(IDS),
    )


def selection(
    sparse: bool,
    paused_ids: tuple[int, ...] = (),
    excluded: tuple[int, ...] = (),
    capped: dict[Scope, list[int]] | None = None,
    limits: Limits = NO_LIMITS,
    count: int = 12,
) -> Selection:
    table = catalog(sparse)
    paused = np.isin(table.ids, paused_ids)
    held = PausedAds(table, 1, paused, None, bool(paused.any()))
    controls = RequestControls(np.asarray(sorted(excluded), dtype=np.int64), (), limits)
    counts = UserCounts(
        {scope: np.asarray(sorted(ids), dtype=np.int64) for scope, ids in (capped or {}).items()}
    )
    return Selection(held, count, controls, counts)


def test_each_reason_removes_its_ads_before_ranking_on_either_index():
    for sparse in (False, True):
        chosen = selection(
            sparse,
            paused_ids=(2, 3),
            excluded=(3, 4),
            # Ad 5; campaign 4 (ads 7, 8); customer 3 (ads 9..12).
            capped={Scope.AD: [5], Scope.CAMPAIGN: [4], Scope.CUSTOMER: [3]},
        )
        # 99 is unknown to the table: ranking skips and counts it, so it is kept here.
        kept = chosen.for_ranking([1, 2, 3, 4, 5, 6, 7, 8, 9, 99])
        assert list(kept) == [1, 6, 99]
        # Ad 3 is paused and excluded: excluded wins, and it counts once.
        assert chosen.filtered == {EXCLUDED: 2, PAUSED: 1, CAPPED: 4}


def test_an_ad_filtered_again_on_a_later_path_counts_once():
    chosen = selection(False, paused_ids=(2,), excluded=(4,))
    chosen.for_ranking([1, 2, 4])
    appended = chosen.offer([2, 4, 99, 1, 6], None)
    assert [ad.ad_id for ad in chosen.ads] == [1, 6]
    assert appended == 2
    assert chosen.filtered == {PAUSED: 1, EXCLUDED: 1, UNKNOWN_AD: 1}


def test_diversity_limits_bound_each_category_and_customer():
    # Categories: id % 3; customers: (id + 3) // 4.
    chosen = selection(False, limits=Limits(category=1, customer=1), count=4)
    chosen.offer(list(range(1, 13)), None)
    assert [ad.ad_id for ad in chosen.ads] == [1, 5, 9]
    assert chosen.filtered == {DIVERSITY: 9}


def test_nothing_to_filter_leaves_the_candidates_as_they_are():
    chosen = selection(False)
    candidates = [3, 1, 2]
    assert chosen.inert
    assert chosen.for_ranking(candidates) is candidates
    assert chosen.filtered == {}


def test_reasons_keep_their_precedence_and_leave_the_shared_marks_as_they_were():
    for sparse in (False, True):
        chosen = selection(
            sparse,
            paused_ids=(5, 6),
            # 99 is excluded though the table lacks it: excluded still wins over unknown.
            excluded=(6, 99),
            # Ad 5 is capped and paused: paused wins. Customer 3: ads 9..12.
            capped={Scope.AD: [5, 7], Scope.CUSTOMER: [3]},
        )
        marks = chosen.paused.marks.copy()
        kept = chosen.for_ranking([5, 6, 7, 8, 9, 12, 99, 98])
        # 98 is unknown alone: ranking skips and counts it.
        assert list(kept) == [8, 98]
        assert chosen.filtered == {PAUSED: 1, EXCLUDED: 2, CAPPED: 3}
        # The next request sees the paused flags alone.
        assert (chosen.paused.marks == marks).all()
        others = Selection(
            chosen.paused, 12, RequestControls(np.zeros(0, np.int64), (), NO_LIMITS), UserCounts({})
        )
        assert list(others.for_ranking([5, 6, 7, 9])) == [7, 9]


def test_a_capped_campaign_or_customer_holds_back_every_ad_of_it():
    table = catalog(False)
    # Campaigns (id + 1) // 2: 3 -> ads 5, 6; customers (id + 3) // 4: 1 -> ads 1..4.
    assert sorted(table.rows_blocked(Scope.CAMPAIGN, np.array([3, 40]))) == [4, 5]
    customers = sorted(table.rows_blocked(Scope.CUSTOMER, np.array([1, 3])))
    assert customers == [0, 1, 2, 3, 8, 9, 10, 11]
    assert list(table.rows_blocked(Scope.AD, np.array([2, 99]))) == [1]
    assert len(table.rows_blocked(Scope.CAMPAIGN, np.zeros(0, np.int64))) == 0
    assert len(AdCatalog.empty().rows_blocked(Scope.CUSTOMER, np.array([1]))) == 0
