"""Turning the config into the settings of each plain component (no Ray here)."""

from __future__ import annotations

import math

from apexq.actors.actor import ActorSettings
from apexq.learner.settings import LearnerSettings
from apexq.replay_server.codec import block_nbytes
from apexq.replay_server.shard import ShardSpec, memory_per_item

from .config import Config


def shard_capacity(cfg: Config) -> int:
    return cfg.replay.capacity // cfg.replay.shards


def stream_maxlen(cfg: Config) -> int:
    """Entries a shard's stream keeps: its whole window plus the allowed backlog."""
    return math.ceil(shard_capacity(cfg) / cfg.actors.block_size) + cfg.actors.max_backlog_blocks + 16


def replay_memory_bytes(cfg: Config, obs_dim: int) -> tuple[int, int]:
    """(bytes one shard needs, bytes its Redis stream needs) for ``replay.capacity``, an upper estimate.

    A shard's items take :func:`memory_per_item` each; its stream holds the same transitions as
    encoded blocks, plus the allowed backlog.
    """
    per = shard_capacity(cfg)
    shard = per * memory_per_item(obs_dim)
    stream = stream_maxlen(cfg) * block_nbytes(cfg.actors.block_size, obs_dim)
    return shard, stream


def shard_spec(cfg: Config, shard: int, env: dict) -> ShardSpec:
    r = cfg.replay
    return ShardSpec(
        shard_id=shard,
        capacity=shard_capacity(cfg),
        obs_dim=env["obs_dim"],
        num_actions=env["num_actions"],
        priority_alpha=r.priority_alpha,
        priority_eps=r.priority_eps,
        samples_per_insert=r.samples_per_insert,
        min_size_to_sample=r.min_size_to_sample,
        error_buffer=r.error_buffer,
    )


def actor_settings(cfg: Config, actor_id: int) -> ActorSettings:
    a = cfg.actors
    return ActorSettings(
        actor_id=actor_id,
        env_id=cfg.env.id,
        num_envs=a.envs_per_actor,
        env_offset=actor_id * a.envs_per_actor,
        total_envs=a.num * a.envs_per_actor,
        shard=actor_id % cfg.replay.shards,
        epsilon_base=a.epsilon_base,
        epsilon_alpha=a.epsilon_alpha,
        explore_mu=a.explore_mu,
        explore_max_duration=a.explore_max_duration,
        n_step=a.n_step,
        gamma=a.gamma,
        block_size=a.block_size,
        weights_update_period=a.weights_update_period,
        max_backlog_blocks=a.max_backlog_blocks,
        stream_maxlen=stream_maxlen(cfg),
        seed=cfg.seed,
        hidden_sizes=list(cfg.learner.hidden_sizes),
        dueling=cfg.learner.dueling,
    )


def learner_settings(cfg: Config) -> LearnerSettings:
    """The learner sends raw |TD errors|: ``replay.priority_eps`` goes to the shards (shard_spec), not here."""
    l, r = cfg.learner, cfg.replay
    return LearnerSettings(
        batch_size=l.batch_size,
        lr=l.lr,
        hidden_sizes=list(l.hidden_sizes),
        dueling=l.dueling,
        target_update_period=l.target_update_period,
        target_tau=l.target_tau,
        grad_clip=l.grad_clip,
        publish_every=l.publish_every,
        prefetch=l.prefetch,
        batches_per_request=l.batches_per_request,
        checkpoint_every_s=l.checkpoint_every_s,
        device=l.device,
        torch_threads=l.torch_threads,
        compile=l.compile,
        cuda_graphs=l.cuda_graphs,
        beta_start=r.beta_start,
        beta_anneal_updates=r.beta_anneal_updates,
        seed=cfg.seed,
    )


def shard_redis_url(cfg: Config, shard: int, default_url: str) -> str:
    return cfg.replay.redis_urls[shard] if cfg.replay.redis_urls else default_url


def check_replay_memory(cfg: Config, obs_dim: int, available: int, where: str, with_redis: bool) -> None:
    """A one-line ConfigError when ``replay.capacity`` cannot fit in ``available`` bytes.

    Checked before anything starts: without it a huge capacity passed validation and ended in a
    memory-allocation traceback inside a shard process.
    """
    from .config import ConfigError

    shard, stream = replay_memory_bytes(cfg, obs_dim)
    n = cfg.replay.shards if with_redis else 1
    need = n * shard + (n * stream if with_redis else 0)
    if need > 0.9 * available:
        gib = 1 << 30
        parts = f"{n} shard(s) x {shard / gib:,.1f} GiB" + (
            f" + Redis {n * stream / gib:,.1f} GiB" if with_redis else ""
        )
        raise ConfigError(
            f"replay.capacity: {cfg.replay.capacity} transitions need about {need / gib:,.1f} GiB "
            f"({parts}), more than {where}'s {available / gib:,.1f} GiB of memory; lower replay.capacity "
            f"or add replay.shards on more nodes"
        )


def physical_memory() -> int:
    import os

    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse
