"""Counter-based randomness: every random number is a hash of (seed, user id, counter).

No shared RNG stream is ever advanced, so a user's list depends only on the seed, its
factors and the catalog: not on chunk size, partitioning or retries. That also makes
writes idempotent: a retried task rewrites the same bytes. Counters are ad positions for
keyed sampling and draw numbers (offset by ``DRAW_COUNTER``) for sampling by draws.
"""

from __future__ import annotations

import numpy as np

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
# Draw numbers live far above any ad position, so the two kinds of counter never meet.
DRAW_COUNTER = np.uint64(1 << 62)
_UNIT = 2.0**-53


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer, in place: a bijection that scatters nearby counters."""
    z ^= z >> np.uint64(30)
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    return z


def user_streams(seed: int, user_ids: np.ndarray) -> np.ndarray:
    seed_key = _mix(np.array([seed & (2**64 - 1)], dtype=np.uint64))
    return _mix(user_ids.astype(np.uint64) * _GAMMA ^ seed_key)


def random_bits(streams: np.ndarray, counters: np.ndarray) -> np.ndarray:
    return _mix(streams + counters.astype(np.uint64) * _GAMMA)


def unit_interval(bits: np.ndarray) -> np.ndarray:
    """Uniform float64 in [0, 1) from the top 53 bits."""
    return (bits >> np.uint64(11)).astype(np.float64) * _UNIT
