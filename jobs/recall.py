"""Recall lists: up to L distinct ads per user from the categories ALS predicts they like most.

Contract
--------
- :func:`build_catalog` (numpy) / :func:`collect_catalog` (from Spark frames) build the
  :class:`RecallCatalog` every user shares: the ad categories that have ALS factors, their
  ads grouped per category (CSR layout), each ad's sampling weight (training
  impressions + 1, so ads never shown stay reachable) and the popular fallback list.
- :func:`recall_chunk` is the whole algorithm for a block of users, in numpy; the Spark
  stages, the benchmark and single-user updates all call it.
- :func:`build_recall_lists` ``(user_factors, catalog, config)`` -> DataFrame
  ``user_id`` int, ``ad_ids`` array<int>, ``personal`` int, computed on the executors.
  ``user_factors`` has ``user_id`` int and ``als_factors`` array<float> (see
  :meth:`jobs.als.AlsResult.user_factor_frame`).
- :func:`write_recall_lists` loads such a DataFrame into a version from the executors;
  :func:`publish_recall_lists` computes and writes in one pass (the fast path),
  optionally saving the lists as parquet (:func:`save_recall_lists`), and returns
  :class:`RecallStats` (the personal / fallback source counts; :func:`recall_stats`
  computes them from lists).
- :func:`recall_hit_rate` measures the lists against day-8 clicks.

The algorithm, per user
-----------------------
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

Sampling, vectorized. A taken-whole category and a small sampled one get one random key
per ad (uniform: random bits; popular: ``Exp(1) / weight``) and a single sort of packed
``(segment, key, position)`` integers orders every segment of the chunk at once. A
sampled category much larger than its quota instead draws with replacement (popular:
through a guide table over cumulative weights, O(1) per draw) and keeps first
occurrences, which is the same distribution at the cost of the quota rather than of
the category size; it is chosen when its expected draws are clearly cheaper.

Reproducibility. Every random number is a counter-based hash of (seed, user id, ad
position or draw number), never a shared RNG stream, so a user's list depends only on
the seed, its factors and the catalog: not on chunk size, partitioning or retries.
That also makes writes idempotent: a retried task rewrites the same bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame
from pyspark.sql import functions as sf
from threadpoolctl import threadpool_limits

from adrec.core.redis_conn import RedisSettings, connect
from adrec.core.store import VersionWriter
from jobs.load import write_from_executors

STRATEGIES = ("uniform", "popular")

RECALL_SCHEMA = "user_id int, ad_ids array<int>, personal int"
_ARROW_SCHEMA = pa.schema([
    ("user_id", pa.int32()),
    ("ad_ids", pa.list_(pa.int32())),
    ("personal", pa.int32()),
])


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


# ------------------------------------------------------------------ catalog


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
        return self.ticket_starts[self.offsets[1:]] - self.ticket_starts[self.offsets[:-1]]

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
    first_ticket = ticket_starts[offsets[category]] + -(-cell * weight[category] // sizes[category])
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


# ------------------------------------------------------------------ counter-based randomness

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
# Draw numbers live far above any ad position, so the two kinds of counter never meet.
_DRAW_COUNTER = np.uint64(1 << 62)
_UNIT = 2.0**-53


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer, in place: a bijection that scatters nearby counters."""
    z ^= z >> np.uint64(30)
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    return z


def _user_streams(seed: int, user_ids: np.ndarray) -> np.ndarray:
    seed_key = _mix(np.array([seed & (2**64 - 1)], dtype=np.uint64))
    return _mix(user_ids.astype(np.uint64) * _GAMMA ^ seed_key)


def _random_bits(streams: np.ndarray, counters: np.ndarray) -> np.ndarray:
    return _mix(streams + counters.astype(np.uint64) * _GAMMA)


def _unit_interval(bits: np.ndarray) -> np.ndarray:
    """Uniform float64 in [0, 1) from the top 53 bits."""
    return (bits >> np.uint64(11)).astype(np.float64) * _UNIT


# ------------------------------------------------------------------ one chunk of users


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
            [pa.array(self.user_ids), pa.ListArray.from_arrays(pa.array(offsets),
                                                               pa.array(values)),
             pa.array(self.personal)],
            schema=_ARROW_SCHEMA,
        )


