"""Creating the run's components as Ray actors: shards, the learner (with its GPU) and actors.

Only this module calls ``ray.remote``; every component is a plain class (see services/).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Optional, TextIO

from .components import actor_settings, learner_settings, shard_redis_url, shard_spec
from .config import Config
from .run_dir import RunDir
from .startup import ClusterConfigError, Platform

log = logging.getLogger("apexq")


class RayShardProxy:
    """What the learner sees of a shard living in another Ray process (picklable: a handle)."""

    in_process = False
    nonblocking_priorities = True  # update_priorities submits the call and returns

    def __init__(self, name: str):
        self.name = name
        self._handle = None

    @property
    def handle(self):
        if self._handle is None:
            import ray

            self._handle = ray.get_actor(self.name)
        return self._handle

    def __getstate__(self):
        return {"name": self.name}

    def __setstate__(self, state):
        self.name, self._handle = state["name"], None

    def sample(self, n: int, timeout: float = 1.0):
        import ray

        return ray.get(self.handle.sample.remote(n, timeout))

    def update_priorities(self, keys, priorities) -> None:
        self.handle.update_priorities.remote(keys, priorities)  # fire and forget

    def stats(self) -> dict:
        import ray

        return ray.get(self.handle.stats.remote(), timeout=10)


@dataclass
class Member:
    """One supervised component: its handle, its running ``run`` call and restart count."""

    kind: str
    index: int
    handle: Any
    run_ref: Any = None
    restarts: int = 0
    last_stats: dict = field(default_factory=dict)
    last_seen: float = field(default_factory=time.monotonic)
    restart_times: list = field(default_factory=list)
    # counters of the member's earlier processes (Ray restarted it and its own counters began at 0):
    # what the driver reports is carried + the current process's, so it never goes backwards
    carried: dict = field(default_factory=dict)
    # until when a failure of the run resubmitted after a counted death is that same death (see
    # Supervisor.same_death)
    same_death_until: float = 0.0

    def total(self, key: str) -> float:
        return self.carried.get(key, 0) + self.last_stats.get(key, 0)


@dataclass
class Members:
    """The run's components as the driver holds them."""

    learner: Member
    shards: list[Member]  # Ray actors of this run
    external_shards: list[Member]  # replay.external: standalone servers, not ours to restart or stop
    actors: list[Member]
    spec: dict

    @property
    def supervised(self) -> list[Member]:
        return self.shards + [self.learner] + self.actors


def shard_name(run_id: str, k: int) -> str:
    return f"apexq-{run_id}-shard-{k}"


def namespace(cfg: Config, run_dir: RunDir) -> str:
    """Prefix of the run's Redis keys: replay.namespace, or the run id."""
    return cfg.replay.namespace or run_dir.run_id


