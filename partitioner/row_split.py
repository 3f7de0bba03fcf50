"""Per-row decisions from a hash of (seed, row number): which rows are held out, and
balanced random parts, with no permutation of the whole dataset in memory."""

from __future__ import annotations

import numpy as np

from runstore.row_hash import row_hash

CHUNK = 1 << 20  # rows hashed at a time when counting over the whole dataset


class HeldoutSplit:
    """A row is held out when its hash falls under `fraction` of the hash range; when no
    row of `pool` would, the row with the smallest hash is, so evaluation has a row."""

    SALT = 1

    def __init__(self, seed: int, fraction: float, pool: np.ndarray | int) -> None:
        self.seed = seed
        self.threshold = np.uint64(min(int(fraction * 2.0**64), (1 << 64) - 1))
        held, smallest = 0, None
        for ids in _chunks(pool):
            hashes = row_hash(ids, seed, self.SALT)
            held += int((hashes < self.threshold).sum())
            low = hashes.min()
            smallest = low if smallest is None else min(smallest, low)
        if held == 0 and smallest is not None:
            self.threshold = np.uint64(int(smallest) + 1)
            held = 1
        total = pool if isinstance(pool, int) else len(pool)
        self.heldout_rows = held
        self.train_rows = total - held

    def heldout(self, ids: np.ndarray) -> np.ndarray:
        return row_hash(ids, self.seed, self.SALT) < self.threshold


def _chunks(pool: np.ndarray | int):
    total = pool if isinstance(pool, int) else len(pool)
    for start in range(0, total, CHUNK):
        stop = min(start + CHUNK, total)
        yield np.arange(start, stop, dtype=np.int64) if isinstance(pool, int) else \
            pool[start:stop]


def balanced_parts(ordinals: np.ndarray, parts: int, seed: int, salt: int) -> np.ndarray:
    """int64 part of the `ordinals`-th rows of a sequence: each run of `parts` consecutive
    rows takes a seeded random permutation of the parts, so part sizes differ by at most
    one over any prefix of the sequence, and the parts are random, not striped."""
    ordinals = np.asarray(ordinals, dtype=np.int64)
    if len(ordinals) == 0:
        return np.zeros(0, np.int64)
    blocks = ordinals // parts
    first = int(blocks.min())
    span = np.arange(first, int(blocks.max()) + 1, dtype=np.int64)
    keys = row_hash(span[:, None] * parts + np.arange(parts), seed, salt)
    permutations = np.argsort(keys, axis=1, kind="stable")
    return permutations[blocks - first, ordinals % parts].astype(np.int64)
