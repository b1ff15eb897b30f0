"""Vector environment factory: the exact batched MountainCar, gymnasium.make_vec for the rest."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

from .mountain_car import MountainCarVectorEnv


class EnvSpecError(ValueError):
    pass


def make_vector_env(env_id: str, num_envs: int, autoreset_mode=AutoresetMode.SAME_STEP):
    if env_id == "MountainCar-v0":
        return MountainCarVectorEnv(num_envs, autoreset_mode=autoreset_mode)
    try:
        env = gym.make_vec(
            env_id, num_envs=num_envs, vectorization_mode="sync", vector_kwargs={"autoreset_mode": autoreset_mode}
        )
    except gym.error.DependencyNotInstalled as exc:
        # gymnasium's advice (its box2d extra) would also install pygame-ce over apexq's pygame
        hint = "pip install 'apexq[box2d]'" if "box2d" in str(exc).lower() else str(exc)
        raise EnvSpecError(f"env.id: {env_id!r} needs a package that is not installed: {hint}") from None
    except gym.error.Error as exc:
        raise EnvSpecError(f"env.id: {env_id!r} cannot be made by gymnasium ({exc})") from None
    if not isinstance(env.single_action_space, gym.spaces.Discrete):
        env.close()
        raise EnvSpecError(
            f"env.id: {env_id!r} has a {type(env.single_action_space).__name__} action "
            "space; apexq needs a Discrete one"
        )
    if not isinstance(env.single_observation_space, gym.spaces.Box):
        env.close()
        raise EnvSpecError(f"env.id: {env_id!r} has a non-Box observation space")
    return env


def env_spec(env_id: str) -> dict:
    """Observation size, action count and observation bounds of ``env_id`` (for networks and codecs)."""
    env = make_vector_env(env_id, 1)
    space = env.single_observation_space
    spec = {
        "obs_dim": int(np.prod(space.shape)),
        "num_actions": int(env.single_action_space.n),
        "obs_low": np.asarray(space.low, np.float64).ravel().tolist(),
        "obs_high": np.asarray(space.high, np.float64).ravel().tolist(),
    }
    env.close()
    return spec


def final_observations(next_obs: np.ndarray, infos: dict) -> np.ndarray:
    """``next_obs`` with the rows of finished episodes replaced by their final observation (SAME_STEP)."""
    mask = infos.get("_final_obs")
    if mask is None or not np.any(mask):
        return next_obs
    out = np.array(next_obs, dtype=np.float32, copy=True)
    final = infos["final_obs"]
    for i in np.flatnonzero(mask):
        out[i] = np.asarray(final[i], dtype=np.float32).reshape(out.shape[1:])
    return out
