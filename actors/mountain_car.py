"""An exact batched MountainCar-v0 implementing gymnasium's ``VectorEnv`` API.

Same equations, constants, float64 state, float32 observations, 200-step time limit and
seeding as ``gymnasium.make("MountainCar-v0")`` (checked step for step in the tests), but all
cars advance in one numpy operation. Autoreset follows gymnasium's modes: ``NEXT_STEP`` (the
default of gymnasium's vector envs) or ``SAME_STEP`` (the final observation goes to
``infos["final_obs"]`` and the returned observation is already the reset one).
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

MIN_POSITION = -1.2
MAX_POSITION = 0.6
MAX_SPEED = 0.07
GOAL_POSITION = 0.5
GOAL_VELOCITY = 0.0
FORCE = 0.001
GRAVITY = 0.0025
MAX_EPISODE_STEPS = 200


class MountainCarVectorEnv(VectorEnv):
    """No rendering: `apexq evaluate --gif` records gymnasium's own MountainCar-v0 (see record_gif)."""

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        num_envs: int,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        max_episode_steps: int = MAX_EPISODE_STEPS,
    ):
        self.num_envs = int(num_envs)
        self.autoreset_mode = AutoresetMode(autoreset_mode)
        if self.autoreset_mode == AutoresetMode.DISABLED:
            raise ValueError("autoreset_mode DISABLED is not supported")
        self.metadata = dict(self.metadata, autoreset_mode=self.autoreset_mode)
        self.max_episode_steps = int(max_episode_steps)
        low = np.array([MIN_POSITION, -MAX_SPEED], dtype=np.float32)
        high = np.array([MAX_POSITION, MAX_SPEED], dtype=np.float32)
        self.single_observation_space = spaces.Box(low, high, dtype=np.float32)
        self.single_action_space = spaces.Discrete(3)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.position = np.zeros(self.num_envs, np.float64)
        self.velocity = np.zeros(self.num_envs, np.float64)
        self.elapsed = np.zeros(self.num_envs, np.int64)
        self._needs_reset = np.zeros(self.num_envs, bool)
        self._rngs = [np.random.default_rng() for _ in range(self.num_envs)]

    # -- API ------------------------------------------------------------------------------

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            seeds = [seed + i for i in range(self.num_envs)] if isinstance(seed, int) else list(seed)
            self._rngs = [np.random.default_rng(s) for s in seeds]
        self._reset_envs(np.arange(self.num_envs))
        return self._obs(), {}

    def step(self, actions):
        a = np.asarray(actions)
        if a.shape != (self.num_envs,) or not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() > 2:
            raise ValueError(f"actions must be {self.num_envs} integers in 0..2, got {a!r}")
        infos: dict = {}
        if self.autoreset_mode == AutoresetMode.NEXT_STEP and self._needs_reset.any():
            skip = self._needs_reset.copy()
        else:
            skip = None
        p, v = self.position, self.velocity
        # gymnasium: velocity += (action - 1) * force + cos(3 * position) * (-gravity)
        v_new = v + ((a.astype(np.float64) - 1.0) * FORCE + np.cos(3.0 * p) * (-GRAVITY))
        np.clip(v_new, -MAX_SPEED, MAX_SPEED, out=v_new)
        p_new = p + v_new
        np.clip(p_new, MIN_POSITION, MAX_POSITION, out=p_new)
        v_new[(p_new == MIN_POSITION) & (v_new < 0)] = 0.0
        if skip is not None:
            p_new[skip] = p[skip]
            v_new[skip] = v[skip]
        self.position, self.velocity = p_new, v_new
        self.elapsed += 1
        terminated = (p_new >= GOAL_POSITION) & (v_new >= GOAL_VELOCITY)
        truncated = self.elapsed >= self.max_episode_steps
        rewards = np.full(self.num_envs, -1.0, dtype=np.float64)
        if skip is not None:
            self._reset_envs(np.flatnonzero(skip))
            terminated[skip] = False
            truncated[skip] = False
            rewards[skip] = 0.0
        done = terminated | truncated
        if self.autoreset_mode == AutoresetMode.NEXT_STEP:
            self._needs_reset = done
            return self._obs(), rewards, terminated, truncated, infos
        if done.any():
            final = np.empty(self.num_envs, dtype=object)
            obs_before = self._obs()
            for i in np.flatnonzero(done):
                final[i] = obs_before[i]
            infos["final_obs"] = final
            infos["_final_obs"] = done.copy()
            infos["final_info"] = {}
            infos["_final_info"] = done.copy()
            self._reset_envs(np.flatnonzero(done))
        return self._obs(), rewards, terminated, truncated, infos

    # -- internals -------------------------------------------------------------------------

    def _reset_envs(self, idx: np.ndarray) -> None:
        for i in idx:
            self.position[i] = self._rngs[i].uniform(low=-0.6, high=-0.4)
        self.velocity[idx] = 0.0
        self.elapsed[idx] = 0

    def _obs(self) -> np.ndarray:
        return np.stack([self.position, self.velocity], axis=1).astype(np.float32)

    def set_state(self, position, velocity) -> None:
        """Place the cars (tests use it to start from states given by another implementation)."""
        self.position = np.array(position, np.float64)
        self.velocity = np.array(velocity, np.float64)
