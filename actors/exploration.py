"""Ape-X exploration schedule."""
from __future__ import annotations

import numpy as np


def apex_epsilons(num_envs: int, base: float, alpha: float) -> np.ndarray:
    """``eps_i = base ** (1 + alpha * i / (N - 1))`` for ``i`` in ``0..N-1`` (one env: ``base``)."""
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    if num_envs == 1:
        return np.array([base], dtype=np.float64)
    i = np.arange(num_envs, dtype=np.float64)
    return np.power(base, 1.0 + alpha * i / (num_envs - 1))
