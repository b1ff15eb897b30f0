"""The Q-network's forward pass in numpy: acting and evaluation without importing torch.

Actors and the driver's evaluations only ever run the network forward, for a few dozen
observations at a time. For an MLP that small numpy is faster than torch's per-operator
dispatch, and leaving torch out of those processes saves its ~2 s import (CPU-seconds on every
actor start and restart that the learner would otherwise compete with).

The parameters are exactly those of the learner's ``QNetwork`` ``state_dict`` (same names,
shapes and float32 values, both from :mod:`apexq.core.network_layout`), so weights published by
the learner load here unchanged and both give the same Q-values (checked in the tests).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import numpy as np

from apexq.core.network_layout import obs_scaling, parameter_shapes


class NumpyQPolicy:
    """``q_values(obs: float32[B, obs_dim]) -> float32[B, num_actions]``, ``greedy(obs) -> int64[B]``."""

    def __init__(
        self, spec: Mapping, hidden_sizes: Sequence[int], dueling: bool, rng: Optional[np.random.Generator] = None
    ):
        """A freshly initialised network (same distribution as torch's ``nn.Linear`` default)."""
        self.obs_dim, self.num_actions = int(spec["obs_dim"]), int(spec["num_actions"])
        self.hidden_sizes, self.dueling = [int(h) for h in hidden_sizes], bool(dueling)
        self.shapes = parameter_shapes(self.obs_dim, self.num_actions, self.hidden_sizes, self.dueling)
        rng = rng if rng is not None else np.random.default_rng()
        center, half = obs_scaling(self.obs_dim, spec.get("obs_low"), spec.get("obs_high"))
        state = {"obs_center": center, "obs_half_range": half}
        for name, shape in self.shapes.items():
            if name.endswith(".weight"):
                bound = 1.0 / np.sqrt(shape[1])  # kaiming_uniform(a=sqrt(5)) and the bias rule agree here
                state[name] = rng.uniform(-bound, bound, shape).astype(np.float32)
                bias = name[: -len("weight")] + "bias"
                state[bias] = rng.uniform(-bound, bound, self.shapes[bias]).astype(np.float32)
        self.load_state(state)

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Take a QNetwork ``state_dict`` as numpy arrays; names and shapes must match exactly."""
        missing = sorted(set(self.shapes) - set(state))
        extra = sorted(set(state) - set(self.shapes))
        if missing or extra:
            raise ValueError(f"weights do not fit the network: missing {missing}, unexpected {extra}")
        arrays = {}
        for name, shape in self.shapes.items():
            a = np.asarray(state[name], dtype=np.float32)
            if a.shape != tuple(shape):
                raise ValueError(f"weights {name}: shape {a.shape}, expected {tuple(shape)}")
            arrays[name] = a
        self._center, self._half = arrays["obs_center"], arrays["obs_half_range"]
        # stored transposed and contiguous so that each layer is one x @ W + b
        self._body = [
            (np.ascontiguousarray(arrays[f"body.{2 * i}.weight"].T), arrays[f"body.{2 * i}.bias"])
            for i in range(len(self.hidden_sizes))
        ]
        names = ["value", "advantage"] if self.dueling else ["head"]
        self._heads = [(np.ascontiguousarray(arrays[f"{n}.weight"].T), arrays[f"{n}.bias"]) for n in names]
        self.state = arrays

    def q_values(self, obs: np.ndarray) -> np.ndarray:
        x = (np.asarray(obs, dtype=np.float32) - self._center) / self._half
        for w, b in self._body:
            x = x @ w
            x += b
            np.maximum(x, 0.0, out=x)
        if self.dueling:
            (wv, bv), (wa, ba) = self._heads
            adv = x @ wa + ba
            return (x @ wv + bv) + adv - adv.mean(axis=1, keepdims=True)
        w, b = self._heads[0]
        return x @ w + b

    __call__ = q_values

    def greedy(self, obs: np.ndarray) -> np.ndarray:
        return self.q_values(obs).argmax(axis=1)


def initial_priorities(policy: NumpyQPolicy, obs, action, ret, discount, next_obs) -> np.ndarray:
    """|G + d * max_a Q(s', a) - Q(s, a)| for each transition with the actor's network (floored at 1e-6).

    Shapes: obs/next_obs [B, obs_dim], action/ret/discount [B]; returns float32[B].
    """
    n = len(action)
    q = policy.q_values(np.concatenate([obs, next_obs]))
    q_taken = q[np.arange(n), np.asarray(action, np.int64)]
    q_next = q[n:].max(axis=1)
    td = np.asarray(ret, np.float32) + np.asarray(discount, np.float32) * q_next - q_taken
    return np.maximum(np.abs(td), 1e-6).astype(np.float32)
