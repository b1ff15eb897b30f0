"""A vectorised sum-tree for proportional prioritized sampling.

Leaves live at ``[size, 2*size)`` of one float64 array (``size`` a power of two, node ``i``
has children ``2i`` and ``2i+1``, the root is node 1). Parents are always recomputed from
their children, never adjusted by deltas, so rounding errors do not accumulate.

Speed notes (a batch costs a few numpy calls per tree level, whatever its size; numpy's
per-call overhead, not arithmetic, is what a 512-item sample or update pays for):

* scattered updates (:meth:`set`) sort only when the indices are not sorted already (sampled
  slots are), then recompute the touched ancestors as "written child + its sibling" (a
  parent listed twice is written twice with the same value); once the touched nodes span a
  narrow range, the rest of the way up is a dense range refresh.
* contiguous leaf ranges (what an insert into the ring writes) go through :meth:`set_range`:
  no sorting, one vectorised addition per level, plain float additions near the root.
* :meth:`find` resolves the top ``TOP_LEVELS`` levels with one prefix sum and one
  ``searchsorted``, descends the rest without the zero-mass guard, and re-runs the guarded
  descent only for the (rare) draws that rounding sent into a zero-mass subtree.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

TOP_LEVELS = 11  # levels that find() resolves with one prefix sum + searchsorted
DENSE_SPAN = 4096  # an update recomputes whole spans of up to this many nodes densely
STRATA_CACHED = 8  # sample sizes whose stratum offsets are kept (least recently used goes)


class SumTree:
    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.size = 1 << max(0, (self.capacity - 1).bit_length())
        self.depth = self.size.bit_length() - 1
        self.tree = np.zeros(2 * self.size, dtype=np.float64)
        # a learner asks for a few sizes over and over; a bounded LRU, because one entry per size
        # ever asked grew as n**2 (2,500 distinct sizes kept 25 MB)
        self._strata: OrderedDict[int, np.ndarray] = OrderedDict()
        self._shifts = np.arange(self.depth + 1, dtype=np.int64)[:, None]
        self._top = min(self.depth, TOP_LEVELS)
        self._cum = np.zeros((1 << self._top) + 1, dtype=np.float64)

    @property
    def total(self) -> float:
        return float(self.tree[1])

    def get(self, indices) -> np.ndarray:
        return self.tree[np.asarray(indices, dtype=np.int64) + self.size]

    # -- updates ---------------------------------------------------------------------------

    def set(self, indices, values) -> None:
        """Set leaf ``indices`` to ``values`` (>= 0). With duplicate indices the last one wins."""
        idx = np.asarray(indices, dtype=np.int64).ravel()
        vals = np.asarray(values, dtype=np.float64).ravel()
        m = idx.size
        if m == 0:
            return
        # one reduction checks both bounds: negative indices become huge as unsigned
        if int(idx.view(np.uint64).max()) >= self.capacity:
            raise IndexError("sum-tree index out of range")
        if vals.size == 1 and m > 1:
            vals = np.full(m, vals[0])
        elif vals.size != m:
            raise ValueError(f"{m} indices but {vals.size} values")
        if not vals.min() >= 0:  # also refuses NaN
            raise ValueError("sum-tree values must be >= 0")
        if m > 1:
            step = idx[1:] - idx[:-1]
            lo_step = step.min()
            if lo_step <= 0:
                if lo_step < 0:  # unsorted: a stable sort keeps duplicates in their given order
                    order = np.argsort(idx, kind="stable")
                    idx = idx[order]
                    vals = vals[order]
                    step = idx[1:] - idx[:-1]
                last = np.empty(m, dtype=bool)  # the last of each run of equal indices wins
                np.not_equal(step, 0, out=last[:-1])
                last[-1] = True
                if not last.all():
                    idx = idx[last]
                    vals = vals[last]
        nodes = idx + self.size
        self.tree[nodes] = vals
        self._propagate(nodes, vals)

    def set_range(self, start: int, values) -> None:
        """Set the leaves ``start, start+1, ...`` to ``values`` (>= 0): the ring-insert fast path."""
        vals = np.asarray(values, dtype=np.float64).ravel()
        n = vals.size
        if n == 0:
            return
        start = int(start)
        if start < 0 or start + n > self.capacity:
            raise IndexError("sum-tree index out of range")
        if not vals.min() >= 0:
            raise ValueError("sum-tree values must be >= 0")
        self._write_range(start, vals)

    def _write_range(self, start: int, vals: np.ndarray) -> None:
        """:meth:`set_range` without the checks (the caller made them)."""
        n = vals.size
        lo = start + self.size
        self.tree[lo : lo + n] = vals
        self._refresh_nodes(lo, lo + n)

    def _propagate(self, nodes: np.ndarray, vals: np.ndarray) -> None:
        """Recompute every ancestor of ``nodes`` (sorted, distinct node ids of one level whose
        values ``vals`` were just written).

        While the touched nodes are spread out, a parent is its written child plus that child's
        sibling: one gather, one add and one scatter per level, all ancestors computed up front.
        A parent listed twice gets the same sum twice. Once the touched parents span a narrow
        range, the rest of the way up is a dense range refresh.
        """
        if self.size == 1:  # the only leaf is the root
            return
        tree = self.tree
        limit = max(4 * nodes.size, DENSE_SPAN)
        lo, hi = int(nodes[0]), int(nodes[-1])
        steps = 0
        while (hi >> (steps + 1)) - (lo >> (steps + 1)) + 1 >= limit:
            steps += 1
        if steps:
            anc = nodes >> self._shifts[: steps + 1]  # [steps + 1, m]: the nodes, then their ancestors
            sib = anc[:steps] ^ 1
            for level in range(steps):
                vals = vals + tree.take(sib[level])
                tree[anc[level + 1]] = vals
            lo, hi = int(anc[steps, 0]), int(anc[steps, -1])
        self._refresh_nodes(lo, hi + 1)

    def _refresh_nodes(self, lo: int, hi: int) -> None:
        """Recompute the ancestors of the nodes ``[lo, hi)`` of one level."""
        tree = self.tree
        lo >>= 1
        hi = (hi + 1) >> 1
        while lo >= 1:
            if hi - lo <= 3:  # a few nodes per level: plain float additions beat numpy calls
                item = tree.item
                while True:
                    for i in range(lo, hi):
                        tree[i] = item(2 * i) + item(2 * i + 1)
                    if lo == 1:
                        return
                    lo >>= 1
                    hi = (hi + 1) >> 1
            np.add(tree[2 * lo : 2 * hi : 2], tree[2 * lo + 1 : 2 * hi : 2], out=tree[lo:hi])
            if lo == 1:
                break
            lo >>= 1
            hi = (hi + 1) >> 1

    def _refresh_range(self, lo: int, hi: int) -> None:
        """Recompute the ancestors of the leaves ``[lo, hi)``."""
        self._refresh_nodes(lo + self.size, hi + self.size)

    # -- queries ---------------------------------------------------------------------------

    def find(self, values) -> np.ndarray:
        """Leaf index whose prefix-sum interval contains each value in ``[0, total)``."""
        return self._find(np.array(values, dtype=np.float64, copy=True).ravel())[0]

    def _find(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Leaves for the draws ``u`` (consumed) and their values.

        The top ``_top`` levels are resolved at once: a prefix sum over the nodes of level
        ``_top`` (a few thousand numbers) and one ``searchsorted``; the levels below descend
        as usual. Both use the same tree; they can differ from a pure descent only for a draw
        within rounding (~1e-16 of the total) of a boundary between two leaves.
        """
        tree = self.tree
        if u.size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float64)
        orig = u.copy()
        top = self._top
        if top:
            lo = 1 << top
            cum = self._cum
            np.cumsum(tree[lo : 2 * lo], out=cum[1:])
            node = np.searchsorted(cum, u, side="right")
            node -= 1  # cum[node] <= u < cum[node + 1]
            np.minimum(node, lo - 1, out=node)
            u -= cum.take(node)
            node += lo
        else:
            node = np.ones(u.size, dtype=np.int64)
        for _ in range(self.depth - top):
            node <<= 1
            lsum = tree.take(node)
            right = u >= lsum
            lsum *= right
            u -= lsum
            node += right
        vals = tree.take(node)
        if not vals.min() > 0:  # rounding led into a zero-mass subtree: redo those with the guard
            bad = np.flatnonzero(vals <= 0)
            node[bad] = self._find_guarded(orig[bad])
            vals = tree.take(node)
        return node - self.size, vals

    def _find_guarded(self, u: np.ndarray) -> np.ndarray:
        """Descend never entering a right subtree without mass (node ids)."""
        tree = self.tree
        node = np.ones(u.size, dtype=np.int64)
        for _ in range(self.depth):
            left = 2 * node
            lsum = tree[left]
            right = (u >= lsum) & (tree[left + 1] > 0)
            u -= np.where(right, lsum, 0.0)
            node = left + right
        return node

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Stratified proportional sampling of ``n`` leaves (one draw per equal slice of the total)."""
        return self.sample_with_values(n, rng)[0]

    def sample_with_values(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`sample`, also returning each drawn leaf's value (its unnormalised probability)."""
        total = self.total
        if not total > 0:
            raise ValueError("cannot sample from an empty sum-tree")
        strata = self._strata.get(n)
        if strata is None:
            strata = self._strata[n] = np.arange(n, dtype=np.float64)
            if len(self._strata) > STRATA_CACHED:
                self._strata.popitem(last=False)
        else:
            self._strata.move_to_end(n)
        u = rng.random(n)
        u += strata
        u *= total / n
        np.minimum(u, np.nextafter(total, 0), out=u)
        return self._find(u)
