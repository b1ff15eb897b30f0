"""The actors' numpy forward pass against the learner's torch network, and initial priorities by hand."""

import numpy as np
import pytest
import torch

from apexq.actors.policy import NumpyQPolicy, initial_priorities
from apexq.core import weights_store
from apexq.core.network_layout import obs_scaling
from apexq.learner.network import build_network

SPEC = {"obs_dim": 2, "num_actions": 3, "obs_low": [-1.2, -0.07], "obs_high": [0.6, 0.07]}


def test_obs_scaling_maps_finite_bounds_to_unit_interval_and_leaves_others():
    center, half = obs_scaling(3, [-1.2, -np.inf, 0.0], [0.6, np.inf, 4.0])
    assert center.tolist() == pytest.approx([-0.3, 0.0, 2.0])
    assert half.tolist() == pytest.approx([0.9, 1.0, 2.0])


@pytest.mark.parametrize("dueling", [False, True])
def test_numpy_policy_matches_the_torch_network_through_published_weights(dueling):
    torch.manual_seed(3)
    net = build_network(SPEC, [16, 8], dueling)
    blob = weights_store.encode_weights(net.state_dict(), 7)
    version, state = weights_store.decode_weights(blob, as_numpy=True)
    assert version == 7 and all(isinstance(v, np.ndarray) for v in state.values())
    policy = NumpyQPolicy(SPEC, [16, 8], dueling)
    policy.load_state(state)
    obs = np.random.default_rng(0).uniform([-1.2, -0.07], [0.6, 0.07], (64, 2)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(obs)).numpy()
    got = policy.q_values(obs)
    assert got.dtype == np.float32 and got.shape == (64, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert (policy.greedy(obs) == expected.argmax(axis=1)).all()


def test_fresh_numpy_policy_has_torch_shapes_and_init_bounds():
    policy = NumpyQPolicy(SPEC, [64, 64], False, rng=np.random.default_rng(0))
    torch_shapes = {k: tuple(v.shape) for k, v in build_network(SPEC, [64, 64], False).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in policy.state.items()} == torch_shapes
    w = policy.state["body.2.weight"]  # fan_in 64: U(-1/8, 1/8) as torch's nn.Linear default
    assert np.abs(w).max() <= 1 / 8 and np.abs(w).max() > 0.12


def test_weights_that_do_not_fit_are_refused_by_name():
    policy = NumpyQPolicy(SPEC, [4], False)
    state = dict(policy.state)
    state["body.0.weight"] = np.zeros((5, 2), np.float32)
    with pytest.raises(ValueError, match=r"body\.0\.weight: shape \(5, 2\), expected \(4, 2\)"):
        policy.load_state(state)
    del state["head.bias"]
    with pytest.raises(ValueError, match="missing \\['head.bias'\\]"):
        policy.load_state(state)


def test_initial_priorities_by_hand():
    # identity-like network: 1 hidden unit, Q(s) = [x0, 2*x0, 0] after ReLU with unscaled inputs
    spec = {"obs_dim": 2, "num_actions": 3}
    policy = NumpyQPolicy(spec, [1], False)
    policy.load_state(
        {
            "obs_center": np.zeros(2, np.float32),
            "obs_half_range": np.ones(2, np.float32),
            "body.0.weight": np.array([[1.0, 0.0]], np.float32),
            "body.0.bias": np.zeros(1, np.float32),
            "head.weight": np.array([[1.0], [2.0], [0.0]], np.float32),
            "head.bias": np.zeros(3, np.float32),
        }
    )
    obs = np.array([[1.0, 5.0], [2.0, 0.0]], np.float32)  # Q = [1, 2, 0] and [2, 4, 0]
    next_obs = np.array([[3.0, 0.0], [-1.0, 0.0]], np.float32)  # max Q = 6 and 0 (ReLU)
    action = np.array([1, 0])
    ret = np.array([-1.0, -3.0], np.float32)
    discount = np.array([0.5, 0.0], np.float32)  # second one terminal
    # |-1 + 0.5*6 - 2| = 0 -> floored at 1e-6 ; |-3 + 0 - 2| = 5
    assert initial_priorities(policy, obs, action, ret, discount, next_obs).tolist() == pytest.approx([1e-6, 5.0])