def create_components(
    cfg: Config, run_dir: RunDir, platform: Platform, checkpoint: Optional[bytes], out: TextIO
) -> Members:
    """Create every component and submit its ``run``; ``checkpoint``: the bytes a resumed learner starts from."""
    import ray

    from apexq.actors.envs import env_spec

    from .services.actor import ActorService
    from .services.learner import LearnerService
    from .services.shard import ShardService

    spec = env_spec(cfg.env.id)
    ns = namespace(cfg, run_dir)
    redis_url = platform.redis_url
    assert redis_url is not None, "Platform.start() first"
    num_gpus, device = learner_gpu(cfg, platform, ray.cluster_resources().get("GPU", 0), out)
    # the learner first: its process start and torch import are the longest path to the first
    # update; it finds the shards by name, retrying until they answer
    learner_opts: dict[str, Any] = dict(
        num_cpus=cfg.learner.num_cpus, num_gpus=num_gpus, max_concurrency=4, max_restarts=-1
    )
    if cfg.learner.custom_resource:
        learner_opts["resources"] = {cfg.learner.custom_resource: 1}
    external: list[Member] = []
    if cfg.replay.external:  # standalone `apexq replay-server` processes, reached through Redis
        from apexq.replay_server.rpc import RedisShardClient

        proxies: list = [
            RedisShardClient(shard_redis_url(cfg, k, redis_url), ns, k, spec["obs_dim"])
            for k in range(cfg.replay.shards)
        ]
        external = [Member("shard", k, p) for k, p in enumerate(proxies)]
    else:
        proxies = [RayShardProxy(shard_name(run_dir.run_id, k)) for k in range(cfg.replay.shards)]
    # no checkpoint path: the learner may be on another node; its files come to the driver as
    # bytes (RayBackend.sync_files), and it resumes from the bytes of the run directory's checkpoint
    lh = (
        ray.remote(LearnerService)
        .options(**learner_opts)
        .remote(replace(learner_settings(cfg), device=device), spec, proxies, redis_url, ns, config=cfg.to_dict())
    )
    learner = Member("learner", 0, lh)
    learner.run_ref = lh.run.remote(None, checkpoint)  # type: ignore[union-attr]  # Ray types methods loosely

    shards = []
    shard_cls = ray.remote(ShardService)
    for k in range(cfg.replay.shards if not cfg.replay.external else 0):
        h = shard_cls.options(
            name=shard_name(run_dir.run_id, k), num_cpus=cfg.replay.num_cpus, max_concurrency=8, max_restarts=-1
        ).remote(shard_spec(cfg, k, spec), shard_redis_url(cfg, k, redis_url), ns, cfg.seed * 1000 + k)
        shards.append(Member("shard", k, h))
    for m in shards:
        m.run_ref = m.handle.run.remote()
    # no waiting for the shards: actors may append before a shard exists (its consumer group
    # then starts at the stream's first entry) and the learner retries until shards answer

    actor_cls = ray.remote(ActorService).options(
        num_cpus=cfg.actors.num_cpus,
        max_concurrency=4,
        max_restarts=-1,
        scheduling_strategy="SPREAD" if cfg.actors.spread else "DEFAULT",
    )
    actors = []
    for i in range(cfg.actors.num):
        ah = actor_cls.remote(actor_settings(cfg, i), shard_redis_url(cfg, i % cfg.replay.shards, redis_url), ns, spec)
        m = Member("actor", i, ah)
        m.run_ref = ah.run.remote()  # type: ignore[union-attr]  # Ray types methods loosely
        actors.append(m)
    members = Members(learner, shards, external, actors, spec)
    if num_gpus:
        wait_for_gpu(cfg, members, out)
    return members


def learner_gpu(cfg: Config, platform: Platform, cluster_gpus: float, out: TextIO) -> tuple[int, str]:
    """GPUs the learner asks Ray for and its torch device (learner.device); says which in one line."""
    from .ray_platform import learner_gpu as choose

    num_gpus, device, line = choose(cfg.learner.device, cluster_gpus)
    if num_gpus and cluster_gpus < 1 and platform.own_ray:  # no autoscaler behind a Ray of our own
        raise ClusterConfigError(
            "learner.device=cuda: this machine has no GPU that Ray sees; set learner.device "
            "to auto or cpu, or join a cluster that has or adds GPU nodes (--address)"
        )
    print(line, file=out, flush=True)
    return num_gpus, device


def wait_for_gpu(cfg: Config, members: Members, out: TextIO) -> None:
    """Wait up to learner.gpu_wait_s for the learner's GPU: an autoscaler may be adding the node.

    The learner answers once Ray has placed it; until then its request for a GPU stays
    pending, which is the demand an autoscaler acts on. If no GPU comes, everything started
    is stopped and one line names the keys to change.
    """
    import ray

    limit = cfg.learner.gpu_wait_s
    ref = members.learner.handle.node_id.remote()
    t0 = time.monotonic()
    note_at = t0 + 5.0
    while not ray.wait([ref], timeout=min(1.0, limit))[0]:
        waited = time.monotonic() - t0
        if waited >= limit:
            for m in members.supervised:
                try:
                    ray.kill(m.handle, no_restart=True)
                except Exception:
                    pass
            gpus = ray.cluster_resources().get("GPU", 0)
            raise ClusterConfigError(
                f"learner.device={cfg.learner.device}: no GPU for the learner within learner.gpu_wait_s="
                f"{limit:g}s (the cluster has {gpus:g} GPUs); add a GPU node, raise learner.gpu_wait_s, or set "
                f"learner.device=cpu"
            )
        if time.monotonic() >= note_at:
            print(
                f"apexq: waiting for a GPU node for the learner ({waited:.0f}s of learner.gpu_wait_s={limit:g})",
                file=out,
                flush=True,
            )
            note_at += 30.0


def record_placement(members: Members, run_dir: RunDir) -> None:
    """Write which node each component landed on (runs/<id>/placement.json)."""
    import ray

    try:
        nodes = ray.get([m.handle.node_id.remote() for m in members.supervised], timeout=120)
    except Exception as exc:
        log.warning("could not record placement: %s", exc)
        return
    placement = [{"kind": m.kind, "index": m.index, "node_id": n} for m, n in zip(members.supervised, nodes)]
    run_dir.write_json("placement.json", placement)