def recall_chunk(
    catalog: RecallCatalog, config: RecallConfig, user_ids: np.ndarray, user_factors: np.ndarray
) -> RecallChunk:
    """Recall lists of a block of users (ids and their ALS factor rows)."""
    user_ids = np.asarray(user_ids, dtype=np.int64)
    factors = np.asarray(user_factors, dtype=np.float32)
    if factors.shape != (len(user_ids), catalog.cate_factors.shape[1]):
        raise ValueError(f"expected {len(user_ids)} factor rows of rank "
                         f"{catalog.cate_factors.shape[1]}, got shape {factors.shape}")
    length = config.list_length
    ad_ids = np.zeros((len(user_ids), length), dtype=np.int32)
    personal = np.zeros(len(user_ids), dtype=np.int32)
    if len(user_ids) and catalog.n_categories:
        top = _top_categories(factors, catalog.cate_factors, config.top_categories)
        segments, personal = _walk(top, catalog.sizes, length)
        streams = _user_streams(config.seed, user_ids)
        popular = config.strategy == "popular"
        by_draws = _draw_bound(catalog, popular, segments) * _DRAW_COST < segments.size
        _sample_by_keys(catalog, popular, streams, segments.subset(~by_draws), ad_ids)
        _sample_by_draws(catalog, popular, streams, segments.subset(by_draws), ad_ids)
    lengths = _fill_from_popular(ad_ids, personal, catalog.popular)
    return RecallChunk(user_ids.astype(np.int32), ad_ids, lengths, personal.astype(np.int32))


def _scores(users: np.ndarray, cate_factors: np.ndarray) -> np.ndarray:
    # BLAS scores a single row (gemv) with other rounding than a block (gemm); padding
    # keeps a user's scores, hence its list, independent of the chunk it falls in.
    if len(users) == 1:
        return (np.vstack([users, users]) @ cate_factors.T)[:1]
    return users @ cate_factors.T


# Categories per block of the top-category prefilter.
_BLOCK = 64


