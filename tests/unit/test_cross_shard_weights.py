"""Sampling across shards without bias, and the importance weights of such a sample, by hand.

Shard A holds priorities [1, 1], shard B [2, 4]; alpha = 1 and eps = 0, so an item's mass is its
priority. Over the union (total mass 1 + 1 + 2 + 4 = 8) proportional sampling draws them with
P = [1/8, 1/8, 2/8, 4/8]. With N = 4 items and beta = 0.5, w_i = (N P_i) ** -0.5 is
[sqrt 2, sqrt 2, 1, 1/sqrt 2]; divided by the largest: [1, 1, 1/sqrt 2, 1/2].
The function that combines the shards is ``learner.prefetch.PrefetchSampler`` (split, fetch, prepare).
"""

import math
import time

import numpy as np
import torch
from default_components import shard_spec

from apexq.learner.prefetch import PrefetchSampler
from apexq.replay_server.codec import Block
from apexq.replay_server.shard import ReplayShard

# item id (written into obs[:, 0]) -> (shard, priority)
ITEMS = {0: (0, 1.0), 1: (0, 1.0), 2: (1, 2.0), 3: (1, 4.0)}
P = {0: 1 / 8, 1: 1 / 8, 2: 2 / 8, 3: 4 / 8}
W_BETA_HALF = {0: 1.0, 1: 1.0, 2: 1 / math.sqrt(2), 3: 0.5}


def shard(k: int, filled: bool = True) -> ReplayShard:
    n = sum(1 for s, _ in ITEMS.values() if s == k)
    sh = ReplayShard(
        shard_spec(
            shard_id=k,
            capacity=n,
            priority_alpha=1.0,
            priority_eps=0.0,
            samples_per_insert=1.0,
            min_size_to_sample=1,
            error_buffer=1e12,
        ),
        "",
        "t",
        seed=10 + k,
    )
    return fill(sh) if filled else sh


def fill(sh: ReplayShard) -> ReplayShard:
    ids = [i for i, (s, _) in ITEMS.items() if s == sh.spec.shard_id]
    obs = np.array([[i, 0.0] for i in ids], np.float32)
    n = len(ids)
    sh.insert(
        Block(
            obs,
            np.zeros(n, np.int32),
            np.zeros(n, np.float32),
            np.ones(n, np.float32),
            obs,
            np.array([ITEMS[i][1] for i in ids], np.float32),
        )
    )
    return sh


def sampler(batch: int, beta: float, seed: int = 0) -> PrefetchSampler:
    return PrefetchSampler(
        [shard(0), shard(1)], batch, 1, torch.device("cpu"), lambda: beta, inline=True, rng=np.random.default_rng(seed)
    )


def ids_of(batch: dict) -> np.ndarray:
    return batch["obs"][:, 0].numpy().astype(int)


def test_importance_weights_use_the_probability_over_all_shards():
    s = sampler(256, beta=0.5)
    for _ in range(5):
        b = s.get(timeout=1.0)
        ids, w = ids_of(b), b["weights"].numpy()
        assert set(ids) == {0, 1, 2, 3}  # 256 draws: every item is in the minibatch, so max w is item 0's
        for i in range(4):
            np.testing.assert_allclose(w[ids == i], W_BETA_HALF[i], rtol=1e-6)
        # each item came back tagged with the shard it lives in (priorities go back there)
        assert all(b["shard"][ids == i].tolist() == [ITEMS[i][0]] * int((ids == i).sum()) for i in range(4))


def test_beta_one_weights_are_inverse_probabilities():
    b = sampler(256, beta=1.0).get(timeout=1.0)
    ids, w = ids_of(b), b["weights"].numpy()
    # w = 1 / (4 P) = [2, 2, 1, 0.5], normalised by 2
    for i, expected in {0: 1.0, 1: 1.0, 2: 0.5, 3: 0.25}.items():
        np.testing.assert_allclose(w[ids == i], expected, rtol=1e-6)


def test_items_are_drawn_with_their_probability_over_the_union_from_the_first_request_on():
    """The split over shards follows their priority mass from the very first request: with
    equal shares for shards not heard from yet, A's two items were drawn 2x too often."""
    n = 8000
    s = sampler(n, beta=0.5, seed=1)
    first = np.bincount(ids_of(s.get(timeout=1.0)), minlength=4)
    # B's share is a binomial(8000, 3/4) draw: sd 39; items inside a shard are stratified
    for i in range(4):
        assert abs(first[i] - n * P[i]) < 200, (i, first.tolist(), [n * P[j] for j in range(4)])
    counts = first.copy()
    for _ in range(9):
        counts += np.bincount(ids_of(s.get(timeout=1.0)), minlength=4)
    np.testing.assert_allclose(counts / counts.sum(), [P[i] for i in range(4)], atol=0.005)


def test_a_shard_that_was_empty_gets_its_share_once_it_holds_items():
    """A shard reported empty got no share of a request, so it was never asked again and never sampled."""
    a, b = shard(0), shard(1, filled=False)
    s = PrefetchSampler([a, b], 256, 1, torch.device("cpu"), lambda: 0.5, inline=True, rng=np.random.default_rng(2))
    assert set(ids_of(s.get(timeout=3.0))) == {0, 1}  # B is empty: everything comes from A
    fill(b)
    deadline = time.monotonic() + 5.0
    while not {2, 3} & set(ids_of(s.get(timeout=1.0))):
        assert time.monotonic() < deadline, "shard B was never sampled after it filled"
        time.sleep(0.05)
    counts = sum(np.bincount(ids_of(s.get(timeout=1.0)), minlength=4) for _ in range(20))
    np.testing.assert_allclose(counts / counts.sum(), [P[i] for i in range(4)], atol=0.01)
