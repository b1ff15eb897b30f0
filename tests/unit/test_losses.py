import numpy as np
import pytest
import torch

from apexq.learner.losses import beta_at, double_dqn_targets, importance_weights, new_priorities, td_loss


def test_double_dqn_targets_by_hand():
    # transition 0: ordinary 3-step (discount 0.9**3), online argmax at s' is action 1, target Q there is 2.0
    # transition 1: terminal (discount 0): target is the return alone
    # transition 2: truncated after 2 steps (discount 0.9**2): bootstraps from the final observation
    ret = torch.tensor([1 + 0.9 * 2 + 0.81 * 3, -1.0, -1.9])
    disc = torch.tensor([0.9**3, 0.0, 0.9**2])
    q_next_online = torch.tensor([[0.0, 5.0], [9.0, 1.0], [1.0, 0.0]])
    q_next_target = torch.tensor([[7.0, 2.0], [3.0, 4.0], [-10.0, 8.0]])
    t = double_dqn_targets(ret, disc, q_next_online, q_next_target)
    assert t.tolist() == pytest.approx([1 + 0.9 * 2 + 0.81 * 3 + 0.729 * 2.0, -1.0, -1.9 + 0.81 * -10.0])


def test_importance_weights_by_hand():
    prob = np.array([0.1, 0.2, 0.4])
    w = importance_weights(prob, size=10, beta=0.5)
    raw = [(10 * 0.1) ** -0.5, (10 * 0.2) ** -0.5, (10 * 0.4) ** -0.5]
    assert w.dtype == np.float32
    assert w.tolist() == pytest.approx([r / raw[0] for r in raw])
    assert w.tolist() == pytest.approx([1.0, 0.5**0.5, 0.25**0.5])
    # several minibatches at once: each row is normalised by its own maximum
    w2 = importance_weights(np.array([[0.1, 0.2, 0.4], [0.4, 0.4, 0.2]]), size=10, beta=1.0)
    assert w2.tolist()[0] == pytest.approx([1.0, 0.5, 0.25])
    assert w2.tolist()[1] == pytest.approx([0.5, 0.5, 1.0])


def test_weighted_huber_loss_and_priorities_by_hand():
    q = torch.tensor([[1.0, 2.0], [0.0, 3.0]], requires_grad=True)
    actions = torch.tensor([1, 0])
    targets = torch.tensor([2.5, 4.0])  # td = 0.5 (quadratic zone), 4.0 (linear zone)
    weights = torch.tensor([1.0, 0.25])
    loss, extra = td_loss(q, actions, targets, weights)
    huber = [0.5 * 0.5**2, 4.0 - 0.5]
    assert loss.item() == pytest.approx((1.0 * huber[0] + 0.25 * huber[1]) / 2)
    assert extra["td"].tolist() == pytest.approx([0.5, 4.0])
    assert new_priorities(extra["td"], 1e-6).tolist() == pytest.approx([0.500001, 4.000001])
    loss.backward()
    # d/dq of w*huber: quadratic zone -> -w*td/B, linear zone -> -w*sign(td)/B
    assert q.grad.flatten().tolist() == pytest.approx([0.0, -0.5 / 2, -0.25 / 2, 0.0])


def test_beta_annealing():
    assert beta_at(0, 0.4, 100) == pytest.approx(0.4)
    assert beta_at(50, 0.4, 100) == pytest.approx(0.7)
    assert beta_at(1000, 0.4, 100) == pytest.approx(1.0)
