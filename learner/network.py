"""The Q-network: an MLP over observations scaled by the space's bounds, optional dueling head."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

SCALE_LIMIT = 1e6  # bounds wider than this (or infinite) are left unscaled


class QNetwork(nn.Module):
    """``forward(obs: float32[B, obs_dim]) -> Q: float32[B, num_actions]``."""

    def __init__(self, obs_dim: int, num_actions: int, hidden_sizes: Sequence[int] = (128, 128),
                 dueling: bool = False, obs_low: Sequence[float] | None = None,
                 obs_high: Sequence[float] | None = None):
        super().__init__()
        low = np.asarray(obs_low if obs_low is not None else [-1.0] * obs_dim, np.float64)
        high = np.asarray(obs_high if obs_high is not None else [1.0] * obs_dim, np.float64)
        ok = np.isfinite(low) & np.isfinite(high) & (np.abs(low) < SCALE_LIMIT) & (np.abs(high) < SCALE_LIMIT) & (high > low)
        center = np.where(ok, (high + low) / 2, 0.0)
        half = np.where(ok, (high - low) / 2, 1.0)
        self.register_buffer("obs_center", torch.tensor(center, dtype=torch.float32))
        self.register_buffer("obs_half_range", torch.tensor(half, dtype=torch.float32))
        layers: list[nn.Module] = []
        last = obs_dim
        for h in hidden_sizes:
            layers += [nn.Linear(last, h), nn.ReLU()]
            last = h
        self.body = nn.Sequential(*layers)
        self.dueling = dueling
        if dueling:
            self.value = nn.Linear(last, 1)
            self.advantage = nn.Linear(last, num_actions)
        else:
            self.head = nn.Linear(last, num_actions)
        self.num_actions = num_actions

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = (obs - self.obs_center) / self.obs_half_range
        x = self.body(x)
        if self.dueling:
            adv = self.advantage(x)
            return self.value(x) + adv - adv.mean(dim=1, keepdim=True)
        return self.head(x)


def build_network(spec: dict, hidden_sizes, dueling: bool) -> QNetwork:
    return QNetwork(spec["obs_dim"], spec["num_actions"], hidden_sizes, dueling,
                    spec.get("obs_low"), spec.get("obs_high"))
