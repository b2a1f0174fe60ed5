"""The gateway's selection of one answer (services/gateway/controls.py): each candidate's
filter reason, in precedence order, and each filtered ad counted once."""

from __future__ import annotations

import numpy as np

from adrec.core.events import Scope
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
    built = AdCatalog("v1", IDS, (IDS + 1) // 2, (IDS + 3) // 4, IDS % 3, IDS * 10, row_of=None)
    if sparse:
        return built
    row_of = np.full(int(IDS[-1]) + 1, -1, np.int32)
    row_of[IDS] = np.arange(len(IDS), dtype=np.int32)
    return AdCatalog("v1", IDS, built.campaign, built.customer, built.cate, built.brand, row_of)


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
