"""The composition root: connects Ray and Redis, creates shards, learner and actors, supervises.

Only this module calls ``ray.remote``; every component is a plain class.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import numpy as np

from .components import actor_settings, learner_settings, shard_redis_url, shard_spec
from .config import Config
from .run_dir import RunDir, RunDirError

log = logging.getLogger("apexq")


def set_ray_env() -> None:
    """Environment every Ray process we start must share: loopback only, no usage stats."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


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
    # Launcher.same_death)
    same_death_until: float = 0.0

    def total(self, key: str) -> float:
        return self.carried.get(key, 0) + self.last_stats.get(key, 0)


# the counters each kind reports that the driver sums into never-decreasing totals
CARRIED_COUNTERS = {"actor": ("env_steps", "episodes"), "shard": ("inserted", "sampled", "rejected_total")}


class SupervisorGaveUp(RuntimeError):
    pass


class ClusterConfigError(RuntimeError):
    """A setting that cannot work on the cluster found; reported as one line, exit 2."""


class RedisUnreachable(RuntimeError):
    """Redis stayed unreachable past redis.unreachable_timeout_s: the run stops, exit status 1."""


class Launcher:
    def __init__(self, cfg: Config, run_dir: RunDir, address: Optional[str] = None,
                 redis_url: Optional[str] = None, resume: bool = False, out=sys.stdout):
        self.cfg = cfg
        self.run_dir = run_dir
        self.address = address
        self.redis_url = redis_url
        self.resume = resume
        self.out = out
        self.redis_server = None
        self.members: list[Member] = []
        self.learner: Optional[Member] = None
        self.shards: list[Member] = []
        self.external_shards: list[Member] = []  # replay.external: not ours to restart or stop
        self.actors: list[Member] = []
        self.t0 = time.monotonic()
        self.launch_wall = time.time()
        self.offset = {"time_s": 0.0, "env_steps": 0, "transitions_inserted": 0, "transitions_sampled": 0,
                       "episodes": 0}
        self.eval_return: Optional[float] = None
        self.solved_at: Optional[float] = None
        self.stop_reason = "finished"
        self._stop = threading.Event()
        self.interrupt = threading.Event()  # set by SIGINT/SIGTERM while the loop runs
        self.endpoint = None
        self.dead_actor_stats: list[dict] = []
        self.first_env_step_s: Optional[float] = None
        self.first_update_s: Optional[float] = None
        # (eval return, weights version, numpy state or None when the learner already holds it)
        self.best: Optional[tuple] = None
        self.eval_time = 0.0  # seconds spent evaluating (excluded from time to solve)
        self.reaper = None  # see cluster/reaper.py
        self.own_ray = False  # True once start_platform started a local Ray (no autoscaler behind it)
        self.redis_member = Member("redis", 0, None)  # the run's own Redis, restarted by watch_redis
        self.redis_down_since: Optional[float] = None
        self.eval_wall: Optional[float] = None  # Unix time of the latest finished evaluation
        self._next_redis_ping = 0.0
        self.artifacts_seen: tuple = ("", 0)  # (learner process, version) of the files in the run directory
        self._redis_clients: dict = {}

    # -- platform ----------------------------------------------------------------------------

    def start_platform(self) -> None:
        from apexq.core.connection import check
        if self.cfg.replay.external and self.redis_url is None and not self.cfg.replay.redis_urls:
            raise ClusterConfigError(
                "replay.external: standalone replay servers cannot reach the run's private Redis; give the run the "
                "Redis given to `apexq replay-server` (APEXQ_REDIS_URL, --redis-url-file or --redis-url) or set "
                "replay.redis_urls")
        if self.redis_url is not None:  # a given Redis must answer before anything starts
            check(self.redis_url)
        import ray

        from . import ray_platform
        set_ray_env()
        choice = ray_platform.choose(self.address)  # --address, else RAY_ADDRESS, else a local Ray of our own
        if choice.joins:
            gcs = ray_platform.resolve(choice)
            auth = ray_platform.prepare_auth(gcs, choice.source) if gcs else None
            try:
                ray.init(address=choice.address, log_to_driver=True, logging_level=logging.ERROR)
            except ConnectionError as exc:
                raise ray_platform.RayUnreachable(f"could not join the Ray cluster at {gcs or choice.address} "
                                                  f"({choice.source}): {exc}") from None
            install_signal_handlers()  # ray.init installs its own SIGTERM handler: ours must win
            print(f"apexq: joined the Ray cluster at {gcs or choice.address} (from {choice.source}"
                  f"{'; ' + auth if auth else ''})", file=self.out, flush=True)
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            if not self.cfg.replay.external:  # one shard must fit on one node
                from apexq.actors.envs import env_spec

                from .components import check_replay_memory
                from .config import ConfigError
                biggest = max(int(n.get("Resources", {}).get("memory", 0)) for n in nodes) if nodes else 0
                try:
                    if biggest:
                        check_replay_memory(self.cfg, env_spec(self.cfg.env.id)["obs_dim"], biggest,
                                            "the cluster's largest node", with_redis=False)
                except ConfigError as exc:
                    raise ClusterConfigError(str(exc)) from None
            if self.redis_url is None and len(nodes) > 1 and self.cfg.redis.host in ("127.0.0.1", "localhost", "::1"):
                raise ClusterConfigError(
                    "redis.host: the cluster has several nodes but the spawned Redis would listen on loopback only; "
                    "pass --redis-url of a Redis every node reaches, or set redis.host to 0.0.0.0 or this node's address")
        if choice.joins:
            self.start_redis()
            return
        # the private Redis process is spawned first and becomes ready while Ray starts
        from . import reaper
        self.reaper = reaper.start()  # Ray's daemons go with this process, even if it is SIGKILLed
        self.start_redis(wait=False)
        need = (self.cfg.actors.num * self.cfg.actors.num_cpus + self.cfg.replay.shards * self.cfg.replay.num_cpus
                + self.cfg.learner.num_cpus)
        num_cpus = self.cfg.ray.num_cpus or max(os.cpu_count() or 1, int(np.ceil(need)))
        # "local": a Ray of our own, whatever address file a `ray start` (live or killed) left behind
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.ERROR,
                 log_to_driver=True, configure_logging=True)
        install_signal_handlers()  # ray.init installs its own SIGTERM handler: ours must win
        self.own_ray = True
        found = ray_platform.address_file()
        print(f"apexq: started a local Ray ({num_cpus} CPUs)" + (
            f"; not the cluster at {found[1]} that {found[0]} names (--address auto joins that one)" if found else ""),
            file=self.out, flush=True)
        self.start_redis()

    def start_redis(self, wait: bool = True) -> None:
        """Spawn the run's private Redis unless a URL was given; with ``wait``, check every Redis answers."""
        from apexq.core.connection import check
        if self.redis_url is None and self.redis_server is None:
            from .redis_server import RedisServer, find_server
            binary = find_server(self.cfg.redis.server_path)
            self.redis_server = RedisServer(binary, appendfsync=self.cfg.redis.appendfsync,
                                            host=self.cfg.redis.host).spawn()
        if not wait:
            return
        if self.redis_url is None:
            from .metrics import node_address
            self.redis_server.wait_ready()
            self.redis_url = self.redis_server.url_for(node_address(self.cfg.redis.host))
        check(self.redis_url)
        for url in self.cfg.replay.redis_urls:
            check(url)

    # -- Redis supervision -------------------------------------------------------------------

    def watch_redis(self, now: float) -> None:
        """Restart the run's own Redis when its process died; stop the run when Redis stays unreachable.

        The spawned server comes back on the same port and password from its append-only file
        (``redis.appendfsync``); every component reconnects with backoff, so training goes on.
        A Redis given by URL is someone else's to restart: the run waits for it up to
        ``redis.unreachable_timeout_s``, then stops (final checkpoint, exit status 1).
        """
        srv = self.redis_server
        if srv is not None and srv.proc is not None and srv.exited() is not None and now >= self._next_redis_ping:
            code = srv.exited()
            m = self.redis_member
            m.restarts += 1
            print(f"apexq: Redis (the run's own, port {srv.port}) exited with status {code}; restarting it "
                  f"from its append-only file (#{m.restarts})", file=self.out, flush=True)
            self.note_restart(m, f"exited with status {code}")
            t = time.monotonic()
            try:
                srv.restart()
                print(f"apexq: Redis is back after {time.monotonic() - t:.1f}s; components reconnect",
                      file=self.out, flush=True)
            except RuntimeError as exc:
                log.warning("Redis restart failed: %s", exc)
                print(f"apexq: Redis restart failed ({exc}); trying again", file=self.out, flush=True)
        if now < self._next_redis_ping:
            return
        self._next_redis_ping = now + 1.0
        down = [url for url in self.redis_urls() if not self._ping(url)]
        if not down:
            if self.redis_down_since is not None:
                print(f"apexq: Redis reachable again after {now - self.redis_down_since:.0f}s", file=self.out,
                      flush=True)
            self.redis_down_since = None
            return
        from apexq.core.connection import redact
        limit = self.cfg.redis.unreachable_timeout_s
        if self.redis_down_since is None:
            self.redis_down_since = now
            print(f"apexq: Redis at {redact(down[0])} unreachable; waiting up to {limit:.0f}s "
                  f"(redis.unreachable_timeout_s)", file=self.out, flush=True)
        elif now - self.redis_down_since > limit:
            raise RedisUnreachable(f"Redis at {redact(down[0])} unreachable for {now - self.redis_down_since:.0f}s "
                                   f"(redis.unreachable_timeout_s={limit:g})")

    def redis_urls(self) -> list[str]:
        return list(dict.fromkeys([self.redis_url, *self.cfg.replay.redis_urls]))

    def _ping(self, url: str) -> bool:
        import redis
        client = self._redis_clients.get(url)
        if client is None:
            client = self._redis_clients[url] = redis.Redis.from_url(url, socket_timeout=1.0,
                                                                     socket_connect_timeout=1.0)
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False

    # -- components --------------------------------------------------------------------------

    def create_components(self) -> None:
        import ray
        from apexq.actors.envs import env_spec

        from .services.actor import ActorService as ApexActor
        from .services.learner import LearnerService as Learner
        from .services.shard import ShardService as ReplayShard

        cfg = self.cfg
        self.spec = env_spec(cfg.env.id)
        ns = self.namespace
        num_gpus, device = self.learner_gpu(ray.cluster_resources().get("GPU", 0))
        # the learner first: its process start and torch import are the longest path to the first
        # update; it finds the shards by name, retrying until they answer
        learner_opts = dict(num_cpus=cfg.learner.num_cpus, num_gpus=num_gpus, max_concurrency=4,
                            max_restarts=-1)
        if cfg.learner.custom_resource:
            learner_opts["resources"] = {cfg.learner.custom_resource: 1}
        learner_cls = ray.remote(Learner).options(**learner_opts)
        if cfg.replay.external:  # standalone `apexq replay-server` processes, reached through Redis
            from apexq.replay_server.rpc import RedisShardClient
            proxies = [RedisShardClient(shard_redis_url(cfg, k, self.redis_url), ns, k, self.spec["obs_dim"])
                       for k in range(cfg.replay.shards)]
            self.external_shards = [Member("shard", k, p) for k, p in enumerate(proxies)]
        else:
            proxies = [RayShardProxy(self.shard_name(k)) for k in range(cfg.replay.shards)]
        # no checkpoint path: the learner may be on another node; its files come here as bytes
        # (fetch_artifacts), and it resumes from the bytes of this run directory's checkpoint
        lh = learner_cls.remote(replace(learner_settings(cfg), device=device), self.spec, proxies, self.redis_url, ns, config=cfg.to_dict())
        self.learner = Member("learner", 0, lh)
        self.learner.run_ref = lh.run.remote(None, self.checkpoint_bytes() if self.resume else None)

        shard_cls = ray.remote(ReplayShard)
        for k in range(cfg.replay.shards if not cfg.replay.external else 0):
            h = shard_cls.options(name=self.shard_name(k), num_cpus=cfg.replay.num_cpus, max_concurrency=8,
                                  max_restarts=-1).remote(shard_spec(cfg, k, self.spec), shard_redis_url(cfg, k, self.redis_url), ns,
                                 cfg.seed * 1000 + k)
            self.shards.append(Member("shard", k, h))
        for m in self.shards:
            m.run_ref = m.handle.run.remote()
        # no waiting for the shards: actors may append before a shard exists (its consumer group
        # then starts at the stream's first entry) and the learner retries until shards answer

        actor_cls = ray.remote(ApexActor).options(num_cpus=cfg.actors.num_cpus, max_concurrency=4, max_restarts=-1,
                                                  scheduling_strategy="SPREAD" if cfg.actors.spread else "DEFAULT")
        for i in range(cfg.actors.num):
            url = shard_redis_url(cfg, i % cfg.replay.shards, self.redis_url)
            h = actor_cls.remote(actor_settings(cfg, i), url, ns, self.spec)
            m = Member("actor", i, h)
            m.run_ref = h.run.remote()
            self.actors.append(m)
        if num_gpus:
            self.wait_for_gpu()
        self.members = self.shards + [self.learner] + self.actors
        self.start_metrics()
        self.record_placement()

    def learner_gpu(self, cluster_gpus: float) -> tuple[int, str]:
        """GPUs the learner asks Ray for and its torch device (learner.device); says which in one line."""
        from .ray_platform import learner_gpu
        num_gpus, device, line = learner_gpu(self.cfg.learner.device, cluster_gpus)
        if num_gpus and cluster_gpus < 1 and self.own_ray:  # no autoscaler behind a Ray of our own
            raise ClusterConfigError("learner.device=cuda: this machine has no GPU that Ray sees; set learner.device "
                                     "to auto or cpu, or join a cluster that has or adds GPU nodes (--address)")
        print(line, file=self.out, flush=True)
        return num_gpus, device

    def wait_for_gpu(self) -> None:
        """Wait up to learner.gpu_wait_s for the learner's GPU: an autoscaler may be adding the node.

        The learner answers once Ray has placed it; until then its request for a GPU stays
        pending, which is the demand an autoscaler acts on. If no GPU comes, everything started
        is stopped and one line names the keys to change.
        """
        import ray
        limit = self.cfg.learner.gpu_wait_s
        ref = self.learner.handle.node_id.remote()
        t0 = time.monotonic()
        note_at = t0 + 5.0
        while not ray.wait([ref], timeout=min(1.0, limit))[0]:
            waited = time.monotonic() - t0
            if waited >= limit:
                for m in [self.learner, *self.shards, *self.actors]:
                    try:
                        ray.kill(m.handle, no_restart=True)
                    except Exception:
                        pass
                gpus = ray.cluster_resources().get("GPU", 0)
                raise ClusterConfigError(
                    f"learner.device={self.cfg.learner.device}: no GPU for the learner within learner.gpu_wait_s="
                    f"{limit:g}s (the cluster has {gpus:g} GPUs); add a GPU node, raise learner.gpu_wait_s, or set "
                    f"learner.device=cpu")
            if time.monotonic() >= note_at:
                print(f"apexq: waiting for a GPU node for the learner ({waited:.0f}s of learner.gpu_wait_s={limit:g})",
                      file=self.out, flush=True)
                note_at += 30.0

    def record_placement(self) -> None:
        """Write which node each component landed on (runs/<id>/placement.json)."""
        import ray
        try:
            nodes = ray.get([m.handle.node_id.remote() for m in self.members], timeout=120)
        except Exception as exc:
            log.warning("could not record placement: %s", exc)
            return
        placement = [{"kind": m.kind, "index": m.index, "node_id": n} for m, n in zip(self.members, nodes)]
        self.run_dir.write_json("placement.json", placement)

    # -- metrics -----------------------------------------------------------------------------

    def driver_stats(self) -> dict:
        restarts: dict = {"actor": 0, "shard": 0, "learner": 0, "redis": self.redis_member.restarts}
        for m in self.members:
            restarts[m.kind] += m.restarts
        rec = getattr(self, "last_record", None) or {}
        # Unix time of the latest finished evaluation, the launch time before the first one (so an
        # alert can say "no evaluation for 30 min" from launch on); absent when evaluation is off.
        eval_at = (self.eval_wall or self.launch_wall) if self.cfg.eval.every_seconds > 0 else None
        return {"eval_return": self.eval_return, "time_to_solve_s": self.solved_at, "restarts": restarts,
                "env_steps": rec.get("env_steps", 0), "eval_last_time": eval_at}

    def start_metrics(self) -> None:
        if not self.cfg.metrics.enabled:
            return
        from .metrics import DriverEndpoint
        self.endpoint = DriverEndpoint(self.driver_stats, self.cfg.metrics.host, self.cfg.metrics.port,
                                       self.run_dir.run_id)
        for m in self.members:
            self.register_metrics(m)
        port = int(self.endpoint.address.rsplit(":", 1)[1])
        if self.cfg.metrics.port and port != self.cfg.metrics.port:
            print(f"apexq: metrics.port {self.cfg.metrics.port} is busy; the driver serves on port {port} instead",
                  file=self.out, flush=True)
        print(f"apexq: metrics at http://{self.endpoint.address}/metrics, Prometheus HTTP SD at "
              f"http://{self.endpoint.address}/targets", file=self.out, flush=True)

    def register_metrics(self, m: Member) -> None:
        import ray
        if self.endpoint is None:
            return
        try:
            addr = ray.get(m.handle.serve_metrics.remote(self.cfg.metrics.host, 0), timeout=60)
        except Exception as exc:
            log.warning("no metrics endpoint for %s %d: %s", m.kind, m.index, exc)
            return
        self.endpoint.set_target(f"{m.kind}-{m.index}", addr, m.kind, m.index)
        self.write_file_sd()

    def write_file_sd(self) -> None:
        self.run_dir.write_json("prometheus_targets.json", self.endpoint.sd_document())

    @property
    def namespace(self) -> str:
        """Prefix of the run's Redis keys: replay.namespace, or the run id."""
        return self.cfg.replay.namespace or self.run_dir.run_id

    def shard_name(self, k: int) -> str:
        return f"apexq-{self.run_dir.run_id}-shard-{k}"

    # -- supervision -------------------------------------------------------------------------

    def supervise(self) -> None:
        """Restart the ``run`` of any component whose process died (Ray recreated the actor)."""
        import ray
        refs = [m.run_ref for m in self.members]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for m in self.members:
            if m.run_ref not in ready:
                continue
            try:
                ray.get(m.run_ref)
                reason = "returned"
            except ray.exceptions.RayActorError as exc:
                reason = f"process died ({type(exc).__name__})"
            except Exception as exc:  # the component raised
                reason = f"raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if self._stop.is_set():
                continue
            counted = not self.same_death(m, reason)
            if not counted:
                log.info("%s %d: Ray is still restarting it; resubmitting its run", m.kind, m.index)
            else:
                # its new process gets a whole heartbeat timeout to come up (a learner restarting
                # slower than the timeout counted from its old process's last answer was killed as hung)
                m.last_seen = max(m.last_seen, time.monotonic())
                self.note_restart(m, reason)
                m.restarts += 1
                log.warning("%s %d %s; restarting it (restart #%d)", m.kind, m.index, reason, m.restarts)
                print(f"apexq: {m.kind} {m.index} {reason}; restarting (#{m.restarts})", file=self.out, flush=True)
            # a learner Ray restarted is a new process, perhaps on another node: it continues from
            # the run's latest checkpoint, which lives here (a process that only raised ignores it)
            restore = (None, self.checkpoint_bytes()) if m is self.learner else ()
            m.run_ref = m.handle.run.remote(*restore)
            self.register_metrics(m)
            if counted:
                m.same_death_until = time.monotonic() + 10.0

    @staticmethod
    def same_death(m: Member, reason: str) -> bool:
        """Whether ``m``'s run failed only because Ray was still bringing back the process whose death was counted.

        The run resubmitted at once can reach the dead process and fail with ActorUnavailableError
        seconds later (here 2-4 s), even after the new process answered other calls: one SIGKILLed
        learner counted two restarts (toward supervision.max_restarts and in
        apexq_component_restarts_total). Only once per counted death and within 10 s of the
        resubmission, so a crash loop is still counted.
        """
        if "ActorUnavailableError" in reason and time.monotonic() < m.same_death_until:
            m.same_death_until = 0.0
            return True
        return False

    def note_restart(self, m: Member, reason: str) -> None:
        sup = self.cfg.supervision
        now = time.monotonic()
        m.restart_times = [t for t in m.restart_times if now - t <= sup.window_s] + [now]
        recent = sum(len([t for t in x.restart_times if now - t <= sup.window_s])
                     for x in [*self.members, self.redis_member])
        if recent > sup.max_restarts:
            raise SupervisorGaveUp(f"{recent} component restarts within {sup.window_s:.0f}s "
                                   f"(supervision.max_restarts={sup.max_restarts}); last: {m.kind} {m.index} {reason}")

    def check_heartbeats(self) -> None:
        """Kill components that stopped answering; Ray recreates them and supervise() restarts their run."""
        import ray
        limit = self.cfg.supervision.heartbeat_timeout_s
        now = time.monotonic()
        for m in self.members:
            if now - m.last_seen > limit:
                log.warning("%s %d has not answered for %.0fs; killing it for a restart", m.kind, m.index, now - m.last_seen)
                print(f"apexq: {m.kind} {m.index} hung (no heartbeat for {now - m.last_seen:.0f}s); restarting",
                      file=self.out, flush=True)
                try:
                    ray.kill(m.handle, no_restart=False)
                except Exception:
                    pass
                # the new process gets a whole timeout of its own to come up before it can be called
                # hung (from the kill, a restart slower than the timeout was killed again)
                m.last_seen = now + limit

    def gather_stats(self, timeout: float = 5.0) -> None:
        import ray
        refs = {id(m): m.handle.stats.remote() for m in self.members}
        for m in self.external_shards:  # asked while the Ray components answer
            try:
                m.last_stats = m.handle.stats(timeout=min(timeout, 3.0))
                m.last_seen = time.monotonic()
            except Exception as exc:
                log.warning("standalone replay shard %d did not answer stats: %s", m.index, exc)
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
        ready_set = set(ready)
        for m in self.members:
            ref = refs[id(m)]
            if ref in ready_set:
                try:
                    st = ray.get(ref)
                except Exception:
                    continue
                m.last_seen = time.monotonic()
                if st.get("started") is False:  # a learner process not yet resumed: its counters are not the run's
                    continue
                self.fold_if_restarted(m, st)
                m.last_stats = st

    def fold_if_restarted(self, m: Member, new: dict) -> None:
        """A new process behind ``m`` (Ray restarted it): carry the old one's counters forward.

        Without this, the run's env steps went backwards after an actor restart. The old
        process's last stats also feed the accounting (what it had acknowledged, held in memory).
        """
        old = m.last_stats
        if not old or old.get("incarnation") == new.get("incarnation"):
            return
        for key in CARRIED_COUNTERS.get(m.kind, ()):
            m.carried[key] = m.carried.get(key, 0) + old.get(key, 0)
        if m.kind == "actor":
            self.dead_actor_stats.append(dict(old))

    # -- the learner's files ------------------------------------------------------------------

    def checkpoint_bytes(self) -> Optional[bytes]:
        """The run's latest checkpoint, for a learner to continue from (None before the first one)."""
        try:
            return self.run_dir.checkpoint.read_bytes()
        except FileNotFoundError:
            return None

    def fetch_artifacts(self, force: bool = False) -> bool:
        """Write the learner's new checkpoint and policy files into the run directory.

        Asks only when the learner's stats show a version newer than the one written (or with
        ``force``); the learner answers with the files changed since. Raises RunDirError when
        they cannot be written (disk full). Returns whether the learner answered.
        """
        import ray
        seen = self.artifacts_seen
        mark = self.learner.last_stats.get("artifacts")
        if not force and (not mark or tuple(mark) == seen):
            return True
        try:
            token, version, files = ray.get(self.learner.handle.artifacts.remote(*seen), timeout=10)
        except Exception as exc:
            log.warning("could not fetch the learner's files: %s", exc)
            return False
        self.run_dir.write_files(files)
        self.artifacts_seen = (token, version)
        return True

    def adopt_best(self) -> None:
        """A resumed run's best evaluation so far is the one in its checkpoint, which the learner read."""
        ls = self.learner.last_stats
        if self.best is None and ls.get("best_eval_return") is not None:
            self.best = (float(ls["best_eval_return"]), int(ls["best_weights_version"]), None)

    # -- main loop ---------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def record(self, prev: Optional[dict]) -> dict:
        a = [m.last_stats for m in self.actors]
        env_steps = self.offset["env_steps"] + sum(m.total("env_steps") for m in self.actors)
        episodes = self.offset["episodes"] + sum(m.total("episodes") for m in self.actors)
        rets = [r for s in a for r in s.get("returns", [])]
        shard_members = self.shards + self.external_shards
        sh = [m.last_stats for m in shard_members]
        ls = self.learner.last_stats
        rec = {
            "time_s": round(self.offset["time_s"] + self.elapsed(), 3),
            "env_steps": int(env_steps),
            "episodes": int(episodes),
            "updates": int(ls.get("updates", 0)),
            "transitions_inserted": int(self.offset["transitions_inserted"] + sum(m.total("inserted") for m in shard_members)),
            "transitions_sampled": int(self.offset["transitions_sampled"] + ls.get("transitions_sampled", 0)),
            "replay_size": int(sum(s.get("size", 0) for s in sh)),
            "rejected": int(sum(m.total("rejected_total") for m in shard_members)),
            "weights_version": int(ls.get("weights_version", 0)),
            "actor_weights_versions": [s.get("weights_version", -1) for s in a],
            "mean_return": float(np.mean(rets)) if rets else None,
            "eval_return": self.eval_return,
            "loss": ls.get("loss"), "td_abs": ls.get("td_abs"), "q_mean": ls.get("q_mean"),
            "restarts": sum(m.restarts for m in self.members) + self.redis_member.restarts,
            # where the pipeline waits: the learner for samples, shards holding ingest back (the rate
            # limiter), actors for their stream's backlog (what benchmarks/scaling.py reports)
            "sample_waits": int(ls.get("sample_waits", 0)),
            "insert_waits": int(sum(s.get("insert_waits", 0) for s in sh)),
            "backpressure_waits": int(sum(s.get("backpressure_waits", 0) for s in a)),
        }
        firsts = [s["first_step_at"] for s in a if s.get("first_step_at")]
        if firsts and self.first_env_step_s is None:
            self.first_env_step_s = round(min(firsts) - self.launch_wall, 2)
            print(f"apexq: first environment step {self.first_env_step_s:.1f}s after launch", file=self.out, flush=True)
        rec["first_env_step_s"] = self.first_env_step_s
        if ls.get("first_update_at") and self.first_update_s is None:
            self.first_update_s = round(ls["first_update_at"] - self.launch_wall, 2)
            on = f"on {ls.get('device', '?')}" + (", the update as one CUDA graph" if ls.get("cuda_graph") else "")
            print(f"apexq: first learner update {self.first_update_s:.1f}s after launch ({on})", file=self.out, flush=True)
        rec["first_update_s"] = self.first_update_s
        if prev is not None:
            dt = max(1e-6, rec["time_s"] - prev["time_s"])
            rec["env_steps_per_s"] = round((rec["env_steps"] - prev["env_steps"]) / dt, 1)
            rec["updates_per_s"] = round((rec["updates"] - prev["updates"]) / dt, 2)
        return rec

    def progress_line(self, r: dict) -> str:
        def k(x):
            return f"{x / 1e6:.2f}M" if x >= 1e6 else (f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}")
        ret = f"{r['mean_return']:.1f}" if r["mean_return"] is not None else "-"
        ev = f"{r['eval_return']:.1f}" if r["eval_return"] is not None else "-"
        return (f"[{r['time_s']:6.0f}s] env steps {k(r['env_steps'])} ({k(r.get('env_steps_per_s', 0))}/s) | "
                f"updates {k(r['updates'])} ({r.get('updates_per_s', 0):.0f}/s) | return {ret} | eval {ev} | "
                f"replay {k(r['replay_size'])} | weights v{r['weights_version']}")

    def evaluate_now(self) -> Optional[float]:
        from apexq.actors.policy import NumpyQPolicy
        from apexq.core import weights_store
        from apexq.core.connection import connect
        from apexq.core.weights_store import WeightsKeys as Keys
        from .evaluate import evaluate
        try:
            client = connect(self.redis_url)
            got = weights_store.fetch_if_newer(client, Keys(self.namespace), -1, as_numpy=True)
            client.close()
        except Exception as exc:
            log.warning("evaluation skipped: %s", exc)
            return None
        if got is None:
            return None
        policy = NumpyQPolicy(self.spec, self.cfg.learner.hidden_sizes, self.cfg.learner.dueling)
        policy.load_state(got[1])
        returns = evaluate(policy, self.cfg.env.id, self.cfg.eval.episodes, seed=self.cfg.seed)
        value = float(np.mean(returns))
        self.adopt_best()
        if self.best is None or value > self.best[0]:
            self.best = (value, int(got[0]), got[1])
        self.send_best_policy()
        return value

    def send_best_policy(self, wait: bool = False) -> None:
        """Hand the best evaluated weights to the learner (again after a restart lost them)."""
        if self.best is None or self.best[2] is None or self.learner is None:
            return
        if not wait and self.learner.last_stats.get("best_weights_version") == self.best[1]:
            return
        ref = self.learner.handle.set_best_policy.remote(self.best[1], self.best[0], self.best[2])
        if wait:
            import ray
            try:
                ray.get(ref, timeout=10)
            except Exception as exc:
                log.warning("could not hand the best policy to the learner: %s", exc)

    def loop(self) -> None:
        cfg = self.cfg
        prev = None
        next_tick = time.monotonic() + min(cfg.train.progress_every_s, 2.0)
        next_eval = time.monotonic() + cfg.eval.every_seconds if cfg.eval.every_seconds > 0 else float("inf")
        eval_time = self.eval_time
        _RUNNING["launcher"] = self
        while not self._stop.is_set():
            time.sleep(0.1)
            if self.interrupt.is_set():
                raise KeyboardInterrupt  # from a known place: see install_signal_handlers
            self.supervise()
            now = time.monotonic()
            self.watch_redis(now)
            if now >= next_eval and self.redis_down_since is not None:
                next_eval = now + 1.0  # the weights live in Redis: evaluate once it is back
            if now >= next_eval:
                t = time.monotonic()
                value = self.evaluate_now()
                eval_time += time.monotonic() - t
                self.eval_time = eval_time
                if value is not None:
                    self.eval_return, self.eval_wall = value, time.time()
                    if cfg.train.stop_at_return is not None and value >= cfg.train.stop_at_return:
                        self.solved_at = self.offset["time_s"] + self.elapsed()
                        self.stop_reason = f"eval return {value:.1f} >= train.stop_at_return"
                next_eval = time.monotonic() + cfg.eval.every_seconds
            if now >= next_tick or self.solved_at is not None:
                self.gather_stats()
                self.check_heartbeats()
                self.adopt_best()
                self.fetch_artifacts()  # raises RunDirError when the disk is full
                rec = self.record(prev)
                rec["eval_time_s"] = round(eval_time, 3)
                self.run_dir.append_metrics(rec)
                print(self.progress_line(rec), file=self.out, flush=True)
                self.learner_set_extra(rec)
                prev = rec
                next_tick = now + cfg.train.progress_every_s
                if cfg.train.max_env_steps is not None and rec["env_steps"] >= cfg.train.max_env_steps:
                    self.stop_reason = "reached train.max_env_steps"
                    break
            if self.solved_at is not None:
                break
            if cfg.train.max_seconds is not None and self.offset["time_s"] + self.elapsed() >= cfg.train.max_seconds:
                self.stop_reason = "reached train.max_seconds"
                break

    def learner_set_extra(self, rec: dict) -> None:
        self.last_record = rec
        extra = {k: rec[k] for k in ("time_s", "env_steps", "episodes", "transitions_inserted", "transitions_sampled")}
        self.learner.handle.set_extra.remote(extra)
        self.run_dir.write_state(extra)

    # -- stop --------------------------------------------------------------------------------

    def shutdown_components(self) -> dict:
        """Stop actors (they flush what they hold), let shards drain, stop the learner, checkpoint."""
        import ray
        self._stop.set()
        summary: dict = {}
        if not self.members:
            return summary
        for m in self.actors:
            m.handle.stop.remote()
        ray.wait([m.run_ref for m in self.actors], num_returns=len(self.actors), timeout=10)
        redis_down = self.redis_down_since is not None and not all(self._ping(u) for u in self.redis_urls())
        deadline = time.monotonic() + (0 if redis_down else 5)
        while time.monotonic() < deadline:  # let the shards ingest the last blocks
            if self._backlog() == 0:
                break
            time.sleep(0.1)
        self.gather_stats()
        rec = self.record(getattr(self, "last_record", None))
        self.learner.handle.stop.remote()
        try:
            ray.get(self.learner.run_ref, timeout=30)
        except Exception as exc:
            log.warning("learner did not stop cleanly: %s", exc)
        extra = {k: rec[k] for k in ("time_s", "env_steps", "episodes", "transitions_inserted", "transitions_sampled")}
        self.send_best_policy(wait=True)  # policy.pt2 of the final checkpoint comes from it
        why = "the learner did not answer"
        try:
            made = ray.get(self.learner.handle.save_checkpoint.remote(extra), timeout=60)
            if made is None:
                why = "the learner was restarted and had not resumed; the last checkpoint is kept"
            elif self.fetch_artifacts(force=True):
                summary["checkpoint"] = str(self.run_dir.checkpoint)
        except RunDirError as exc:
            why = str(exc)
        except Exception as exc:
            log.error("final checkpoint failed: %s", exc)
        self.gather_stats()
        if "checkpoint" not in summary:
            print(f"apexq: final checkpoint failed: {why}", file=self.out, flush=True)
        rec = self.record(None)
        for m in self.shards:
            m.handle.stop.remote()
        ray.wait([m.run_ref for m in self.shards], num_returns=len(self.shards), timeout=10)
        try:
            self.run_dir.write_state(extra)
            self.run_dir.append_metrics({**rec, "final": True})
        except RunDirError as exc:
            print(f"apexq: could not write the final record: {exc}", file=self.out, flush=True)
        summary["record"] = rec
        if redis_down:  # its counters are out of reach: say so rather than wait on retries
            summary["accounting"] = {"reconciled": False, "why": "Redis unreachable at the end of the run"}
        else:
            summary["accounting"] = self.accounting()
        return summary

    def accounting(self) -> dict:
        """Reconcile appended = ingested + pending from Redis; compare with what actors saw acknowledged."""
        from apexq.core.connection import connect
        from apexq.replay_server.accounting import reconcile
        shards = []
        for k in range(self.cfg.replay.shards):
            try:
                c = connect(shard_redis_url(self.cfg, k, self.redis_url))
                shards.append(reconcile(c, self.namespace, k))
                c.close()
            except Exception as exc:
                log.warning("accounting for shard %d failed: %s", k, exc)
        redis_by_actor: dict = {}
        for sh in shards:
            for a, n in sh["appended_by_actor"].items():
                redis_by_actor[a] = redis_by_actor.get(a, 0) + n
        local: dict = {}
        for st in [m.last_stats for m in self.actors] + self.dead_actor_stats:
            if st:
                local[st["actor_id"]] = local.get(st["actor_id"], 0) + st.get("transitions_appended", 0)
        lost_in_redis = sum(max(0, n - redis_by_actor.get(a, 0)) for a, n in local.items())
        acct = {
            "appended": sum(s["appended"] for s in shards), "ingested": sum(s["ingested"] for s in shards),
            "pending": sum(s["pending"] for s in shards), "rejected_entries": sum(s["rejected_entries"] for s in shards),
            "reconciled": len(shards) == self.cfg.replay.shards,
            "balanced": all(s["balanced"] for s in shards) and len(shards) == self.cfg.replay.shards,
            "lost_in_redis": lost_in_redis,
            "in_flight_lost": sum(st.get("in_flight", 0) for st in self.dead_actor_stats),
            "actor_restarts": len(self.dead_actor_stats), "shards": shards,
        }
        try:
            self.run_dir.write_json("accounting.json", acct)
        except RunDirError as exc:
            print(f"apexq: could not write accounting.json: {exc}", file=self.out, flush=True)
        return acct

    def _backlog(self) -> int:
        from apexq.core.connection import connect
        from apexq.replay_server.keys import Keys
        keys = Keys(self.namespace)
        total = 0
        for k in range(self.cfg.replay.shards):
            try:
                c = connect(shard_redis_url(self.cfg, k, self.redis_url))
                for g in c.xinfo_groups(keys.stream(k)):
                    total += int(g.get("lag") or 0) + int(g.get("pending") or 0)
                c.close()
            except Exception:
                return 0
        return total

    def stop_platform(self) -> None:
        import ray
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None
        if ray.is_initialized():
            ray.shutdown()
        if self.redis_server is not None:
            self.redis_server.stop()
            self.redis_server = None
        for client in self._redis_clients.values():
            client.close()
        self._redis_clients.clear()
        from . import reaper
        reaper.release(self.reaper)
        self.reaper = None

    def load_offsets(self) -> None:
        state = self.run_dir.read_state()
        if state:
            for k in self.offset:
                self.offset[k] = state.get(k, 0)