def _top_categories(users: np.ndarray, cate_factors: np.ndarray, count: int) -> np.ndarray:
    """Per user, the ``count`` best-scoring categories: score desc, then index asc.

    Prefilter: the ``count`` blocks of categories with the highest block maxima hold
    every top-``count`` score, since those maxima are ``count`` distinct scores; only
    when another block ties the lowest of them is the full row needed. The scores are
    computed block-interleaved (column ``j * blocks + b`` is category ``b * 64 + j``),
    so a block maximum is an elementwise maximum over rows of contiguous scores, several
    times faster than 64-score reductions.
    """
    n, rank = cate_factors.shape
    if count * _BLOCK * 4 > n:
        return _exact_top(_scores(users, cate_factors), count)
    m, blocks = len(users), -(-n // _BLOCK)
    padded = np.zeros((blocks * _BLOCK, rank), dtype=np.float32)
    padded[:n] = cate_factors
    interleaved = padded.reshape(blocks, _BLOCK, rank).transpose(1, 0, 2).reshape(-1, rank)
    scores = _scores(users, interleaved).reshape(m, _BLOCK, blocks)
    scores[:, n % _BLOCK or _BLOCK :, -1] = -np.inf  # the padding categories
    block_max = scores.max(axis=1)
    cut = blocks - count
    # Ascending block order makes candidate order category order, for the tie-break.
    best = np.sort(np.argpartition(block_max, cut, axis=1)[:, cut:], axis=1)
    lowest = np.take_along_axis(block_max, best, axis=1).min(axis=1, keepdims=True)
    cell = (np.arange(m)[:, None, None] * _BLOCK + np.arange(_BLOCK)[None, None, :]) * blocks
    candidates = scores.reshape(-1)[(cell + best[:, :, None]).reshape(m, -1)]
    local = _exact_top(candidates, count)
    top = np.take_along_axis(best, local // _BLOCK, axis=1) * _BLOCK + local % _BLOCK
    ambiguous = np.count_nonzero(block_max >= lowest, axis=1) > count
    if ambiguous.any():
        in_order = scores[ambiguous].transpose(0, 2, 1).reshape(-1, blocks * _BLOCK)
        top[ambiguous] = _exact_top(in_order[:, :n], count)
    return top


def _exact_top(scores: np.ndarray, count: int) -> np.ndarray:
    """Per row, indices of the ``count`` best columns: score desc, then index asc."""
    n = scores.shape[1]
    if count >= n:
        return np.argsort(-scores, axis=1, kind="stable")
    cut = n - count
    part = np.argpartition(scores, cut, axis=1)
    top = np.sort(part[:, cut:], axis=1)
    threshold = np.take_along_axis(scores, part[:, cut : cut + 1], axis=1)
    # A score equal to the threshold may sit on either side of the cut; those rare rows
    # take the exact rule from a stable sort.
    tied = np.count_nonzero(scores >= threshold, axis=1) > count
    if tied.any():
        exact = np.argsort(-scores[tied], axis=1, kind="stable")[:, :count]
        top[tied] = np.sort(exact, axis=1)
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


@dataclasses.dataclass(frozen=True)
class _Segments:
    """The (user, category) pairs a chunk takes ads from, in (user, rank) order."""

    row: np.ndarray  # user row in the chunk
    cate: np.ndarray  # catalog category index
    take: np.ndarray  # ads to take
    size: np.ndarray  # ads in the category
    start: np.ndarray  # list position of the first ad taken

    def subset(self, mask: np.ndarray) -> _Segments:
        return _Segments(*(getattr(self, f.name)[mask] for f in dataclasses.fields(self)))

    def __len__(self) -> int:
        return len(self.row)


def _walk(top: np.ndarray, sizes: np.ndarray, length: int) -> tuple[_Segments, np.ndarray]:
    size = sizes[top]
    before = np.cumsum(size, axis=1) - size
    take = np.clip(length - before, 0, size)
    rows, ranks = np.nonzero(take)
    segments = _Segments(rows, top[rows, ranks], take[rows, ranks], size[rows, ranks],
                         before[rows, ranks])
    return segments, take.sum(axis=1)


# A with-replacement draw (two sorts to deduplicate, rounds) costs a few keyed items.
_DRAW_COST = 4.0


def _draw_bound(catalog: RecallCatalog, popular: bool, segments: _Segments) -> np.ndarray:
    """Upper bound on the draws needed to collect ``take`` distinct ads (inf: take all).

    Each draw is new with probability at least the mass left outside the ``take``
    heaviest ads, so the expected number of draws is at most take / that mass.
    """
    sampled = segments.take < segments.size
    bound = np.full(len(segments), np.inf)
    if not sampled.any():
        return bound
    take, size = segments.take[sampled], segments.size[sampled]
    if popular:
        first = catalog.offsets[segments.cate[sampled]]
        total = catalog.category_weights[segments.cate[sampled]]
        top_mass = catalog.ticket_starts[first + take] - catalog.ticket_starts[first]
        bound[sampled] = take * total / (total - top_mass)
    else:
        bound[sampled] = take * size / (size - take)
    return bound


_KEY_BITS = 31
# Keyed ads per pass: the dozen working arrays of a pass stay in a core's L2 cache.
_GROUP_ITEMS = 1 << 15


def _sample_by_keys(
    catalog: RecallCatalog, popular: bool, streams: np.ndarray, segments: _Segments,
    out: np.ndarray,
) -> None:
    """Give every ad of each segment's category a random key; keep the ``take`` smallest."""
    segment_bits = 64 - _KEY_BITS - catalog.position_bits
    if segment_bits < 1:
        raise ValueError("a category is too large to pack its positions in 32 bits")
    ends = np.cumsum(segments.size)
    first = 0
    while first < len(segments):
        budget = np.searchsorted(ends, ends[first] - segments.size[first] + _GROUP_ITEMS,
                                 side="right")
        last = min(max(int(budget), first + 1), first + (1 << segment_bits))
        _sample_group_by_keys(catalog, popular, streams, segments.subset(slice(first, last)),
                              out)
        first = last


def _sample_group_by_keys(
    catalog: RecallCatalog, popular: bool, streams: np.ndarray, segments: _Segments,
    out: np.ndarray,
) -> None:
    """One sort of ``segment | key | position`` packed in a uint64 orders every segment.

    Sorting keeps each segment in the slots it had, so which slots are kept (the first
    ``take`` of a segment) and where they go in ``out`` is known before the sort.
    """
    position_bits = catalog.position_bits
    counts = segments.size
    slot_in_segment = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    first_item = np.repeat(catalog.offsets[segments.cate], counts)
    item = first_item + slot_in_segment
    bits = _random_bits(np.repeat(streams[segments.row], counts), item)
    if popular:
        # Exponential clocks Exp(1) / weight, smallest first (Efraimidis-Spirakis), in
        # float32: 23 random bits per clock order thousands of ads, three times faster.
        # The uniform lies strictly inside (0, 1): a clock of -0.0 would sort last.
        clock = (bits >> np.uint64(41)).astype(np.float32)
        clock += np.float32(0.5)
        clock *= np.float32(2.0**-23)
        np.log(clock, out=clock)
        clock /= catalog.weights[item].astype(np.float32)
        key = np.negative(clock, out=clock).view(np.uint32)
    else:
        key = bits >> np.uint64(64 - _KEY_BITS)
    packed = np.repeat(
        np.arange(len(segments), dtype=np.uint64) << np.uint64(_KEY_BITS + position_bits),
        counts,
    )
    packed |= key.astype(np.uint64) << np.uint64(position_bits)
    packed |= slot_in_segment.astype(np.uint64)
    packed.sort()
    keep = slot_in_segment < np.repeat(segments.take, counts)
    position = (packed[keep] & np.uint64((1 << position_bits) - 1)).astype(np.int64)
    destination = np.repeat(segments.row * out.shape[1] + segments.start, counts)
    out.reshape(-1)[destination[keep] + slot_in_segment[keep]] = catalog.ad_ids[
        first_item[keep] + position
    ]


def _sample_by_draws(
    catalog: RecallCatalog, popular: bool, streams: np.ndarray, segments: _Segments,
    out: np.ndarray,
) -> None:
    """Draw with replacement and keep first occurrences until ``take`` distinct ads.

    The sequence of first occurrences of i.i.d. draws is exactly a sample without
    replacement in selection order (successive sampling); each round draws only for the
    segments still short, so a segment's draws depend on nothing but its own counters.
    """
    if not len(segments):
        return
    wanted = np.ceil(_draw_bound(catalog, popular, segments)).astype(np.int64) + 8
    drawn = np.zeros(len(segments), dtype=np.int64)
    pending = np.arange(len(segments))
    draws: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    while pending.size:
        counts = wanted[pending]
        segment = np.repeat(pending, counts)
        number = np.repeat(drawn[pending] - (np.cumsum(counts) - counts), counts) + np.arange(
            counts.sum()
        )
        bits = _random_bits(streams[segments.row[segment]], number.astype(np.uint64)
                            + _DRAW_COUNTER)
        draws.append((segment, number, _pick(catalog, popular, segments.cate[segment], bits)))
        drawn[pending] += counts
        segment, number, position = _first_occurrences(*map(np.concatenate, zip(*draws,
                                                                               strict=True)))
        deficit = segments.take - np.bincount(segment, minlength=len(segments))
        pending = np.flatnonzero(deficit > 0)
        wanted[pending] = 2 * deficit[pending] + 8
    starts = np.searchsorted(segment, np.arange(len(segments)))
    rank = np.arange(len(segment)) - starts[segment]
    keep = rank < segments.take[segment]
    kept = segment[keep]
    out[segments.row[kept], segments.start[kept] + rank[keep]] = catalog.ad_ids[
        catalog.offsets[segments.cate[kept]] + position[keep]
    ]


def _first_occurrences(
    segment: np.ndarray, number: np.ndarray, position: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each segment's distinct positions at their first draw, ordered by (segment, draw)."""
    position_bits = max(1, int(position.max()).bit_length())
    number_bits = max(1, int(number.max()).bit_length())
    if int(segment.max()).bit_length() + position_bits + number_bits > 64:
        raise ValueError("too many draws in one chunk to pack; lower chunk_users")
    by_position = np.sort(
        (segment.astype(np.uint64) << np.uint64(position_bits + number_bits))
        | (position.astype(np.uint64) << np.uint64(number_bits))
        | number.astype(np.uint64)
    )
    same_pair = by_position >> np.uint64(number_bits)
    first = np.ones(len(by_position), dtype=bool)
    first[1:] = same_pair[1:] != same_pair[:-1]
    by_position = by_position[first]
    segment = by_position >> np.uint64(position_bits + number_bits)
    position = (by_position >> np.uint64(number_bits)) & np.uint64((1 << position_bits) - 1)
    number = by_position & np.uint64((1 << number_bits) - 1)
    by_draw = np.sort(
        (segment << np.uint64(position_bits + number_bits))
        | (number << np.uint64(position_bits))
        | position
    )
    return (
        (by_draw >> np.uint64(position_bits + number_bits)).astype(np.int64),
        ((by_draw >> np.uint64(position_bits)) & np.uint64((1 << number_bits) - 1)).astype(
            np.int64),
        (by_draw & np.uint64((1 << position_bits) - 1)).astype(np.int64),
    )


def _pick(
    catalog: RecallCatalog, popular: bool, cate: np.ndarray, bits: np.ndarray
) -> np.ndarray:
    """One draw per entry: a position inside category ``cate`` (popular: by weight)."""
    unit = _unit_interval(bits)
    size = catalog.sizes[cate]
    if not popular:
        return np.minimum((unit * size).astype(np.int64), size - 1)
    first = catalog.offsets[cate]
    total = catalog.category_weights[cate]
    ticket = np.minimum((unit * total).astype(np.int64), total - 1)
    item = catalog.guide[first + ticket * size // total]
    ticket += catalog.ticket_starts[first]
    ahead = np.flatnonzero(catalog.ticket_starts[item + 1] <= ticket)
    while ahead.size:
        item[ahead] += 1
        ahead = ahead[catalog.ticket_starts[item[ahead] + 1] <= ticket[ahead]]
    return item - first


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
    ad_ids[short[fill_rows], personal[short[fill_rows]] + rank[fill_rows, fill_cols] - 1] = (
        popular[fill_cols]
    )
    lengths[short] += np.minimum(need, available.sum(axis=1)).astype(np.int32)
    return lengths


# ------------------------------------------------------------------ Spark stages


def build_recall_lists(
    user_factors: DataFrame, catalog: RecallCatalog, config: RecallConfig
) -> DataFrame:
    """(user_id, ad_ids, personal) for every user with factors; lazy, computed per partition."""
    return user_factors.mapInArrow(
        _partition_recall(catalog, config, None, RecallChunk.to_arrow), RECALL_SCHEMA
    )


@dataclasses.dataclass(frozen=True)
class RecallStats:
    users: int
    full_lists: int  # lists of exactly list_length ads
    filled_users: int  # lists that needed the popular fallback
    personal_ads: int
    fallback_ads: int

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


_STATS_FIELDS = [f.name for f in dataclasses.fields(RecallStats)]


def publish_recall_lists(
    user_factors: DataFrame,
    catalog: RecallCatalog,
    config: RecallConfig,
    redis: RedisSettings,
    version: str,
    *,
    output_path: str | None = None,
) -> RecallStats:
    """Compute every list and write it to ``version`` in the same executor pass.

    Every user counted in the returned stats has its key written. With ``output_path``
    the lists are also saved as parquet for offline ranking; without, only per-chunk
    counts leave the Python workers, sparing the JVM half a billion array elements.
    Either way the stage runs exactly once: a second evaluation would only rewrite equal
    bytes, but costs the whole stage again.
    """
    sink = (redis, version)
    if output_path is None:
        counts = user_factors.mapInArrow(
            _partition_recall(catalog, config, sink, _chunk_stats),
            ", ".join(f"{name} long" for name in _STATS_FIELDS),
        )
        row = counts.agg(*(sf.sum(name).alias(name) for name in _STATS_FIELDS)).first()
        return RecallStats(**{name: int(row[name] or 0) for name in _STATS_FIELDS})
    lists = user_factors.mapInArrow(
        _partition_recall(catalog, config, sink, RecallChunk.to_arrow), RECALL_SCHEMA
    )
    save_recall_lists(lists, output_path)
    return recall_stats(user_factors.sparkSession.read.parquet(output_path), config.list_length)


def save_recall_lists(recall_lists: DataFrame, path: str) -> None:
    """Parquet copy of the lists for offline ranking, written the cheap way.

    Ad ids are near-random 32-bit integers that neither a dictionary nor snappy
    shrinks, while parquet's default dictionary attempt costs about 130 us of CPU per
    500-id list against about 35 us for plain, uncompressed pages (measured).
    """
    (recall_lists.write.mode("overwrite")
     .option("compression", "none")
     .option("parquet.enable.dictionary", "false")
     .parquet(path))


def recall_stats(recall_lists: DataFrame, list_length: int) -> RecallStats:
    """Counts over (ad_ids, personal) rows, e.g. for the quality report."""
    length = sf.size("ad_ids")
    row = recall_lists.agg(
        sf.count(sf.lit(1)).alias("users"),
        sf.sum((length == list_length).cast("long")).alias("full_lists"),
        sf.sum((sf.col("personal") < length).cast("long")).alias("filled_users"),
        sf.sum("personal").alias("personal_ads"),
        sf.sum(length - sf.col("personal")).alias("fallback_ads"),
    ).first()
    return RecallStats(**{name: int(row[name] or 0) for name in _STATS_FIELDS})


def write_recall_lists(recall_lists: DataFrame, redis: RedisSettings, version: str) -> int:
    """Load precomputed (user_id, ad_ids) rows into ``version``; returns keys written."""

    def put(writer: VersionWriter, batch: pa.RecordBatch) -> int:
        lists = batch.column("ad_ids")
        flat = pc.list_flatten(lists).to_numpy()
        bounds = pc.list_value_length(lists).to_numpy().cumsum()
        return writer.put_recall_lists(batch.column("user_id").to_numpy(),
                                       np.split(flat, bounds[:-1]))

    return write_from_executors(recall_lists.select("user_id", "ad_ids"), redis, version, put)


def _partition_recall(
    catalog: RecallCatalog,
    config: RecallConfig,
    sink: tuple[RedisSettings, str] | None,
    output: Callable[[RecallChunk], pa.RecordBatch],
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    rank = catalog.cate_factors.shape[1]

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        client = connect(sink[0]) if sink else None
        writer = VersionWriter(client, sink[1]) if sink else None
        try:
            # Spark runs a Python worker per core: BLAS threads on top would oversubscribe.
            with threadpool_limits(limits=1, user_api="blas"):
                for batch in batches:
                    user_ids = batch.column("user_id").to_numpy()
                    factors = pc.list_flatten(batch.column("als_factors")).to_numpy()
                    factors = factors.reshape(len(user_ids), rank)
                    for first in range(0, len(user_ids), config.chunk_users):
                        block = slice(first, first + config.chunk_users)
                        chunk = recall_chunk(catalog, config, user_ids[block], factors[block])
                        if writer:
                            writer.put_recall_lists(chunk.user_ids, chunk.lists())
                        yield output(chunk)
        finally:
            if client:
                client.close()

    return run


def _chunk_stats(chunk: RecallChunk) -> pa.RecordBatch:
    lengths, personal = chunk.lengths.astype(np.int64), chunk.personal.astype(np.int64)
    counts = {
        "users": len(lengths),
        "full_lists": int((lengths == chunk.ad_ids.shape[1]).sum()),
        "filled_users": int((personal < lengths).sum()),
        "personal_ads": int(personal.sum()),
        "fallback_ads": int((lengths - personal).sum()),
    }
    return pa.RecordBatch.from_arrays([pa.array([counts[name]], pa.int64())
                                       for name in _STATS_FIELDS], names=_STATS_FIELDS)


# ------------------------------------------------------------------ quality


@dataclasses.dataclass(frozen=True)
class HitRate:
    clicked_pairs: int  # distinct (user, ad) pairs clicked on the test day
    hits: int  # of those, pairs whose ad is in the user's list
    pairs_on_fallback: int  # pairs of users without a recall list, judged on the fallback

    @property
    def rate(self) -> float:
        return self.hits / self.clicked_pairs if self.clicked_pairs else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "rate": self.rate}


def recall_hit_rate(
    test_samples: DataFrame, recall_lists: DataFrame | None, fallback: Sequence[int]
) -> HitRate:
    """Share of test-day clicked (user, ad) pairs whose ad is in the user's list.

    A user without a recall list is judged on ``fallback``, as serving would answer
    it; ``recall_lists=None`` gives everyone the fallback (the popularity baseline).
    The clicks are few, so they are broadcast to the lists: no shuffle of the lists.
    """
    clicked = (
        test_samples.where(sf.col("clk") == 1)
        .select(sf.col("user_id").cast("int"), sf.col("adgroup_id").cast("int"))
        .distinct()
        .groupBy("user_id")
        .agg(sf.collect_list("adgroup_id").alias("clicked"))
    )
    fallback_ids = sf.array(*(sf.lit(int(a)) for a in fallback)).cast("array<int>")
    without_list = clicked
    hits = pairs = 0
    if recall_lists is not None:
        with_list = recall_lists.select("user_id", "ad_ids").join(
            sf.broadcast(clicked), "user_id"
        )
        row = with_list.agg(
            sf.sum(sf.size("clicked")).alias("pairs"),
            sf.sum(sf.size(sf.array_intersect("clicked", "ad_ids"))).alias("hits"),
        ).first()
        pairs, hits = int(row["pairs"] or 0), int(row["hits"] or 0)
        without_list = clicked.join(recall_lists.select("user_id"), "user_id", "left_anti")
    row = without_list.agg(
        sf.sum(sf.size("clicked")).alias("pairs"),
        sf.sum(sf.size(sf.array_intersect("clicked", fallback_ids))).alias("hits"),
    ).first()
    fallback_pairs = int(row["pairs"] or 0)
    return HitRate(pairs + fallback_pairs, hits + int(row["hits"] or 0), fallback_pairs)
