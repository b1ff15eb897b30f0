"""Platform start-up: the Ray the run uses (joined or its own) and the Redis it talks through.

:class:`Platform` owns both for the run's lifetime: it joins or starts Ray, spawns the run's
private Redis unless one was given, restarts that Redis when it dies (:meth:`Platform.watch_redis`)
and stops what it started.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Optional, TextIO

import numpy as np

from .config import Config

if TYPE_CHECKING:
    from .redis_server import RedisServer

log = logging.getLogger("apexq")


class ClusterConfigError(RuntimeError):
    """A setting that cannot work on the cluster found; reported as one line, exit 2."""


class RedisUnreachable(RuntimeError):
    """Redis stayed unreachable past redis.unreachable_timeout_s: the run stops, exit status 1."""


def set_ray_env() -> None:
    """Environment every Ray process we start must share: loopback only, no usage stats."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


class Platform:
    """Ray and Redis for one run.

    ``on_signals`` is called right after ``ray.init``: Ray installs its own SIGTERM handler, and
    the run's must win.
    """

    def __init__(
        self, cfg: Config, address: Optional[str], redis_url: Optional[str], out: TextIO, on_signals: Callable[[], None]
    ):
        self.cfg, self.address, self.redis_url, self.out = cfg, address, redis_url, out
        self.on_signals = on_signals
        self.redis_server: Optional[RedisServer] = None  # the run's own Redis process, when no URL was given
        self.own_ray = False  # True once start() started a local Ray (no autoscaler behind it)
        self.reaper: Optional[subprocess.Popen] = None  # see cluster/reaper.py
        self.redis_down_since: Optional[float] = None
        self._next_redis_ping = 0.0
        self._redis_clients: dict = {}

    def start(self) -> None:
        from apexq.core.connection import check

        cfg = self.cfg
        if cfg.replay.external and self.redis_url is None and not cfg.replay.redis_urls:
            raise ClusterConfigError(
                "replay.external: standalone replay servers cannot reach the run's private Redis; give the run the "
                "Redis given to `apexq replay-server` (APEXQ_REDIS_URL, --redis-url-file or --redis-url) or set "
                "replay.redis_urls"
            )
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
                raise ray_platform.RayUnreachable(
                    f"could not join the Ray cluster at {gcs or choice.address} ({choice.source}): {exc}"
                ) from None
            self.on_signals()
            print(
                f"apexq: joined the Ray cluster at {gcs or choice.address} (from {choice.source}"
                f"{'; ' + auth if auth else ''})",
                file=self.out,
                flush=True,
            )
            self.check_cluster([n for n in ray.nodes() if n.get("Alive")])
            self.start_redis()
            return
        # the private Redis process is spawned first and becomes ready while Ray starts
        from . import reaper

        self.reaper = reaper.start()  # Ray's daemons go with this process, even if it is SIGKILLed
        self.start_redis(wait=False)
        need = cfg.actors.num * cfg.actors.num_cpus + cfg.replay.shards * cfg.replay.num_cpus + cfg.learner.num_cpus
        num_cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, int(np.ceil(need)))
        # "local": a Ray of our own, whatever address file a `ray start` (live or killed) left behind
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            logging_level=logging.ERROR,
            log_to_driver=True,
            configure_logging=True,
        )
        self.on_signals()
        self.own_ray = True
        found = ray_platform.address_file()
        print(
            f"apexq: started a local Ray ({num_cpus} CPUs)"
            + (
                f"; not the cluster at {found[1]} that {found[0]} names (--address auto joins that one)"
                if found
                else ""
            ),
            file=self.out,
            flush=True,
        )
        self.start_redis()

    def check_cluster(self, nodes: list[dict]) -> None:
        """Settings a joined cluster cannot run: a shard larger than any node, a loopback Redis on many nodes."""
        cfg = self.cfg
        if not cfg.replay.external:  # one shard must fit on one node
            from apexq.actors.envs import env_spec

            from .components import check_replay_memory
            from .config import ConfigError

            biggest = max(int(n.get("Resources", {}).get("memory", 0)) for n in nodes) if nodes else 0
            try:
                if biggest:
                    check_replay_memory(
                        cfg, env_spec(cfg.env.id)["obs_dim"], biggest, "the cluster's largest node", with_redis=False
                    )
            except ConfigError as exc:
                raise ClusterConfigError(str(exc)) from None
        if self.redis_url is None and len(nodes) > 1 and cfg.redis.host in ("127.0.0.1", "localhost", "::1"):
            raise ClusterConfigError(
                "redis.host: the cluster has several nodes but the spawned Redis would listen on loopback only; "
                "pass --redis-url of a Redis every node reaches, or set redis.host to 0.0.0.0 or this node's address"
            )

    def start_redis(self, wait: bool = True) -> None:
        """Spawn the run's private Redis unless a URL was given; with ``wait``, check every Redis answers."""
        from apexq.core.connection import check

        if self.redis_url is None and self.redis_server is None:
            from .redis_server import RedisServer, find_server

            binary = find_server(self.cfg.redis.server_path)
            self.redis_server = RedisServer(
                binary, appendfsync=self.cfg.redis.appendfsync, host=self.cfg.redis.host
            ).spawn()
        if not wait:
            return
        if self.redis_url is None:
            from .metrics import node_address

            assert self.redis_server is not None  # spawned above
            self.redis_server.wait_ready()
            self.redis_url = self.redis_server.url_for(node_address(self.cfg.redis.host))
        check(self.redis_url)
        for url in self.cfg.replay.redis_urls:
            check(url)

    # -- Redis supervision -------------------------------------------------------------------

    def watch_redis(self, now: float, note_restart: Callable[[str], int]) -> None:
        """Restart the run's own Redis when its process died; stop the run when Redis stays unreachable.

        The spawned server comes back on the same port and password from its append-only file
        (``redis.appendfsync``); every component reconnects with backoff, so training goes on.
        A Redis given by URL is someone else's to restart: the run waits for it up to
        ``redis.unreachable_timeout_s``, then stops (final checkpoint, exit status 1).
        ``note_restart`` counts the restart toward ``supervision.max_restarts`` and returns its number.
        """
        srv = self.redis_server
        if srv is not None and srv.proc is not None and srv.exited() is not None and now >= self._next_redis_ping:
            code = srv.exited()
            number = note_restart(f"exited with status {code}")
            print(
                f"apexq: Redis (the run's own, port {srv.port}) exited with status {code}; restarting it "
                f"from its append-only file (#{number})",
                file=self.out,
                flush=True,
            )
            t = time.monotonic()
            try:
                srv.restart()
                print(
                    f"apexq: Redis is back after {time.monotonic() - t:.1f}s; components reconnect",
                    file=self.out,
                    flush=True,
                )
            except RuntimeError as exc:
                log.warning("Redis restart failed: %s", exc)
                print(f"apexq: Redis restart failed ({exc}); trying again", file=self.out, flush=True)
        if now < self._next_redis_ping:
            return
        self._next_redis_ping = now + 1.0
        down = [url for url in self.redis_urls() if not self.ping(url)]
        if not down:
            if self.redis_down_since is not None:
                print(
                    f"apexq: Redis reachable again after {now - self.redis_down_since:.0f}s", file=self.out, flush=True
                )
            self.redis_down_since = None
            return
        from apexq.core.connection import redact

        limit = self.cfg.redis.unreachable_timeout_s
        if self.redis_down_since is None:
            self.redis_down_since = now
            print(
                f"apexq: Redis at {redact(down[0])} unreachable; waiting up to {limit:.0f}s "
                f"(redis.unreachable_timeout_s)",
                file=self.out,
                flush=True,
            )
        elif now - self.redis_down_since > limit:
            raise RedisUnreachable(
                f"Redis at {redact(down[0])} unreachable for {now - self.redis_down_since:.0f}s "
                f"(redis.unreachable_timeout_s={limit:g})"
            )

    def redis_urls(self) -> list[str]:
        own = [self.redis_url] if self.redis_url is not None else []
        return list(dict.fromkeys([*own, *self.cfg.replay.redis_urls]))

    def ping(self, url: str) -> bool:
        import redis

        from apexq.core.connection import probe

        client = self._redis_clients.get(url)
        if client is None:  # tried once: a dead Redis must not hold the driver's loop in redis-py's retries
            client = self._redis_clients[url] = probe(url, 1.0)
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False

    def redis_down(self) -> bool:
        """Whether a Redis of the run was found unreachable and still is."""
        return self.redis_down_since is not None and not all(self.ping(u) for u in self.redis_urls())

    def stop(self) -> None:
        import ray

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
