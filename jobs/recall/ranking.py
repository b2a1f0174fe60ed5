"""Each user's top categories: scores ``U @ C.T`` and a deterministic top-k.

Equal scores rank the lower category index first, so the choice never depends on the
partition algorithm or on the chunk a user falls in.
"""

from __future__ import annotations

import numpy as np


def _scores(users: np.ndarray, cate_factors: np.ndarray) -> np.ndarray:
    # BLAS scores a single row (gemv) with other rounding than a block (gemm); padding
    # keeps a user's scores, hence its list, independent of the chunk it falls in.
    if len(users) == 1:
        doubled: np.ndarray = np.vstack([users, users]) @ cate_factors.T
        return doubled[:1]
    scores: np.ndarray = users @ cate_factors.T
    return scores


# Categories per block of the top-category prefilter.
_BLOCK = 64


def top_categories(users: np.ndarray, cate_factors: np.ndarray, count: int) -> np.ndarray:
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
    top: np.ndarray = np.take_along_axis(best, local // _BLOCK, axis=1) * _BLOCK + local % _BLOCK
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
