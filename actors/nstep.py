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
        self._ages = np.arange(n)
        # for each position t % n of the ring: the age of each slot, the slot of each age, and
        # gamma**age per slot (as a column)
        self._rotations = []
        for pos in range(n):
            slot_of_age = (pos - self._ages) % n
            age_of_slot = (pos - self._ages) % n  # the rotation is its own inverse
            self._rotations.append((age_of_slot, slot_of_age, self.powers[age_of_slot][:, None]))

    def add(self, obs, action, reward, terminated, truncated, next_obs) -> dict:
        """Record one step of every env; return the transitions that are complete (arrays, maybe empty).

        ``next_obs`` must hold the *final* observation for envs whose episode just ended.
        Transitions come out ordered by age (the newest entry first), then by env; all ages
        are handled at once as ``[n, num_envs]`` arrays.
        """
        n, t, E = self.n, self.t, self.E
        slot = t % n
        self.obs[slot] = obs
        self.act[slot] = action
        self.ret[slot] = 0.0
        count = self.count
        np.minimum(count + 1, n, out=count)
        age_of_slot, slot_of_age, pow_of_slot = self._rotations[slot]
        # each pending entry (valid: it exists) gains gamma**age * reward
        reward = np.asarray(reward, np.float64)
        self.ret += np.where(age_of_slot[:, None] < count, pow_of_slot * reward, 0.0)
        terminated = np.asarray(terminated, bool)
        done = terminated | np.asarray(truncated, bool)
        # every entry of a finished episode leaves; so does the oldest entry of a full ring
        leave = self._ages[:, None] < count  # [age, env]: entries that exist
        leave &= done
        leave[n - 1] |= count == n
        count[done] = 0
        self.t += 1
        age, env = np.nonzero(leave)
        if age.size == 0:
            d = self.obs.shape[2]
            return {
                "obs": np.zeros((0, d), np.float32),
                "action": np.zeros(0, np.int64),
                "ret": np.zeros(0, np.float64),
                "discount": np.zeros(0, np.float64),
                "next_obs": np.zeros((0, d), np.float32),
            }
        flat = slot_of_age.take(age)
        flat *= E
        flat += env
        return {
            "obs": self.obs.reshape(n * E, -1).take(flat, axis=0),
            "action": self.act.reshape(-1).take(flat),
            "ret": self.ret.reshape(-1).take(flat),
            "discount": np.where(terminated.take(env), 0.0, self.powers.take(age + 1)),
            "next_obs": np.asarray(next_obs).take(env, axis=0).astype(np.float32, copy=False),
        }
