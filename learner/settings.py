"""The learner's settings: a plain dataclass, importable without torch (the driver builds it)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LearnerSettings:
    batch_size: int = 512
    lr: float = 2e-3
    hidden_sizes: list = field(default_factory=lambda: [64, 64])
    dueling: bool = False
    target_update_period: int = 100
    target_tau: float = 0.0
    grad_clip: float = 10.0
    publish_every: int = 25
    prefetch: int = 8
    batches_per_request: int = 8
    checkpoint_every_s: float = 30.0
    device: str = "auto"
    torch_threads: int = 1
    compile: bool = False
    cuda_graphs: bool = True  # on CUDA only (see learner/cuda_graph.py)
    beta_start: float = 0.4
    beta_anneal_updates: int = 20_000
    priority_eps: float = 1e-6
    seed: int = 0
