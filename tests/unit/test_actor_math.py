import numpy as np
import pytest

from apexq.actors.exploration import apex_epsilons
from apexq.actors.nstep import NStepAccumulator

G = 0.9


def test_apex_epsilons_by_hand():
    eps = apex_epsilons(5, 0.4, 7.0)
    expected = [0.4**1, 0.4 ** (1 + 7 * 1 / 4), 0.4 ** (1 + 7 * 2 / 4), 0.4 ** (1 + 7 * 3 / 4), 0.4**8]
    np.testing.assert_allclose(eps, expected, rtol=1e-12)
    assert apex_epsilons(1, 0.4, 7.0).tolist() == [0.4]
    np.testing.assert_allclose(apex_epsilons(3, 0.5, 0.0), [0.5, 0.5, 0.5])


def run(acc, steps):
    out = []
    for obs, a, r, term, trunc, nxt in steps:
        res = acc.add(
            np.array([[obs]], np.float32),
            np.array([a]),
            np.array([r], float),
            np.array([term]),
            np.array([trunc]),
            np.array([[nxt]], np.float32),
        )
        out += [
            (float(o[0]), int(a_), float(g), float(d), float(n[0]))
            for o, a_, g, d, n in zip(res["obs"], res["action"], res["ret"], res["discount"], res["next_obs"])
        ]
    return out


def test_three_step_returns_without_episode_end():
    acc = NStepAccumulator(1, 1, 3, G)
    out = run(
        acc,
        [
            (0, 0, 1, False, False, 1),
            (1, 1, 2, False, False, 2),
            (2, 2, 3, False, False, 3),
            (3, 0, 4, False, False, 4),
        ],
    )
    assert len(out) == 2
    assert out[0][:2] == (0.0, 0) and out[0][2] == pytest.approx(1 + G * 2 + G**2 * 3)
    assert out[0][3] == pytest.approx(G**3) and out[0][4] == 3.0
    assert out[1][:2] == (1.0, 1) and out[1][2] == pytest.approx(2 + G * 3 + G**2 * 4) and out[1][4] == 4.0


def test_termination_inside_the_window_does_not_bootstrap():
    acc = NStepAccumulator(1, 1, 3, G)
    out = run(acc, [(0, 0, 1, False, False, 1), (1, 0, 2, True, False, 99)])
    # both pending entries leave with discount 0 and the final observation
    assert sorted(out) == sorted(
        [(0.0, 0, pytest.approx(1 + G * 2), 0.0, 99.0), (1.0, 0, pytest.approx(2.0), 0.0, 99.0)]
    )


def test_truncation_inside_the_window_bootstraps_from_the_final_observation():
    acc = NStepAccumulator(1, 1, 3, G)
    out = run(acc, [(0, 0, 1, False, False, 1), (1, 0, 2, False, True, 77)])
    got = {o[0]: o for o in out}
    assert got[0.0][2] == pytest.approx(1 + G * 2) and got[0.0][3] == pytest.approx(G**2) and got[0.0][4] == 77.0
    assert got[1.0][2] == pytest.approx(2.0) and got[1.0][3] == pytest.approx(G) and got[1.0][4] == 77.0


def test_after_an_episode_end_the_window_starts_afresh():
    acc = NStepAccumulator(1, 1, 2, G)
    out = run(acc, [(0, 0, 1, True, False, 5), (10, 0, 3, False, False, 11), (11, 0, 4, False, False, 12)])
    assert out[0] == (0.0, 0, 1.0, 0.0, 5.0)
    assert out[1][0] == 10.0 and out[1][2] == pytest.approx(3 + G * 4) and out[1][3] == pytest.approx(G**2)


def test_terminated_and_truncated_together_counts_as_termination():
    acc = NStepAccumulator(1, 1, 3, G)
    out = run(acc, [(0, 0, 1, True, True, 5)])
    assert out == [(0.0, 0, 1.0, 0.0, 5.0)]


def test_vectorised_envs_are_independent():
    acc = NStepAccumulator(2, 1, 2, G)
    obs = np.array([[0.0], [100.0]], np.float32)
    r1 = acc.add(
        obs,
        np.array([0, 1]),
        np.array([1.0, 10.0]),
        np.array([False, True]),
        np.array([False, False]),
        np.array([[1.0], [101.0]], np.float32),
    )
    assert r1["obs"].ravel().tolist() == [100.0] and r1["discount"].tolist() == [0.0]
    r2 = acc.add(
        np.array([[1.0], [200.0]], np.float32),
        np.array([0, 1]),
        np.array([2.0, 20.0]),
        np.array([False, False]),
        np.array([False, False]),
        np.array([[2.0], [201.0]], np.float32),
    )
    assert r2["obs"].ravel().tolist() == [0.0]
    assert r2["ret"][0] == pytest.approx(1 + G * 2) and r2["discount"][0] == pytest.approx(G**2)
