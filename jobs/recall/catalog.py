"""The recall catalog every user shares: categories with ALS factors and their ads.

Ads are grouped per category (CSR layout), heaviest first, with each ad's sampling weight
(training impressions + 1, so ads never shown stay reachable), the cumulative weights and
a guide table for weighted draws, and the popular fallback list.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from pyspark.sql import DataFrame


@dataclasses.dataclass(frozen=True, eq=False)
class RecallCatalog:
    """What every user's recall shares; immutable, pickled once to each executor."""

    cate_ids: np.ndarray  # int32 (C,) ascending: ad categories that have ALS factors
    cate_factors: np.ndarray  # float32 (C, rank)
    offsets: np.ndarray  # int64 (C + 1,): category c owns catalog items offsets[c]:offsets[c+1]
    ad_ids: np.ndarray  # int32 (N,) per category by weight desc, then ad id
    weights: np.ndarray  # int64 (N,) training impressions + 1
    popular: np.ndarray  # int32: the fallback list, distinct ids
    ads_without_factors: int  # ads whose category has no ALS factors: never recalled personally
    ticket_starts: np.ndarray  # int64 (N + 1,): cumulative weights; item i owns [s[i], s[i+1])
    guide: np.ndarray  # int64 (N,): per category, the item holding the first ticket of each cell

    @property
    def n_categories(self) -> int:
        return len(self.cate_ids)

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def category_weights(self) -> np.ndarray:
        weights: np.ndarray = (
            self.ticket_starts[self.offsets[1:]] - self.ticket_starts[self.offsets[:-1]]
        )
        return weights

    @property
    def position_bits(self) -> int:
        """Bits that hold any position inside one category."""
        largest = int(self.sizes.max()) if self.n_categories else 1
        return max(1, (largest - 1).bit_length())


def build_catalog(
    ad_ids: np.ndarray,
    ad_cate_ids: np.ndarray,
    ad_impressions: np.ndarray,
    cate_factors: tuple[np.ndarray, np.ndarray],
    popular: np.ndarray,
) -> RecallCatalog:
    """Catalog from per-ad columns, the ALS category factors (ids, vectors) and the fallback."""
    ad_ids = np.asarray(ad_ids, dtype=np.int64)
    ad_cates = np.asarray(ad_cate_ids, dtype=np.int64)
    impressions = np.asarray(ad_impressions, dtype=np.int64)
    if not len(ad_ids) == len(ad_cates) == len(impressions):
        raise ValueError("ad ids, categories and impressions must have one entry per ad")
    if len(np.unique(ad_ids)) != len(ad_ids):
        raise ValueError("ad ids must be unique: every ad has exactly one category")
    if impressions.size and impressions.min() < 0:
        raise ValueError("impressions cannot be negative")
    popular = np.asarray(popular, dtype=np.int32)
    if len(np.unique(popular)) != len(popular):
        raise ValueError("the popular fallback list must not repeat an ad")

    factor_ids = np.asarray(cate_factors[0], dtype=np.int64)
    factor_vectors = np.asarray(cate_factors[1], dtype=np.float32)
    by_id = np.argsort(factor_ids, kind="stable")
    factor_ids, factor_vectors = factor_ids[by_id], factor_vectors[by_id]
    has_factors = np.isin(ad_cates, factor_ids)
    cate_ids, cate_of_ad = np.unique(ad_cates[has_factors], return_inverse=True)
    ad_ids, impressions = ad_ids[has_factors], impressions[has_factors]
    weights = impressions + 1
    # Heaviest first inside a category: a prefix of the layout is the category's top mass.
    order = np.lexsort((ad_ids, -weights, cate_of_ad))
    sizes = np.bincount(cate_of_ad, minlength=len(cate_ids))
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    weights = weights[order]
    ticket_starts = np.concatenate([[0], np.cumsum(weights)]).astype(np.int64)
    if ticket_starts[-1] * int(sizes.max(initial=1)) >= 2**62:
        raise ValueError("total ad weight too large for 64-bit ticket arithmetic")
    return RecallCatalog(
        cate_ids=cate_ids.astype(np.int32),
        cate_factors=np.ascontiguousarray(factor_vectors[np.searchsorted(factor_ids, cate_ids)]),
        offsets=offsets,
        ad_ids=ad_ids[order].astype(np.int32),
        weights=weights,
        popular=popular,
        ads_without_factors=int((~has_factors).sum()),
        ticket_starts=ticket_starts,
        guide=_guide_table(offsets, ticket_starts),
    )


def _guide_table(offsets: np.ndarray, ticket_starts: np.ndarray) -> np.ndarray:
    """Cell g of a category with n items and W tickets starts at ticket ceil(g * W / n).

    A ticket t lies in cell floor(t * n / W), whose first ticket is <= t, so the item
    holding t is at or after the cell's guide entry, and on average about one step
    further (Chen's guide table).
    """
    sizes = np.diff(offsets)
    category = np.repeat(np.arange(len(sizes)), sizes)
    cell = np.arange(offsets[-1]) - offsets[category]
    weight = ticket_starts[offsets[1:]] - ticket_starts[offsets[:-1]]
    first_ticket: np.ndarray = ticket_starts[offsets[category]] + -(
        -cell * weight[category] // sizes[category]
    )
    return np.searchsorted(ticket_starts, first_ticket, side="right") - 1


def collect_catalog(
    ads: DataFrame,
    impressions: DataFrame,
    cate_factors: tuple[np.ndarray, np.ndarray],
    popular: np.ndarray,
) -> RecallCatalog:
    """Catalog from ad_feature rows (adgroup_id, cate_id) and ``popular.ad_impressions``."""
    table = (
        ads.select("adgroup_id", "cate_id")
        .join(impressions.select("adgroup_id", "impressions"), "adgroup_id", "left")
        .toArrow()
    )
    return build_catalog(
        table.column("adgroup_id").to_numpy(),
        table.column("cate_id").to_numpy(),
        table.column("impressions").fill_null(0).to_numpy(),
        cate_factors,
        popular,
    )
