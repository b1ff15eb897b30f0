"""The Q-network: an MLP over observations scaled by the space's bounds, optional dueling head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from apexq.core.network_layout import obs_scaling


class QNetwork(nn.Module):
    """``forward(obs: float32[B, obs_dim]) -> Q: float32[B, num_actions]``."""

    obs_center: torch.Tensor  # buffers (register_buffer below)
    obs_half_range: torch.Tensor

    def __init__(
        self,
        obs_dim: int,
        num_actions: int,
        hidden_sizes: Sequence[int],
        dueling: bool,
        obs_low: Sequence[float] | None = None,
        obs_high: Sequence[float] | None = None,
    ):
        """``hidden_sizes`` and ``dueling`` are learner.hidden_sizes and learner.dueling of the config."""
        super().__init__()
        center, half = obs_scaling(obs_dim, obs_low, obs_high)
        self.register_buffer("obs_center", torch.from_numpy(center))
        self.register_buffer("obs_half_range", torch.from_numpy(half))
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
        # forward() calls F.linear on these directly: the same parameters and state-dict names
        # as body's modules, without a module call per layer (on CPU this network is small
        # enough for that overhead to show)
        self._hidden = [m for m in self.body if isinstance(m, nn.Linear)]

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = (obs - self.obs_center) / self.obs_half_range
        for layer in self._hidden:
            x = torch.relu(F.linear(x, layer.weight, layer.bias))
        if self.dueling:
            adv = self.advantage(x)
            return self.value(x) + adv - adv.mean(dim=1, keepdim=True)
        return F.linear(x, self.head.weight, self.head.bias)


def build_network(spec: dict, hidden_sizes, dueling: bool) -> QNetwork:
    return QNetwork(
        spec["obs_dim"], spec["num_actions"], hidden_sizes, dueling, spec.get("obs_low"), spec.get("obs_high")
    )
