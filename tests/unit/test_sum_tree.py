import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apexq.replay_server.sum_tree import SumTree


def test_hand_computed_tree():
    t = SumTree(4)
    t.set([0, 1, 2, 3], [1.0, 2.0, 3.0, 4.0])
    assert t.total == 10.0
    assert list(t.tree[1:4]) == [10.0, 3.0, 7.0]
    # prefix sums: [0,1) -> 0, [1,3) -> 1, [3,6) -> 2, [6,10) -> 3
    np.testing.assert_array_equal(t.find([0.0, 0.99, 1.0, 2.99, 3.0, 5.99, 6.0, 9.99]), [0, 0, 1, 1, 2, 2, 3, 3])
    t.set([1], [0.0])
    assert t.total == 8.0
    np.testing.assert_array_equal(t.find([1.0, 3.99]), [2, 2])


@settings(max_examples=60, deadline=None)
@given(
    cap=st.integers(1, 300),
    ops=st.lists(st.tuples(st.integers(0, 299), st.floats(0, 100, allow_nan=False)), min_size=1, max_size=200),
)
def test_matches_brute_force(cap, ops):
    t = SumTree(cap)
    ref = np.zeros(cap)
    idx = np.array([i % cap for i, _ in ops])
    vals = np.array([v for _, v in ops])
    # apply in random-sized chunks, duplicates included (last write wins)
    for chunk in np.array_split(np.arange(len(ops)), max(1, len(ops) // 17)):
        t.set(idx[chunk], vals[chunk])
        for j in chunk:
            ref[idx[j]] = vals[j]
    assert t.total == pytest.approx(ref.sum(), rel=1e-12, abs=1e-9)
    np.testing.assert_allclose(t.get(np.arange(cap)), ref)
    if ref.sum() > 0:
        cum = np.cumsum(ref)
        us = np.random.default_rng(0).uniform(0, ref.sum(), 50)
        expected = np.searchsorted(cum, us, side="right")
        got = t.find(us)
        # exact up to float ties at boundaries: the found leaf's interval must contain u
        lo = np.concatenate([[0.0], cum])[got]
        assert np.all(ref[got] > 0)
        assert np.all((lo <= us + 1e-9) & (us < cum[got] + 1e-9)), (got, expected)


def test_contiguous_range_update_matches_scattered_update():
    a, b = SumTree(1000), SumTree(1000)
    vals = np.random.default_rng(1).uniform(0, 5, 300)
    a.set(np.arange(500, 800), vals)  # contiguous fast path
    for i, v in zip(range(500, 800), vals):  # one at a time
        b.set([i], [v])
    np.testing.assert_allclose(a.tree, b.tree)


def test_sampling_distribution_chi_square():
    rng = np.random.default_rng(1234)
    p = np.array([1, 2, 3, 4, 0, 10, 0.5, 7.5])
    t = SumTree(len(p))
    t.set(np.arange(len(p)), p)
    draws = np.concatenate([t.sample(64, rng) for _ in range(2000)])
    counts = np.bincount(draws, minlength=len(p))
    assert counts[4] == 0
    nz = p > 0
    expected = p[nz] / p.sum() * draws.size
    chi2 = float(((counts[nz] - expected) ** 2 / expected).sum())
    # 7 non-zero cells -> 6 degrees of freedom; the 0.999 quantile of chi2(6) is 22.458
    assert chi2 < 22.458, (counts, expected)
    # and the test has power: a wrong distribution (uniform) fails it by far
    wrong = np.full(nz.sum(), draws.size / nz.sum())
    assert float(((counts[nz] - wrong) ** 2 / wrong).sum()) > 1000


def test_empty_tree_cannot_sample():
    with pytest.raises(ValueError):
        SumTree(4).sample(2, np.random.default_rng(0))
