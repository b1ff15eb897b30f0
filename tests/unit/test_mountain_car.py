"""The batched MountainCar against gymnasium's, step for step, bit for bit."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

from apexq.actors.envs import final_observations, make_vector_env
from apexq.actors.mountain_car import MIN_POSITION, MountainCarVectorEnv

N_ENVS, N_STEPS = 16, 10_000


def policy(obs, rng):
    """Energy pumping with noise: reaches the goal (terminations), dawdles (truncations), hits the left wall."""
    pump = np.where(obs[:, 1] >= 0, 2, 0)
    noise = rng.random(len(obs)) < 0.35
    return np.where(noise, rng.integers(0, 3, len(obs)), pump).astype(np.int64)


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
def test_matches_gymnasium_step_for_step(mode):
    ref = gym.make_vec(
        "MountainCar-v0", num_envs=N_ENVS, vectorization_mode="sync", vector_kwargs={"autoreset_mode": mode}
    )
    ours = MountainCarVectorEnv(N_ENVS, autoreset_mode=mode)
    o_ref, _ = ref.reset(seed=123)
    o_ours, _ = ours.reset(seed=123)
    np.testing.assert_array_equal(o_ours, o_ref)
    # identical start states, also given explicitly (float64 state of each gymnasium env)
    states = np.array([e.unwrapped.state for e in ref.envs], dtype=np.float64)
    ours.set_state(states[:, 0], states[:, 1])
    rng = np.random.default_rng(0)
    seen = {"terminated": 0, "truncated": 0, "wall": 0}
    for t in range(N_STEPS):
        a = policy(o_ref, rng)
        o_ref, r_ref, te_ref, tr_ref, i_ref = ref.step(a)
        o_ours, r_ours, te_ours, tr_ours, i_ours = ours.step(a)
        np.testing.assert_array_equal(o_ours, o_ref, err_msg=f"obs differ at step {t}")
        np.testing.assert_array_equal(r_ours, r_ref, err_msg=f"rewards differ at step {t}")
        np.testing.assert_array_equal(te_ours, te_ref, err_msg=f"terminated differ at step {t}")
        np.testing.assert_array_equal(tr_ours, tr_ref, err_msg=f"truncated differ at step {t}")
        if mode == AutoresetMode.SAME_STEP:
            np.testing.assert_array_equal(final_observations(o_ours, i_ours), final_observations(o_ref, i_ref))
        assert o_ours.dtype == np.float32 and ours.position.dtype == np.float64
        seen["terminated"] += int(te_ref.sum())
        seen["truncated"] += int(tr_ref.sum())
        seen["wall"] += int((o_ref[:, 0] == np.float32(MIN_POSITION)).sum())
    assert seen["terminated"] > 100 and seen["truncated"] > 10 and seen["wall"] > 10, seen


def test_spaces_and_factory():
    env = make_vector_env("MountainCar-v0", 4)
    assert isinstance(env, MountainCarVectorEnv) and env.num_envs == 4
    assert env.single_action_space.n == 3 and env.single_observation_space.shape == (2,)
    assert env.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    other = make_vector_env("CartPole-v1", 3)
    obs, _ = other.reset(seed=0)
    assert obs.shape == (3, 4)
    other.close()


def test_bad_actions_are_refused():
    env = MountainCarVectorEnv(2)
    env.reset(seed=0)
    with pytest.raises(ValueError):
        env.step(np.array([0, 3]))
