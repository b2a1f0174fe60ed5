"""Recall lists of a chunk of users, in numpy: the whole algorithm.

Per user:

1. Score every catalog category: ``U @ C.T``, BLAS over a chunk of users.
2. Keep the ``top_categories`` best: block maxima narrow the candidates to that many
   blocks of 64 categories, then argpartition and a sort. Equal scores rank the lower
   category id first, so the choice never depends on the partition algorithm.
3. Walk them in rank order taking *distinct* ads until ``list_length``: every category
   before the last one visited is taken whole (in random order), the last one is
   sampled without replacement. Every ad has exactly one category, so ads from
   different categories never collide.
4. Within a category, ``uniform`` gives every ad the same chance (the course);
   ``popular`` samples proportionally to its weight, without replacement (successive
   sampling, the Efraimidis-Spirakis distribution).
5. A list still short of ``list_length`` continues with the popular fallback list,
   skipping ads it already holds. ``personal`` counts the leading ALS-chosen ads.

Output order is category rank, then within-category sampling order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from jobs.recall.catalog import RecallCatalog
from jobs.recall.randomness import user_streams
from jobs.recall.ranking import top_categories
from jobs.recall.sampler import DRAW_COST, draw_bound, sample_by_draws, sample_by_keys, walk

STRATEGIES = ("uniform", "popular")

RECALL_SCHEMA = "user_id int, ad_ids array<int>, personal int"
_ARROW_SCHEMA = pa.schema(
    [
        ("user_id", pa.int32()),
        ("ad_ids", pa.list_(pa.int32())),
        ("personal", pa.int32()),
    ]
)


@dataclasses.dataclass(frozen=True)
class RecallConfig:
    list_length: int = 500
    top_categories: int = 20
    strategy: str = "uniform"
    seed: int = 42
    # Users scored per numpy block: its two score matrices (users x categories float32)
    # take about 55 MB at the full data set's 6,769 categories.
    chunk_users: int = 1024

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"recall strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if min(self.list_length, self.top_categories, self.chunk_users) < 1:
            raise ValueError("list_length, top_categories and chunk_users must be positive")


@dataclasses.dataclass(frozen=True, eq=False)
class RecallChunk:
    user_ids: np.ndarray  # int32 (m,)
    ad_ids: np.ndarray  # int32 (m, list_length); row i holds lengths[i] ads, then zeros
    lengths: np.ndarray  # int32 (m,)
    personal: np.ndarray  # int32 (m,): leading ads from ALS categories, the rest are fallback

    def lists(self) -> Iterator[np.ndarray]:
        full = self.ad_ids.shape[1]
        for row, length in zip(self.ad_ids, self.lengths.tolist(), strict=True):
            yield row if length == full else row[:length]

    def to_arrow(self) -> pa.RecordBatch:
        if (self.lengths == self.ad_ids.shape[1]).all():
            values = self.ad_ids.ravel()
        else:
            values = self.ad_ids[np.arange(self.ad_ids.shape[1]) < self.lengths[:, None]]
        offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int32)
        return pa.RecordBatch.from_arrays(
            [
                pa.array(self.user_ids),
                pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
                pa.array(self.personal),
            ],
            schema=_ARROW_SCHEMA,
        )


def recall_chunk(
    catalog: RecallCatalog, config: RecallConfig, user_ids: np.ndarray, user_factors: np.ndarray
) -> RecallChunk:
    """Recall lists of a block of users (ids and their ALS factor rows)."""
    user_ids = np.asarray(user_ids, dtype=np.int64)
    factors = np.asarray(user_factors, dtype=np.float32)
    if factors.shape != (len(user_ids), catalog.cate_factors.shape[1]):
        raise ValueError(
            f"expected {len(user_ids)} factor rows of rank "
            f"{catalog.cate_factors.shape[1]}, got shape {factors.shape}"
        )
    length = config.list_length
    ad_ids = np.zeros((len(user_ids), length), dtype=np.int32)
    personal = np.zeros(len(user_ids), dtype=np.int32)
    if len(user_ids) and catalog.n_categories:
        top = top_categories(factors, catalog.cate_factors, config.top_categories)
        segments, personal = walk(top, catalog.sizes, length)
        streams = user_streams(config.seed, user_ids)
        popular = config.strategy == "popular"
        by_draws = draw_bound(catalog, popular, segments) * DRAW_COST < segments.size
        sample_by_keys(catalog, popular, streams, segments.subset(~by_draws), ad_ids)
        sample_by_draws(catalog, popular, streams, segments.subset(by_draws), ad_ids)
    lengths = _fill_from_popular(ad_ids, personal, catalog.popular)
    return RecallChunk(user_ids.astype(np.int32), ad_ids, lengths, personal.astype(np.int32))


def _fill_from_popular(ad_ids: np.ndarray, personal: np.ndarray, popular: np.ndarray) -> np.ndarray:
    """Append fallback ads the row lacks after its personal ads; returns the list lengths."""
    length = ad_ids.shape[1]
    lengths = personal.astype(np.int32)
    short = np.flatnonzero(personal < length)
    if not short.size or not popular.size:
        return lengths
    by_id = np.argsort(popular)
    sorted_popular = popular[by_id]
    rows = ad_ids[short]
    slot = np.searchsorted(sorted_popular, rows).clip(max=len(popular) - 1)
    held = (sorted_popular[slot] == rows) & (np.arange(length) < personal[short, None])
    present = np.zeros((len(short), len(popular)), dtype=bool)
    held_rows, held_cols = np.nonzero(held)
    present[held_rows, by_id[slot[held_rows, held_cols]]] = True
    available = ~present
    rank = np.cumsum(available, axis=1)
    need = length - personal[short]
    fill_rows, fill_cols = np.nonzero(available & (rank <= need[:, None]))
    ad_ids[short[fill_rows], personal[short[fill_rows]] + rank[fill_rows, fill_cols] - 1] = popular[
        fill_cols
    ]
    lengths[short] += np.minimum(need, available.sum(axis=1)).astype(np.int32)
    return lengths
