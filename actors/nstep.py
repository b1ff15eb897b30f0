"""Vectorised n-step transition building with terminations and truncations kept apart.

For each env, the last ``n`` steps live in a ring. Every step adds ``gamma**age * reward`` to
each pending entry's return. An entry leaves the ring as a transition ``(s, a, G, d, s')``:

* after ``n`` rewards, without an episode end: ``G = r0 + g r1 + ... + g^(n-1) r(n-1)``,
  ``d = g**n``, ``s'`` the observation ``n`` steps later;
* when the episode *terminates* after ``k <= n`` rewards: ``d = 0`` (nothing to bootstrap);
* when the episode is *truncated* (time limit) after ``k`` rewards: ``d = g**k`` and ``s'`` is
  the final observation, so the learner bootstraps from it as if the episode went on.
"""
from __future__ import annotations

import numpy as np


class NStepAccumulator:
    def __init__(self, num_envs: int, obs_dim: int, n: int, gamma: float):
        if n < 1:
            raise ValueError("n must be >= 1")
        self.E, self.n, self.gamma = num_envs, n, float(gamma)
        self.obs = np.zeros((n, num_envs, obs_dim), np.float32)
        self.act = np.zeros((n, num_envs), np.int64)
        self.ret = np.zeros((n, num_envs), np.float64)
        self.count = np.zeros(num_envs, np.int64)
        self.t = 0
        self.powers = self.gamma ** np.arange(n + 1)

    def add(self, obs, action, reward, terminated, truncated, next_obs) -> dict:
        """Record one step of every env; return the transitions that are complete (arrays, maybe empty).

        ``next_obs`` must hold the *final* observation for envs whose episode just ended.
        """
        n, t = self.n, self.t
        slot = t % n
        self.obs[slot] = obs
        self.act[slot] = action
        self.ret[slot] = 0.0
        self.count = np.minimum(self.count + 1, n)
        reward = np.asarray(reward, np.float64)
        for age in range(n):
            s = (t - age) % n
            valid = age < self.count
            self.ret[s] += np.where(valid, self.powers[age] * reward, 0.0)
        terminated = np.asarray(terminated, bool)
        done = terminated | np.asarray(truncated, bool)
        parts = []
        for age in range(n):
            s = (t - age) % n
            # the oldest entry of a full ring leaves; every entry of a finished episode leaves
            leave = (age < self.count) & (done | ((age == n - 1) & (self.count == n)))
            if not leave.any():
                continue
            idx = np.flatnonzero(leave)
            disc = np.where(terminated[idx], 0.0, self.powers[age + 1])
            parts.append((self.obs[s, idx], self.act[s, idx], self.ret[s, idx], disc, next_obs[idx]))
        self.count[done] = 0
        self.t += 1
        if not parts:
            d = self.obs.shape[2]
            return {"obs": np.zeros((0, d), np.float32), "action": np.zeros(0, np.int64),
                    "ret": np.zeros(0, np.float64), "discount": np.zeros(0, np.float64),
                    "next_obs": np.zeros((0, d), np.float32)}
        cols = list(zip(*parts))
        return {"obs": np.concatenate(cols[0]), "action": np.concatenate(cols[1]),
                "ret": np.concatenate(cols[2]), "discount": np.concatenate(cols[3]),
                "next_obs": np.concatenate(cols[4]).astype(np.float32, copy=False)}
