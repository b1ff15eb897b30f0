"""Greedy evaluation on the vector env: each of ``episodes`` envs plays exactly one episode."""
from __future__ import annotations

import numpy as np
import torch

from actors.envs import make_vector_env

EVAL_SEED_BASE = 2_000_000_000  # actors seed from seed*1_000_003 upwards: far below this


def evaluate(net: torch.nn.Module, env_id: str, episodes: int, seed: int = 0,
             max_steps: int = 100_000) -> np.ndarray:
    """Returns the undiscounted return of ``episodes`` greedy episodes (seeds actors never use)."""
    from gymnasium.vector import AutoresetMode
    env = make_vector_env(env_id, episodes, autoreset_mode=AutoresetMode.SAME_STEP)
    obs, _ = env.reset(seed=EVAL_SEED_BASE + seed * 100_000)
    returns = np.zeros(episodes)
    active = np.ones(episodes, bool)
    net.eval()
    for _ in range(max_steps):
        with torch.no_grad():
            actions = net(torch.as_tensor(obs, dtype=torch.float32)).argmax(dim=1).numpy()
        obs, rew, term, trunc, _ = env.step(actions)
        returns += np.where(active, rew, 0.0)
        active &= ~(term | trunc)
        if not active.any():
            break
    env.close()
    return returns
