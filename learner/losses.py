"""Pure loss math for n-step Double DQN with prioritized replay. Shapes in the docstrings.

B = batch size, A = number of actions.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def double_dqn_targets(
    ret: torch.Tensor, discount: torch.Tensor, q_next_online: torch.Tensor, q_next_target: torch.Tensor
) -> torch.Tensor:
    """``ret + discount * Q_target(s', argmax_a Q_online(s', a))``.

    ret, discount: [B] (the n-step return and bootstrap discount carried by each transition;
    discount is 0 after a termination and gamma**k after a truncation or k steps).
    q_next_online, q_next_target: [B, A]. Returns [B].
    """
    best = q_next_online.argmax(dim=1, keepdim=True)
    return ret + discount * q_next_target.gather(1, best).squeeze(1)


def importance_weights(prob: np.ndarray, size: int, beta: float) -> np.ndarray:
    """``w_i = (size * P(i)) ** -beta``, normalised by the minibatch maximum.

    prob: [B] or [k, B] (k minibatches at once, each row normalised by its own maximum) ->
    float32 of the same shape.
    """
    w = (size * np.asarray(prob, np.float64)) ** (-beta)
    return (w / w.max(axis=-1, keepdims=True)).astype(np.float32)


def td_loss(
    q: torch.Tensor, actions: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, huber_delta: float = 1.0
) -> tuple[torch.Tensor, dict]:
    """Importance-weighted Huber loss. q: [B, A], actions: [B] int64, targets, weights: [B].

    Returns ``(loss, extra)`` where extra holds ``td`` ([B], target - Q(s,a), detached) and
    ``q_taken`` ([B]).
    """
    q_taken = q.gather(1, actions[:, None]).squeeze(1)
    td = targets.detach() - q_taken
    per_item = F.huber_loss(q_taken, targets.detach(), reduction="none", delta=huber_delta)
    loss = (weights * per_item).mean()
    return loss, {"td": td.detach(), "q_taken": q_taken.detach()}


def new_priorities(td: torch.Tensor, eps: float) -> torch.Tensor:
    """``|td| + eps`` ([B]). The learner passes eps 0: the shard adds replay.priority_eps itself
    (and the addition of 0, one more kernel per update on a GPU, is left out)."""
    return td.abs() + eps if eps else td.abs()


def beta_at(update: int, beta_start: float, anneal_updates: int) -> float:
    """Linear annealing of the importance-sampling exponent from ``beta_start`` to 1."""
    frac = min(1.0, update / max(1, anneal_updates))
    return beta_start + frac * (1.0 - beta_start)
