"""The Q-network's parameters by name and shape, and how it scales observations.

Three implementations of the same network agree on these: the learner's torch ``QNetwork``, the
actors' numpy ``NumpyQPolicy`` and the policy files a run writes (``learner/policy_file.py``).
Weights published by one load unchanged into the others because all three take their state
dict's names, shapes and observation scaling from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np

SCALE_LIMIT = 1e6  # bounds wider than this (or infinite) are left unscaled


def obs_scaling(obs_dim: int, obs_low: Optional[Sequence[float]], obs_high: Optional[Sequence[float]]):
    """(center, half_range) float32[obs_dim] mapping finite bounds to [-1, 1]; other dims pass as is."""
    low = np.asarray(obs_low if obs_low is not None else [-1.0] * obs_dim, np.float64)
    high = np.asarray(obs_high if obs_high is not None else [1.0] * obs_dim, np.float64)
    ok = (
        np.isfinite(low) & np.isfinite(high) & (np.abs(low) < SCALE_LIMIT) & (np.abs(high) < SCALE_LIMIT) & (high > low)
    )
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf in the dims left unscaled
        center = np.where(ok, (high + low) / 2, 0.0).astype(np.float32)
        half = np.where(ok, (high - low) / 2, 1.0).astype(np.float32)
    return center, half


def parameter_shapes(obs_dim: int, num_actions: int, hidden_sizes: Sequence[int], dueling: bool) -> dict:
    """name -> shape of every entry of the network's state dict, in QNetwork's naming."""
    shapes: dict[str, tuple[int, ...]] = {"obs_center": (obs_dim,), "obs_half_range": (obs_dim,)}
    last = obs_dim
    for i, h in enumerate(hidden_sizes):
        shapes[f"body.{2 * i}.weight"] = (h, last)
        shapes[f"body.{2 * i}.bias"] = (h,)
        last = h
    heads = [("value", 1), ("advantage", num_actions)] if dueling else [("head", num_actions)]
    for name, out in heads:
        shapes[f"{name}.weight"] = (out, last)
        shapes[f"{name}.bias"] = (out,)
    return shapes
