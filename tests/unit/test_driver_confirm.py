"""A solve needs two evaluations of the same weights: the run's fixed starts, then other episodes.

The driver evaluates a fixed (randomly initialised) CartPole network through a fake backend. Its
returns on the run's evaluation starts and on the confirming episodes are two fixed numbers; the
threshold is put between them, or below both, and the driver must stop only when both reach it.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from apexq.actors.envs import env_spec
from apexq.actors.policy import NumpyQPolicy
from apexq.cluster.config import ConfigError, load_config
from apexq.cluster.driver import Driver
from apexq.cluster.evaluate import CONFIRM_FIRST_EPISODE, evaluate
from apexq.cluster.run_dir import RunDir

ENV = "CartPole-v1"
HIDDEN = [16]


class OneVersion:
    """Serves one weights version, and keeps what the driver hands back as the best policy."""

    def __init__(self, state: dict):
        self.state, self.given = state, []

    def latest_weights(self):
        return 7, self.state

    def give_best_policy(self, version, eval_return, state, wait=False):
        self.given.append((version, eval_return))


def network(seed: int) -> tuple[dict, float, float]:
    """A random network's state, its mean return on seed 0's evaluation starts and on the confirming ones."""
    policy = NumpyQPolicy(env_spec(ENV), HIDDEN, False, rng=np.random.default_rng(seed))
    fixed = float(np.mean(evaluate(policy, ENV, 20, seed=0)))
    other = float(np.mean(evaluate(policy, ENV, 20, seed=0, first_episode=CONFIRM_FIRST_EPISODE)))
    return policy.state, fixed, other


@pytest.fixture(scope="module")
def lucky():
    """A network that does better on the run's evaluation starts than on other episodes."""
    for seed in range(50):
        state, fixed, other = network(seed)
        if fixed > other + 0.5:
            return state, fixed, other
    pytest.fail("no network of 50 did better on the evaluation starts than on the confirming ones")


def driver(tmp_path, target: float, confirm=None):
    """eval.confirm_episodes left at its default (null: as many as eval.episodes, 20) unless given."""
    cfg = load_config(
        overrides=[
            f"env.id={ENV}",
            f"learner.hidden_sizes={HIDDEN}",
            "learner.dueling=false",
            "eval.episodes=20",
            *([f"eval.confirm_episodes={confirm}"] if confirm is not None else []),
            f"train.stop_at_return={target}",
            "seed=0",
        ]
    )
    out = io.StringIO()
    return Driver(cfg, RunDir(tmp_path), env_spec(ENV), out=out), out


def test_an_evaluation_past_the_target_that_other_episodes_do_not_confirm_is_no_solve(tmp_path, lucky):
    state, fixed, other = lucky
    d, out = driver(tmp_path, target=(fixed + other) / 2)
    backend = OneVersion(state)
    assert d.evaluate(backend) == pytest.approx(fixed)
    assert d.solved_at is None and d.stop_reason == "finished"
    assert d.confirm_return == pytest.approx(other)
    # judged on all 40 episodes it played, not on the lucky 20
    assert backend.given == [(7, pytest.approx((fixed + other) / 2))]
    assert "not confirmed" in out.getvalue()


def test_an_evaluation_that_other_episodes_confirm_solves_and_its_weights_become_the_policy(tmp_path, lucky):
    state, fixed, other = lucky
    d, out = driver(tmp_path, target=other - 1.0)
    backend = OneVersion(state)
    d.best = (fixed + 100.0, 3, {"an": "earlier, better-scored version"})
    d.evaluate(backend)
    assert d.solved_at is not None and "confirmed on 20 other episodes" in d.stop_reason
    assert backend.given == [(7, pytest.approx((fixed + other) / 2))]  # the solving weights, not version 3
    assert "(confirmed)" in out.getvalue()


def test_without_confirmation_the_first_evaluation_past_the_target_solves(tmp_path, lucky):
    state, fixed, other = lucky
    d, _ = driver(tmp_path, target=(fixed + other) / 2, confirm=0)
    d.evaluate(OneVersion(state))
    assert d.solved_at is not None and d.confirm_return is None


def test_confirm_episodes_is_range_checked():
    with pytest.raises(ConfigError, match="eval.confirm_episodes"):
        load_config(overrides=["eval.confirm_episodes=-1"])
    with pytest.raises(ConfigError, match="eval.episodes"):
        load_config(overrides=["eval.episodes=50001"])
