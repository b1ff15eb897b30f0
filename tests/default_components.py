"""Settings of components that tests and benchmarks build directly, taken from the packaged default
config (components carry no defaults of their own), with a test's own values on top.

    shard_spec(capacity=100, min_size_to_sample=10)       # shard 0 of MountainCar (2 obs, 3 actions)
    learner_settings(batch_size=32, device="cpu")
    actor_settings(num_envs=8, block_size=32)
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

from apexq.cluster import components
from apexq.cluster.config import Config, load_config

MOUNTAIN_CAR = {"obs_dim": 2, "num_actions": 3}


@lru_cache(maxsize=1)
def default_config() -> Config:
    return load_config()


def shard_spec(**changes):
    """``components.shard_spec`` of the default config's shard 0 for MountainCar-v0, with ``changes``."""
    return replace(components.shard_spec(default_config(), 0, MOUNTAIN_CAR), **changes)


def learner_settings(**changes):
    return replace(components.learner_settings(default_config()), **changes)


def actor_settings(actor_id: int = 0, **changes):
    """Actor ``actor_id`` of the default config, with ``changes`` (e.g. num_envs and total_envs together)."""
    return replace(components.actor_settings(default_config(), actor_id), **changes)
