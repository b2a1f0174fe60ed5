"""Random streams and the vectorized draws and formulas the world and the rows share.

Nothing here knows the world: these are plain functions of numpy arrays and generators.
"""

from __future__ import annotations

import math

import numpy as np

from adrec.synthetic.truth import MISSING


class Stream:
    """Spawn keys of the independent random streams; part of the output definition."""

    CATEGORIES = 0
    ADS = 1
    USERS = 2
    COUNTS = 3
    CALIBRATION = 4
    BLOCK = 5
    #: Advertiser bids: a stream of its own, so adding them changed no other draw.
    BIDS = 6


def random_stream(seed: int, stream: int, index: int = 0) -> np.random.Generator:
    sequence = np.random.SeedSequence(seed, spawn_key=(stream, index))
    return np.random.Generator(np.random.PCG64(sequence))


def zipf_weights(ranks: np.ndarray, exponent: float) -> np.ndarray:
    return (ranks + 1.0) ** -exponent


def zipf_ranks(rng: np.random.Generator, sizes: np.ndarray, exponent: float) -> np.ndarray:
    """A rank in ``[0, size)`` per draw with P(rank r) roughly proportional to (r + 1)^-exponent.

    Inverts the continuous power law on ``[1, size + 1)``; ``exponent`` must not be 1.
    """
    power = 1.0 - exponent
    top = (sizes + 1.0) ** power
    drawn = (1.0 + rng.random(len(sizes)) * (top - 1.0)) ** (1.0 / power)
    ranks: np.ndarray = np.minimum(drawn.astype(np.int64) - 1, sizes - 1)
    return ranks


def draw_levels(
    rng: np.random.Generator, shares: dict[int, float], n: int, missing_share: float = 0.0
) -> np.ndarray:
    levels = rng.choice(np.array(list(shares)), size=n, p=list(shares.values()))
    if missing_share:
        levels[rng.random(n) < missing_share] = MISSING
    return levels


def random_group_sizes(rng: np.random.Generator, items: int, groups: int) -> np.ndarray:
    """Sizes (each at least one) of ``groups`` consecutive groups covering ``items`` items."""
    cuts = np.sort(rng.choice(items - 1, groups - 1, replace=False) + 1)
    return np.diff(np.concatenate([[0], cuts, [items]]))


def sparse_ids(rng: np.random.Generator, n: int, spread: float) -> np.ndarray:
    """``n`` distinct positive ids in random order, drawn from 1..about n * spread."""
    return (rng.choice(math.ceil(n * spread), n, replace=False) + 1).astype(np.int32)


def starts(counts: np.ndarray) -> np.ndarray:
    """Where each run of ``counts`` begins when the runs are laid end to end."""
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def normalized(weights: np.ndarray) -> np.ndarray:
    shares: np.ndarray = weights / weights.sum()
    return shares


def sigmoid(logits: np.ndarray) -> np.ndarray:
    probabilities: np.ndarray = 1.0 / (1.0 + np.exp(-logits))
    return probabilities


def solve_intercept(logits: np.ndarray, target_mean: float) -> float:
    """The intercept b with mean(sigmoid(b + logits)) == target_mean, by bisection."""
    low, high = -30.0, 30.0
    logits = logits.astype(np.float64)
    for _ in range(60):
        middle = (low + high) / 2
        if sigmoid(middle + logits).mean() < target_mean:
            low = middle
        else:
            high = middle
    return (low + high) / 2
