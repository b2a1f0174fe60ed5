"""``ad_feature.csv`` and ``user_profile.csv``: the entity tables, written whole from the world."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from adrec.core.dataset import AD_FEATURE, BIDS_FILE, BIDS_HEADER, NULL_BRAND, USER_PROFILE
from adrec.synthetic.files import atomic_file, fixed_decimals, write_table
from adrec.synthetic.sampling import Stream, random_stream
from adrec.synthetic.truth import MISSING
from adrec.synthetic.world import World


def write_ad_feature(world: World, out: Path) -> None:
    order = np.lexsort((world.ad_ids, world.ad_customer))  # the real file is sorted by customer
    brand = world.ad_brand[order]
    table = pa.table(
        {
            "adgroup_id": world.ad_ids[order],
            "cate_id": world.category_ids[world.ad_category[order]],
            "campaign_id": world.ad_campaign[order],
            "customer": world.ad_customer[order],
            "brand": pc.fill_null(pa.array(brand, mask=brand == 0).cast(pa.string()), NULL_BRAND),
            "price": _price_strings(world.ad_price_cents[order]),
        }
    )
    with atomic_file(out / AD_FEATURE.csv_file) as handle:
        write_table(handle, AD_FEATURE.header, table)


#: Share of the ads with a bid: the rest show how ranking by eCPM treats ads without one.
BID_SHARE = 0.95
#: Bids per click are lognormal: median 0.5, most between 0.15 and 1.7, in cents.
BID_LOG_MEDIAN = float(np.log(0.5))
BID_LOG_SD = 0.6
MIN_BID = 0.01


def write_bids(world: World, out: Path) -> int:
    """``bids.csv``: a lognormal bid for most ads, by ad id; returns the rows written.

    Clicks do not depend on bids, so the planted truth is unchanged by them."""
    rng = random_stream(world.seed, Stream.BIDS)
    order = np.argsort(world.ad_ids, kind="stable")
    with_bid = rng.random(len(order)) < BID_SHARE
    bids = np.maximum(np.exp(rng.normal(BID_LOG_MEDIAN, BID_LOG_SD, len(order))), MIN_BID)
    chosen = order[with_bid[order]]
    table = pa.table({"adgroup_id": world.ad_ids[chosen], "bid": fixed_decimals(bids[chosen], 2)})
    with atomic_file(out / BIDS_FILE) as handle:
        write_table(handle, BIDS_HEADER, table)
    return len(chosen)


def write_user_profile(world: World, out: Path) -> None:
    listed = np.flatnonzero(world.has_profile)
    listed = listed[np.argsort(world.user_ids[listed], kind="stable")]
    columns = {"userid": world.user_ids[listed]}
    for name, values in world.profile.items():
        shown = values[listed]
        columns[name] = pa.array(shown, mask=shown == MISSING)
    with atomic_file(out / USER_PROFILE.csv_file) as handle:
        write_table(handle, USER_PROFILE.header, pa.table(columns))


def _price_strings(cents: np.ndarray) -> pa.Array:
    """Prices as Python prints floats with at most two decimals: 170.0, 89.9, 32.99."""
    whole = pa.array(cents // 100).cast(pa.string())
    hundredths = cents % 100
    fraction = pc.if_else(
        pa.array(hundredths % 10 == 0),
        pa.array(hundredths // 10).cast(pa.string()),
        pc.utf8_lpad(pa.array(hundredths).cast(pa.string()), 2, "0"),
    )
    return pc.binary_join_element_wise(whole, fraction, ".")
