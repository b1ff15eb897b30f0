"""The composition root of a distributed run: platform, components, supervision, the driver loop, shutdown.

Each part is a module of its own: :mod:`.startup` (Ray and Redis), :mod:`.ray_components`
(creating the Ray actors), :mod:`.supervision` (restarts, heartbeats), :mod:`.reporting` (the
metrics endpoint), :mod:`.shutdown` (stopping in order, accounting) and :mod:`.driver` (the
loop, shared with the single-process mode). :class:`RayBackend` composes them.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional, TextIO

from .config import Config
from .driver import Driver, Snapshot, stop_on_signals
from .ray_components import Members, create_components, namespace, record_placement
from .reporting import MetricsService
from .run_dir import RunDir, RunDirError
from .shutdown import shutdown_components
from .startup import ClusterConfigError, Platform, RedisUnreachable, set_ray_env
from .supervision import Supervisor, SupervisorGaveUp

__all__ = ["train", "RayBackend", "ClusterConfigError", "set_ray_env"]

log = logging.getLogger("apexq")


class RayBackend:
    """The run's components on Ray, as the driver loop uses them (see :class:`.driver.Backend`)."""

    def __init__(
        self,
        cfg: Config,
        run_dir: RunDir,
        address: Optional[str],
        redis_url: Optional[str],
        resume: bool,
        out: TextIO,
        on_signals,
    ):
        self.cfg, self.run_dir, self.resume, self.out = cfg, run_dir, resume, out
        self.platform = Platform(cfg, address, redis_url, out, on_signals)
        self.namespace = namespace(cfg, run_dir)
        self.members: Optional[Members] = None
        self.supervisor: Optional[Supervisor] = None
        self.metrics: Optional[MetricsService] = None
        self.files_seen: tuple = ("", 0)  # (learner process, version) of the files in the run directory

    def start(self, driver: Driver) -> None:
        cfg = self.cfg
        self.platform.start()
        print(
            f"apexq: run {self.run_dir.run_id} in {self.run_dir.path} | env {cfg.env.id} | "
            f"{cfg.actors.num} actors x {cfg.actors.envs_per_actor} envs | {cfg.replay.shards} shard(s) | "
            f"platform ready in {driver.elapsed():.1f}s",
            file=self.out,
            flush=True,
        )
        self.members = create_components(
            cfg, self.run_dir, self.platform, self.checkpoint_bytes() if self.resume else None, self.out
        )
        self.metrics = MetricsService(cfg, self.run_dir, lambda: self.driver_stats(driver), self.out)
        self.supervisor = Supervisor(cfg, self.members, self.out, self.checkpoint_bytes, self.metrics.register)
        for m in self.members.supervised:
            self.metrics.register(m)
        record_placement(self.members, self.run_dir)

    @property
    def sup(self) -> Supervisor:
        assert self.supervisor is not None, "start() first"
        return self.supervisor

    @property
    def learner(self):
        """The learner's Member (after start())."""
        assert self.members is not None, "start() first"
        return self.members.learner

    def driver_stats(self, driver: Driver) -> dict:
        """What the driver's own metrics report (see cluster/metrics.py's table)."""
        # Unix time of the latest finished evaluation, the launch time before the first one (so an
        # alert can say "no evaluation for 30 min" from launch on); absent when evaluation is off
        eval_at = (driver.eval_wall or driver.launch_wall) if self.cfg.eval.every_seconds > 0 else None
        return {
            "eval_return": driver.eval_return,
            "time_to_solve_s": driver.solved_at,
            "restarts": self.sup.restarts_by_kind(),
            "env_steps": (driver.last_record or {}).get("env_steps", 0),
            "eval_last_time": eval_at,
        }

    # -- what the driver loop calls ----------------------------------------------------------

    def poll(self) -> None:
        time.sleep(0.1)
        self.sup.supervise()
        self.platform.watch_redis(time.monotonic(), self.sup.redis_restarted)

    def snapshot(self) -> Snapshot:
        self.sup.gather_stats()
        self.sup.check_heartbeats()
        return self.sup.snapshot()

    def weights_reachable(self) -> bool:
        return self.platform.redis_down_since is None

    def latest_weights(self) -> Optional[tuple[int, dict]]:
        from apexq.core import weights_store
        from apexq.core.connection import connect

        url = self.platform.redis_url
        assert url is not None
        try:
            client = connect(url)
            try:
                return weights_store.fetch_if_newer(
                    client, weights_store.WeightsKeys(self.namespace), -1, as_numpy=True
                )
            finally:
                client.close()
        except Exception as exc:
            log.warning("evaluation skipped: %s", exc)
            return None

    def give_best_policy(self, version: int, eval_return: float, state: dict, wait: bool = False) -> None:
        ref = self.learner.handle.set_best_policy.remote(version, eval_return, state)
        if wait:
            import ray

            try:
                ray.get(ref, timeout=10)
            except Exception as exc:
                log.warning("could not hand the best policy to the learner: %s", exc)

    def sync_files(self, force: bool = False) -> bool:
        """Write the learner's new checkpoint and policy files into the run directory.

        Asks only when the learner's stats show a version newer than the one written (or with
        ``force``); the learner answers with the files changed since. Raises RunDirError when
        they cannot be written (disk full). Returns whether the learner answered.
        """
        import ray

        learner = self.learner
        mark = learner.last_stats.get("artifacts")
        if not force and (not mark or tuple(mark) == self.files_seen):
            return True
        try:
            token, version, files = ray.get(learner.handle.artifacts.remote(*self.files_seen), timeout=10)
        except Exception as exc:
            log.warning("could not fetch the learner's files: %s", exc)
            return False
        self.run_dir.write_files(files)
        self.files_seen = (token, version)
        return True

    def set_extra(self, extra: dict) -> None:
        self.learner.handle.set_extra.remote(extra)

    def finish(self, driver: Driver) -> dict:
        return shutdown_components(self, driver)

    # -- the rest ----------------------------------------------------------------------------

    def checkpoint_bytes(self) -> Optional[bytes]:
        """The run's latest checkpoint, for a learner to continue from (None before the first one)."""
        try:
            return self.run_dir.checkpoint.read_bytes()
        except FileNotFoundError:
            return None

    def stop(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        self.platform.stop()


def train(
    cfg: Config,
    run_dir: RunDir,
    address=None,
    redis_url=None,
    resume=False,
    out=sys.stdout,
    launch_time: Optional[float] = None,
) -> dict:
    """A distributed run, start to end; the summary ``apexq train`` prints."""
    from apexq.actors.envs import env_spec

    driver = Driver(cfg, run_dir, env_spec(cfg.env.id), out, launch_time, resume)
    running: list = [None]  # the driver's interrupt flag while its loop runs (see stop_on_signals)

    def on_signals() -> None:
        stop_on_signals(lambda: running[0])

    backend = RayBackend(cfg, run_dir, address, redis_url, resume, out, on_signals)
    on_signals()
    summary: dict = {}
    try:
        try:
            backend.start(driver)
            running[0] = driver.interrupt
            driver.loop(backend)
        except KeyboardInterrupt:
            driver.stop_reason = "interrupted"
            print("apexq: stopping (interrupt received)...", file=out, flush=True)
        except SupervisorGaveUp as exc:
            driver.stop_reason = f"gave up: {exc}"
            print(f"apexq: error: {exc}", file=out, flush=True)
        except RedisUnreachable as exc:
            driver.stop_reason = f"Redis unreachable: {exc}"
            print(
                f"apexq: error: {exc}; stopping with a final checkpoint. Bring Redis back, then "
                f"apexq train --resume {run_dir.path}",
                file=out,
                flush=True,
            )
        except RunDirError as exc:
            driver.stop_reason = f"run directory failed: {exc}"
            print(
                f"apexq: error: {exc}; stopping. The last complete checkpoint is kept: free space, then "
                f"apexq train --resume {run_dir.path}",
                file=out,
                flush=True,
            )
        finally:
            try:
                summary = backend.finish(driver)
            except KeyboardInterrupt:
                pass
            finally:
                backend.stop()
    except KeyboardInterrupt:
        backend.stop()
    finally:
        running[0] = None
    summary.update(driver.summary())
    return summary