_RUNNING: dict = {"launcher": None}


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM stop the run gracefully.

    While the components run, the first signal only sets a flag that the driver's loop turns
    into the graceful stop at its next tick (every 0.1 s): an exception raised at an arbitrary
    point, e.g. inside a Ray call, could leave a lock held and hang the shutdown. Before the
    loop (start-up), and for a second signal, they interrupt at once (KeyboardInterrupt).
    """
    def handler(signum, frame):
        launcher = _RUNNING["launcher"]
        if launcher is not None and not launcher.interrupt.is_set():
            launcher.interrupt.set()
            return
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def train(cfg: Config, run_dir: RunDir, address=None, redis_url=None, resume=False, out=sys.stdout,
          launch_time: Optional[float] = None) -> dict:
    launcher = Launcher(cfg, run_dir, address, redis_url, resume, out)
    if launch_time is not None:  # count start-up from the command's start, not from here
        launcher.launch_wall = launch_time
        launcher.t0 -= time.time() - launch_time
    if resume:
        launcher.load_offsets()
    install_signal_handlers()
    summary: dict = {}
    try:
        try:
            launcher.start_platform()
            print(f"apexq: run {run_dir.run_id} in {run_dir.path} | env {cfg.env.id} | "
                  f"{cfg.actors.num} actors x {cfg.actors.envs_per_actor} envs | {cfg.replay.shards} shard(s) | "
                  f"platform ready in {launcher.elapsed():.1f}s", file=out, flush=True)
            launcher.create_components()
            launcher.loop()
        except KeyboardInterrupt:
            launcher.stop_reason = "interrupted"
            print("apexq: stopping (interrupt received)...", file=out, flush=True)
        except SupervisorGaveUp as exc:
            launcher.stop_reason = f"gave up: {exc}"
            print(f"apexq: error: {exc}", file=out, flush=True)
        except RedisUnreachable as exc:
            launcher.stop_reason = f"Redis unreachable: {exc}"
            print(f"apexq: error: {exc}; stopping with a final checkpoint. Bring Redis back, then "
                  f"apexq train --resume {run_dir.path}", file=out, flush=True)
        except RunDirError as exc:
            launcher.stop_reason = f"run directory failed: {exc}"
            print(f"apexq: error: {exc}; stopping. The last complete checkpoint is kept: free space, then "
                  f"apexq train --resume {run_dir.path}", file=out, flush=True)
        finally:
            try:
                summary = launcher.shutdown_components()
            except KeyboardInterrupt:
                pass
            finally:
                launcher.stop_platform()
    except KeyboardInterrupt:
        launcher.stop_platform()
    finally:
        _RUNNING["launcher"] = None
    summary["stop_reason"] = launcher.stop_reason
    if launcher.best is not None:
        summary["best_eval_return"], summary["best_weights_version"] = launcher.best[0], launcher.best[1]
    summary["solved_at_s"] = launcher.solved_at
    summary["eval_time_s"] = launcher.eval_time
    return summary
