"""Greedy evaluation on the vector env: each of ``episodes`` envs plays exactly one episode."""

from __future__ import annotations

import numpy as np

from apexq.actors.envs import make_vector_env
from apexq.actors.policy import NumpyQPolicy

EVAL_SEED_BASE = 2_000_000_000  # actors seed from seed*1_000_003 upwards: far below this
SEEDS_PER_RUN_SEED = 100_000  # evaluation seed ``seed`` plays episode seeds base + seed * this + i
CONFIRM_FIRST_EPISODE = 50_000  # a confirming evaluation's episodes: the second half of that range


def greedy_actions(policy):
    """obs float32[N, obs_dim] -> int64[N] actions for a NumpyQPolicy or any torch module returning Q."""
    if isinstance(policy, NumpyQPolicy):
        return policy.greedy
    import torch  # (the Q-network has no train-mode layers, so no .eval(): exported modules refuse it)

    def act(obs):
        with torch.no_grad():
            return policy(torch.as_tensor(obs, dtype=torch.float32)).argmax(dim=1).numpy()

    return act


def evaluate(
    policy, env_id: str, episodes: int, seed: int, max_steps: int = 100_000, first_episode: int = 0
) -> np.ndarray:
    """Returns the undiscounted return of ``episodes`` greedy episodes (seeds actors never use).

    ``policy``: a :class:`NumpyQPolicy`, or a torch module mapping float32[N, obs_dim] to Q[N, A].
    Episode ``i`` starts from seed ``EVAL_SEED_BASE + seed * SEEDS_PER_RUN_SEED + first_episode + i``:
    the same starts at every evaluation of a run, and ``first_episode=CONFIRM_FIRST_EPISODE`` plays
    other ones (those of a confirming evaluation).
    """
    if not (0 <= first_episode and first_episode + episodes <= SEEDS_PER_RUN_SEED):
        raise ValueError(f"episodes {first_episode}..{first_episode + episodes} leave seed {seed}'s range")
    from gymnasium.vector import AutoresetMode
    from threadpoolctl import threadpool_limits

    act = greedy_actions(policy)
    env = make_vector_env(env_id, episodes, autoreset_mode=AutoresetMode.SAME_STEP)
    obs, _ = env.reset(seed=EVAL_SEED_BASE + seed * SEEDS_PER_RUN_SEED + first_episode)
    returns = np.zeros(episodes)
    active = np.ones(episodes, bool)
    with threadpool_limits(limits=1, user_api="blas"):  # small matmuls; spare the cores training uses
        for _ in range(max_steps):
            obs, rew, term, trunc, _ = env.step(act(obs))
            returns += np.where(active, rew, 0.0)
            active &= ~(term | trunc)
            if not active.any():
                break
    env.close()
    return returns
