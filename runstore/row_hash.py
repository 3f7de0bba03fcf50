"""A uniform-looking 64-bit value per dataset row number, fixed by (seed, salt): how rows
are held out, put in random parts and sampled, with no permutation of a dataset in memory."""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 whose outputs look uniform."""
    x = x ^ (x >> np.uint64(30))
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_hash(ids: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """uint64 [n]: a uniform-looking value per row number, fixed by (seed, salt); distinct
    row numbers get distinct values (the map is a bijection)."""
    key = _mix(np.array([seed % (1 << 64)], np.uint64) * _GOLDEN + np.uint64(salt))
    return _mix(np.asarray(ids).astype(np.uint64) * _GOLDEN + key)
