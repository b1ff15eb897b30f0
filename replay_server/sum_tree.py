"""A vectorised sum-tree for proportional prioritized sampling.

Leaves live at ``[size, 2*size)`` of one float64 array (``size`` a power of two, node ``i``
has children ``2i`` and ``2i+1``, the root is node 1). Parents are always recomputed from
their children, never adjusted by deltas, so rounding errors do not accumulate.
"""
from __future__ import annotations

import numpy as np


class SumTree:
    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.size = 1 << max(0, (self.capacity - 1).bit_length())
        self.depth = self.size.bit_length() - 1
        self.tree = np.zeros(2 * self.size, dtype=np.float64)

    @property
    def total(self) -> float:
        return float(self.tree[1])

    def get(self, indices) -> np.ndarray:
        return self.tree[np.asarray(indices, dtype=np.int64) + self.size]

    def set(self, indices, values) -> None:
        """Set leaf ``indices`` to ``values`` (>= 0). With duplicate indices the last one wins."""
        idx = np.asarray(indices, dtype=np.int64).ravel()
        vals = np.asarray(values, dtype=np.float64).ravel()
        if idx.size == 0:
            return
        if idx.min() < 0 or idx.max() >= self.capacity:
            raise IndexError("sum-tree index out of range")
        if vals.size == 1 and idx.size > 1:
            vals = np.full(idx.size, vals[0])
        if not np.all(vals >= 0):
            raise ValueError("sum-tree values must be >= 0")
        # keep the last occurrence of each index
        rev_unique, rev_pos = np.unique(idx[::-1], return_index=True)
        nodes = rev_unique + self.size
        self.tree[nodes] = vals[::-1][rev_pos]
        if idx.size > 64 and (rev_unique[-1] - rev_unique[0]) + 1 == rev_unique.size:
            self._refresh_range(int(rev_unique[0]), int(rev_unique[-1]) + 1)
            return
        while nodes[0] > 1:
            nodes = np.unique(nodes >> 1)
            self.tree[nodes] = self.tree[2 * nodes] + self.tree[2 * nodes + 1]

    def _refresh_range(self, lo: int, hi: int) -> None:
        lo += self.size
        hi += self.size
        while lo > 1:
            lo >>= 1
            hi = (hi + 1) >> 1
            kids = self.tree[2 * lo: 2 * hi]
            self.tree[lo:hi] = kids[0::2] + kids[1::2]

    def find(self, values) -> np.ndarray:
        """Leaf index whose prefix-sum interval contains each value in ``[0, total)``."""
        u = np.array(values, dtype=np.float64, copy=True).ravel()
        node = np.ones(u.size, dtype=np.int64)
        tree = self.tree
        for _ in range(self.depth):
            left = 2 * node
            lsum = tree[left]
            right = (u >= lsum) & (tree[left + 1] > 0)
            u -= np.where(right, lsum, 0.0)
            node = left + right
        return node - self.size

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Stratified proportional sampling of ``n`` leaves (one draw per equal slice of the total)."""
        total = self.total
        if not total > 0:
            raise ValueError("cannot sample from an empty sum-tree")
        u = (np.arange(n) + rng.random(n)) * (total / n)
        np.minimum(u, np.nextafter(total, 0), out=u)
        return self.find(u)
