"""The update's optimizer plumbing: fused Adam, and all gradients in one buffer.

The Q-networks here are small (two 64-unit layers by default), so an update on CPU is mostly
per-op overhead, not arithmetic. Two changes cut ops without changing the math:

* ``make_adam``: Adam with ``fused=True`` (one kernel for all parameters, on CPU and CUDA)
  where this torch supports it, ``foreach=True`` otherwise.
* ``FlatGradients``: every parameter's ``.grad`` is a view into one flat buffer. Autograd then
  accumulates into those views in place, so zeroing is one ``zero_()``, the global gradient
  norm one ``vector_norm`` and clipping one ``mul_`` -- the same numbers as
  ``torch.nn.utils.clip_grad_norm_`` (which computes one norm per tensor, then the norm of
  those) without its per-tensor bookkeeping.

Measured with `python benchmarks/learner.py --quick` (default network, one torch thread, this
2-core machine), before -> after this module and the functional forward in network.py: the
bare update 358 -> 505-571 updates/s at batch 512 and 654 -> 806-923 at batch 128; the learner
fed by its pipeline 287 -> 363-431 and 512 -> 621-714.
"""
from __future__ import annotations

from typing import Iterable

import torch


def make_adam(params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Adam:
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device without a fused kernel
        return torch.optim.Adam(params, lr=lr, foreach=True)


class FlatGradients:
    """Gradients of ``params`` (same device and dtype) held in one contiguous buffer.

    Use :meth:`zero_`, never ``optimizer.zero_grad()``: that sets ``.grad`` to None, and
    backward would then put the gradients in fresh tensors outside the buffer.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter]):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("FlatGradients needs at least one trainable parameter")
        first = self.params[0]
        if any(p.device != first.device or p.dtype != first.dtype for p in self.params):
            raise ValueError("FlatGradients needs every parameter on one device with one dtype")
        self.buffer = torch.zeros(sum(p.numel() for p in self.params), device=first.device, dtype=first.dtype)
        offset = 0
        for p in self.params:
            p.grad = self.buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()

    def zero_(self) -> None:
        self.buffer.zero_()

    def clip_(self, max_norm: float) -> torch.Tensor:
        """Scale all gradients by ``min(1, max_norm / (norm + 1e-6))``; returns the norm before clipping."""
        norm = torch.linalg.vector_norm(self.buffer)
        self.buffer.mul_((max_norm / (norm + 1e-6)).clamp_(max=1.0))
        return norm
