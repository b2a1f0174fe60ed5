"""Sampling distinct ads from each (user, category) segment of a chunk, vectorized.

A taken-whole category and a small sampled one get one random key per ad (uniform:
random bits; popular: ``Exp(1) / weight``) and a single sort of packed
``(segment, key, position)`` integers orders every segment of the chunk at once. A
sampled category much larger than its quota instead draws with replacement (popular:
through a guide table over cumulative weights, O(1) per draw) and keeps first
occurrences, which is the same distribution at the cost of the quota rather than of
the category size; it is chosen when its expected draws are clearly cheaper.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jobs.recall.catalog import RecallCatalog
from jobs.recall.randomness import DRAW_COUNTER, random_bits, unit_interval


@dataclasses.dataclass(frozen=True)
class Segments:
    """The (user, category) pairs a chunk takes ads from, in (user, rank) order."""

    row: np.ndarray  # user row in the chunk
    cate: np.ndarray  # catalog category index
    take: np.ndarray  # ads to take
    size: np.ndarray  # ads in the category
    start: np.ndarray  # list position of the first ad taken

    def subset(self, selection: np.ndarray | slice) -> Segments:
        """The segments a boolean mask or a slice selects."""
        return Segments(*(getattr(self, f.name)[selection] for f in dataclasses.fields(self)))

    def __len__(self) -> int:
        return len(self.row)


def walk(top: np.ndarray, sizes: np.ndarray, length: int) -> tuple[Segments, np.ndarray]:
    size = sizes[top]
    before = np.cumsum(size, axis=1) - size
    take = np.clip(length - before, 0, size)
    rows, ranks = np.nonzero(take)
    segments = Segments(
        rows, top[rows, ranks], take[rows, ranks], size[rows, ranks], before[rows, ranks]
    )
    return segments, take.sum(axis=1)


# A with-replacement draw (two sorts to deduplicate, rounds) costs a few keyed items.
DRAW_COST = 4.0


def draw_bound(catalog: RecallCatalog, popular: bool, segments: Segments) -> np.ndarray:
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


def sample_by_keys(
    catalog: RecallCatalog,
    popular: bool,
    streams: np.ndarray,
    segments: Segments,
    out: np.ndarray,
) -> None:
    """Give every ad of each segment's category a random key; keep the ``take`` smallest."""
    segment_bits = 64 - _KEY_BITS - catalog.position_bits
    if segment_bits < 1:
        raise ValueError("a category is too large to pack its positions in 32 bits")
    ends = np.cumsum(segments.size)
    first = 0
    while first < len(segments):
        budget = np.searchsorted(
            ends, ends[first] - segments.size[first] + _GROUP_ITEMS, side="right"
        )
        last = min(max(int(budget), first + 1), first + (1 << segment_bits))
        _sample_group_by_keys(catalog, popular, streams, segments.subset(slice(first, last)), out)
        first = last


def _sample_group_by_keys(
    catalog: RecallCatalog,
    popular: bool,
    streams: np.ndarray,
    segments: Segments,
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
    bits = random_bits(np.repeat(streams[segments.row], counts), item)
    if popular:
        # Exponential clocks Exp(1) / weight, smallest first (Efraimidis-Spirakis), in
        # float32: 23 random bits per clock order thousands of ads, at float32 speed.
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


def sample_by_draws(
    catalog: RecallCatalog,
    popular: bool,
    streams: np.ndarray,
    segments: Segments,
    out: np.ndarray,
) -> None:
    """Draw with replacement and keep first occurrences until ``take`` distinct ads.

    The sequence of first occurrences of i.i.d. draws is exactly a sample without
    replacement in selection order (successive sampling); each round draws only for the
    segments still short, so a segment's draws depend on nothing but its own counters.
    """
    if not len(segments):
        return
    wanted = np.ceil(draw_bound(catalog, popular, segments)).astype(np.int64) + 8
    drawn = np.zeros(len(segments), dtype=np.int64)
    pending = np.arange(len(segments))
    draws: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    while pending.size:
        counts = wanted[pending]
        segment = np.repeat(pending, counts)
        number = np.repeat(drawn[pending] - (np.cumsum(counts) - counts), counts) + np.arange(
            counts.sum()
        )
        bits = random_bits(streams[segments.row[segment]], number.astype(np.uint64) + DRAW_COUNTER)
        draws.append((segment, number, _pick(catalog, popular, segments.cate[segment], bits)))
        drawn[pending] += counts
        segment, number, position = _first_occurrences(
            *map(np.concatenate, zip(*draws, strict=True))
        )
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
            np.int64
        ),
        (by_draw & np.uint64((1 << position_bits) - 1)).astype(np.int64),
    )


def _pick(catalog: RecallCatalog, popular: bool, cate: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """One draw per entry: a position inside category ``cate`` (popular: by weight)."""
    unit = unit_interval(bits)
    size = catalog.sizes[cate]
    if not popular:
        uniform: np.ndarray = np.minimum((unit * size).astype(np.int64), size - 1)
        return uniform
    first = catalog.offsets[cate]
    total = catalog.category_weights[cate]
    ticket = np.minimum((unit * total).astype(np.int64), total - 1)
    item = catalog.guide[first + ticket * size // total]
    ticket += catalog.ticket_starts[first]
    ahead = np.flatnonzero(catalog.ticket_starts[item + 1] <= ticket)
    while ahead.size:
        item[ahead] += 1
        ahead = ahead[catalog.ticket_starts[item[ahead] + 1] <= ticket[ahead]]
    by_weight: np.ndarray = item - first
    return by_weight
