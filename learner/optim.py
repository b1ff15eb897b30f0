"""The update's optimizer: Adam over parameters and gradients that each live in one flat buffer.

The Q-networks here are small (two 64-unit layers by default), so an update on CPU is mostly
per-op overhead, not arithmetic, and ``torch.optim.Adam`` pays a lot of it:

* its first ``add_param_group`` imports ``torch._dynamo`` (its methods are wrapped in
  ``torch._disable_dynamo``): 1.5-2.4 s of every learner's start-up on this 2-core machine,
  on the critical path to the first update;
* each ``step()`` goes through profiling hooks, grad-mode guards and per-group bookkeeping
  before its kernel: 12% of the distributed learner's wall time in a py-spy profile.

``FlatAdam`` moves every parameter into a view of one contiguous buffer and every gradient into
a view of another. Autograd accumulates into the gradient views in place, so zeroing is one
``zero_()``, the global gradient norm one ``vector_norm``, clipping one ``mul_`` (the numbers of
``torch.nn.utils.clip_grad_norm_``) and the Adam step five in-place ops on whole buffers. The
math is torch.optim.Adam's with its defaults (no weight decay, no AMSGrad): the tests check it
against hand-computed values and against ``torch.optim.Adam`` step by step. ``state_dict()`` is
in torch.optim.Adam's format, so checkpoints written before this class still resume.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


class FlatAdam:
    """Adam for ``params`` (same device and dtype), re-homed into one flat buffer.

    After construction each parameter's ``.data`` is a view of :attr:`flat` and its ``.grad`` a
    view of :attr:`grad`. In-place writes (``load_state_dict`` of the module, ``copy_``) keep
    that; anything that replaces ``.data`` or sets ``.grad`` to None (``optimizer.zero_grad()``
    of another optimizer, ``module.to()`` to another device) detaches the parameter from the
    buffers, so move the module before building this.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, betas: tuple = (0.9, 0.999), eps: float = 1e-8):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("FlatAdam needs at least one trainable parameter")
        first = self.params[0]
        if any(p.device != first.device or p.dtype != first.dtype for p in self.params):
            raise ValueError("FlatAdam needs every parameter on one device with one dtype")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        n = sum(p.numel() for p in self.params)
        self.flat = torch.empty(n, device=first.device, dtype=first.dtype)
        self.grad = torch.zeros_like(self.flat)
        self.exp_avg = torch.zeros_like(self.flat)
        self.exp_avg_sq = torch.zeros_like(self.flat)
        self._denom = torch.empty_like(self.flat)
        self.slices: list[slice] = []
        offset = 0
        with torch.no_grad():
            for p in self.params:
                s = slice(offset, offset + p.numel())
                view = self.flat[s].view_as(p)
                view.copy_(p)
                p.data = view
                p.grad = self.grad[s].view_as(p)
                self.slices.append(s)
                offset = s.stop
        self.steps = 0
        # the step count on the device, for graph_step() (set by enable_graph_step)
        self.t: torch.Tensor | None = None

    def zero_grad(self) -> None:
        self.grad.zero_()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale all gradients by ``min(1, max_norm / (norm + 1e-6))``; returns the norm before clipping."""
        norm = torch.linalg.vector_norm(self.grad)
        self.grad.mul_((max_norm / (norm + 1e-6)).clamp_(max=1.0))
        return norm

    @torch.no_grad()
    def step(self) -> None:
        """m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;
        p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)."""
        self.steps += 1
        b1, b2 = self.betas
        g = self.grad
        self.exp_avg.lerp_(g, 1.0 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        torch.sqrt(self.exp_avg_sq, out=self._denom)
        self._denom.div_(math.sqrt(1.0 - b2**self.steps)).add_(self.eps)
        self.flat.addcdiv_(self.exp_avg, self._denom, value=-self.lr / (1.0 - b1**self.steps))

    def enable_graph_step(self) -> None:
        """Keep a copy of the step count on the device, so that :meth:`graph_step` can run inside a
        CUDA graph: a graph replays the kernels it recorded, and step()'s bias corrections are
        host-side numbers that would stay those of the step it was recorded at."""
        # float32 counts exactly up to 2**24 steps; by then both bias corrections are 1 to the
        # last bit, so a count that stops there changes nothing (steps, the host count, is exact)
        self.t = torch.tensor(float(self.steps), device=self.flat.device, dtype=self.flat.dtype)

    @torch.no_grad()
    def graph_step(self) -> None:
        """step() as device work alone (no host numbers change between replays); the same update,
        with the bias corrections applied to the denominator:
        p <- p - m / ((sqrt(v) / sqrt(1 - b2^t) + eps) * (1 - b1^t) / lr).

        Counts the step in :attr:`t` only: whoever replays it adds 1 to :attr:`steps` each time.
        """
        b1, b2 = self.betas
        g = self.grad
        assert self.t is not None, "enable_graph_step() first"
        self.t.add_(1.0)
        self.exp_avg.lerp_(g, 1.0 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        torch.sqrt(self.exp_avg_sq, out=self._denom)
        self._denom.div_(torch.sqrt(1.0 - torch.pow(b2, self.t))).add_(self.eps)
        self._denom.mul_((1.0 - torch.pow(b1, self.t)) / self.lr)
        self.flat.addcdiv_(self.exp_avg, self._denom, value=-1.0)

    def snapshot(self) -> list[torch.Tensor]:
        """Copies of everything a step changes (parameters, moments, device step count)."""
        return [b.clone() for b in (self.flat, self.exp_avg, self.exp_avg_sq, self.t) if b is not None]

    def restore(self, snap: list[torch.Tensor]) -> None:
        """Undo steps since :meth:`snapshot`, in place (the buffers keep their addresses)."""
        with torch.no_grad():
            for b, saved in zip([b for b in (self.flat, self.exp_avg, self.exp_avg_sq, self.t) if b is not None], snap):
                b.copy_(saved)

    # -- torch.optim.Adam's state_dict format ------------------------------------------------

    def state_dict(self) -> dict:
        state = {}
        if self.steps:
            for i, (p, s) in enumerate(zip(self.params, self.slices)):
                state[i] = {
                    "step": torch.tensor(float(self.steps)),
                    "exp_avg": self.exp_avg[s].view_as(p).clone(),
                    "exp_avg_sq": self.exp_avg_sq[s].view_as(p).clone(),
                }
        group = {
            "lr": self.lr,
            "betas": self.betas,
            "eps": self.eps,
            "weight_decay": 0.0,
            "amsgrad": False,
            "maximize": False,
            "foreach": None,
            "capturable": False,
            "differentiable": False,
            "fused": None,
            "decoupled_weight_decay": False,
            "params": list(range(len(self.params))),
        }
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, sd: dict) -> None:
        """Load a state written by this class or by ``torch.optim.Adam`` for the same parameters.

        The learning rate, betas and eps stay those this optimizer was built with (the run's config).
        """
        groups = sd.get("param_groups") or []
        if len(groups) != 1 or len(groups[0].get("params", [])) != len(self.params):
            raise ValueError(
                f"optimizer state is for {sum(len(g.get('params', [])) for g in groups)} parameters "
                f"in {len(groups)} groups; this network has {len(self.params)} in one"
            )
        if groups[0].get("amsgrad") or groups[0].get("weight_decay"):
            raise ValueError("optimizer state uses AMSGrad or weight decay, which this Adam does not")
        state = sd.get("state") or {}
        ids = groups[0]["params"]
        steps = {float(state[k]["step"]) for k in ids if k in state}
        if len(steps) > 1:
            raise ValueError(f"optimizer state has parameters at different steps {sorted(steps)}")
        if not state:
            self.exp_avg.zero_()
            self.exp_avg_sq.zero_()
            self._set_steps(0)
            return
        if len(state) != len(ids) or any(k not in state for k in ids):
            raise ValueError("optimizer state lacks some parameters' moments")
        with torch.no_grad():
            for k, p, s in zip(ids, self.params, self.slices):
                for name, buf in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                    t = state[k][name]
                    if tuple(t.shape) != tuple(p.shape):
                        raise ValueError(
                            f"optimizer state {name} of parameter {k} has shape {tuple(t.shape)}, "
                            f"expected {tuple(p.shape)}"
                        )
                    buf[s].copy_(t.reshape(-1))
        self._set_steps(int(steps.pop()))

    def _set_steps(self, steps: int) -> None:
        self.steps = steps
        if self.t is not None:
            self.t.fill_(float(steps))
