"""Temporally-extended epsilon-greedy, step by step with a scripted random source."""

import numpy as np
import pytest

from apexq.actors.exploration import TemporallyExtendedEpsilonGreedy


class Scripted:
    """Stands in for numpy's Generator: returns the values given, in order, per method."""

    def __init__(self, random, integers=(), zipf=()):
        self._random, self._integers, self._zipf = list(random), list(integers), list(zipf)

    def random(self, n):
        return np.array(self._random.pop(0), np.float64)

    def integers(self, low, high, n):
        out = np.array(self._integers.pop(0))
        assert out.shape == (n,) and (out >= low).all() and (out < high).all()
        return out

    def zipf(self, mu, n):
        return np.array(self._zipf.pop(0))


def test_a_random_action_is_held_for_its_drawn_duration_then_greedy_again():
    rng = Scripted(random=[[0.1, 0.9], [0.0, 0.9], [0.0, 0.9], [0.9, 0.1]], integers=[[2], [0]], zipf=[[3], [1]])
    ex = TemporallyExtendedEpsilonGreedy(np.array([0.5, 0.5]), 3, rng, mu=1.5, max_duration=50)
    greedy = np.array([1, 1])
    # step 1: env 0 starts exploring (0.1 < 0.5) with action 2 for 3 steps; env 1 greedy
    assert ex.select(greedy).tolist() == [2, 1]
    # steps 2-3: env 0 keeps action 2 although its draws (0.0) would start a new run
    assert ex.select(greedy).tolist() == [2, 1]
    assert ex.select(greedy).tolist() == [2, 1]
    # step 4: env 0's run is over and 0.9 >= 0.5: greedy; env 1 starts a 1-step run of action 0
    assert ex.select(greedy).tolist() == [1, 0]


def test_durations_are_capped_and_episode_ends_stop_a_run():
    rng = Scripted(random=[[0.0], [0.9], [0.9]], integers=[[0]], zipf=[[1000]])
    ex = TemporallyExtendedEpsilonGreedy(np.array([0.5]), 3, rng, mu=1.5, max_duration=4)
    assert ex.select(np.array([2])).tolist() == [0]
    assert ex.left.tolist() == [3]  # capped at 4 steps, one used
    assert ex.select(np.array([2])).tolist() == [0]
    ex.end_episodes(np.array([True]))
    assert ex.select(np.array([2])).tolist() == [2]


def test_max_duration_one_is_per_step_epsilon_greedy():
    rng = np.random.default_rng(0)
    eps = np.array([0.0, 1.0, 0.3])
    ex = TemporallyExtendedEpsilonGreedy(eps, 3, rng, mu=1.5, max_duration=1)
    greedy = np.zeros(3, np.int64)
    acts = np.array([ex.select(greedy) for _ in range(20_000)])
    assert (acts[:, 0] == 0).all()  # epsilon 0: always greedy
    assert np.bincount(acts[:, 1], minlength=3) / 20_000 == pytest.approx([1 / 3] * 3, abs=0.02)
    assert (acts[:, 2] != 0).mean() == pytest.approx(0.3 * 2 / 3, abs=0.015)  # random, not greedy
    # no runs: consecutive exploratory actions are independent
    same = (acts[1:, 1] == acts[:-1, 1]).mean()
    assert same == pytest.approx(1 / 3, abs=0.02)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="mu must be > 1"):
        TemporallyExtendedEpsilonGreedy(np.array([0.1]), 3, np.random.default_rng(0), mu=1.0, max_duration=50)
    with pytest.raises(ValueError, match="max_duration must be >= 1"):
        TemporallyExtendedEpsilonGreedy(np.array([0.1]), 3, np.random.default_rng(0), mu=1.5, max_duration=0)
