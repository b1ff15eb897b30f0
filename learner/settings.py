"""The learner's settings: a plain dataclass, importable without torch (the driver builds it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class LearnerSettings:
    """Built by cluster/components.py from the config's learner and replay sections; their default
    file (configs/mountaincar.yaml) is the only place defaults live, so none has one here."""

    batch_size: int
    lr: float
    hidden_sizes: list
    dueling: bool
    target_update_period: int
    target_tau: float
    grad_clip: float
    publish_every: int
    prefetch: int
    batches_per_request: int
    checkpoint_every_s: float
    device: str
    torch_threads: int
    compile: bool
    cuda_graphs: bool  # on CUDA only (see learner/cuda_graph.py)
    beta_start: float
    beta_anneal_updates: int
    seed: int
