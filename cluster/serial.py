"""Single-process mode: the run's components in this process, no Ray and no Redis.

For debugging (like sample-factory's serial mode or RLlib with zero env runners) and as the
baseline the distributed run is compared against: actors insert straight into the shards, the
learner trains whenever the rate limiter lets it, weights are shared by reference. The loop is
the distributed run's (:class:`.driver.Driver`); only the components differ.
"""

from __future__ import annotations

import sys
from typing import Optional

from apexq.actors.actor import ApexActor
from apexq.actors.envs import env_spec
from apexq.learner.learner import Learner
from apexq.replay_server.shard import ReplayShard

from .components import actor_settings, learner_settings, shard_spec
from .config import Config
from .driver import CARRIED, Driver, Snapshot, stop_on_signals
from .run_dir import RunDir, RunDirError


class DirectWriter:
    """Stands in for the Redis stream writer: blocks go straight into a shard."""

    def __init__(self, shard: ReplayShard):
        self.shard = shard
        self.blocks = self.transitions = self.backpressure_waits = 0

    def append(self, block, stop=lambda: False) -> None:
        self.shard.insert(block)
        self.blocks += 1
        self.transitions += len(block)


class DirectWeights:
    """Stands in for the weights client: reads the learner's network in the same process."""

    def __init__(self, learner: Learner):
        self.learner = learner
        self.version = -1
        self.latest_seen = -1

    def poll(self):
        v = self.learner.weights_version
        self.latest_seen = v
        if v > self.version:
            return v, self.learner.online.state_dict()
        return None

    def wait_first(self, timeout: float):
        return self.poll()

    @property
    def lag(self) -> int:
        return max(0, self.latest_seen - self.version)

    def close(self) -> None:
        pass


class LocalBackend:
    """Shards, learner and actors as plain objects; one :meth:`poll` steps every actor once and
    trains on what the rate limiter then allows."""

    def __init__(self, cfg: Config, run_dir: RunDir, spec: dict, resume_state: Optional[dict] = None):
        self.cfg, self.run_dir = cfg, run_dir
        self.shards = [
            ReplayShard(shard_spec(cfg, k, spec), "", run_dir.run_id, cfg.seed * 1000 + k).open_local()
            for k in range(cfg.replay.shards)
        ]
        # the learner's checkpoints and policy files reach the run directory as in a distributed
        # run: as bytes from its outbox (sync_files)
        self.learner = Learner(
            learner_settings(cfg), spec, self.shards, None, run_dir.run_id, None, resume_state, cfg.to_dict()
        )
        self.actors = [
            ApexActor(
                actor_settings(cfg, i),
                None,
                run_dir.run_id,
                spec,
                writer=DirectWriter(self.shards[i % cfg.replay.shards]),
                weights=DirectWeights(self.learner),
            )
            for i in range(cfg.actors.num)
        ]
        for a in self.actors:
            a.begin()
        self.files_seen: tuple = ("", 0)

    def poll(self) -> None:
        for a in self.actors:
            a.step()
        self.learner.train_ready()

    def snapshot(self) -> Snapshot:
        actors, shards = [a.stats() for a in self.actors], [s.stats() for s in self.shards]
        totals = {
            "env_steps": sum(s["env_steps"] for s in actors),
            "episodes": sum(s["episodes"] for s in actors),
            "inserted": sum(s["inserted"] for s in shards),
            "rejected_total": sum(s["rejected_total"] for s in shards),
        }
        return Snapshot(actors, shards, self.learner.stats(), totals)

    def weights_reachable(self) -> bool:
        return True

    def latest_weights(self) -> Optional[tuple[int, dict]]:
        state = {k: v.detach().cpu().numpy() for k, v in self.learner.online.state_dict().items()}
        return self.learner.weights_version, state

    def give_best_policy(self, version: int, eval_return: float, state: dict, wait: bool = False) -> None:
        self.learner.set_best_policy(version, eval_return, state)

    def sync_files(self, force: bool = False) -> bool:
        if force or tuple(self.learner.outbox.mark()) != self.files_seen:
            token, version, files = self.learner.artifacts(*self.files_seen)
            self.run_dir.write_files(files)  # RunDirError when the disk is full
            self.files_seen = (token, version)
        return True

    def set_extra(self, extra: dict) -> None:
        self.learner.set_extra(extra)

    def finish(self, driver: Driver) -> dict:
        for a in self.actors:
            a.flush()
        rec = driver.record(self.snapshot(), driver.last_record)
        extra = {k: rec[k] for k in CARRIED}
        self.learner.finish()
        self.learner.save_checkpoint(extra)
        summary: dict = {}
        try:
            self.sync_files(force=True)
            summary["checkpoint"] = str(self.run_dir.checkpoint)
        except RunDirError as exc:
            print(f"apexq: final checkpoint failed: {exc}", file=driver.out, flush=True)
        try:
            self.run_dir.write_state(extra)
            self.run_dir.append_metrics({**rec, "final": True})
        except RunDirError as exc:
            print(f"apexq: could not write the final record: {exc}", file=driver.out, flush=True)
        summary["record"] = rec
        return summary


def train_serial(
    cfg: Config,
    run_dir: RunDir,
    out=sys.stdout,
    resume_state: Optional[dict] = None,
    launch_time: Optional[float] = None,
) -> dict:
    """Train in this process; the summary ``apexq train`` prints (as :func:`.launch.train`'s)."""
    spec = env_spec(cfg.env.id)
    driver = Driver(cfg, run_dir, spec, out, launch_time, resume=resume_state is not None)
    running: list = [None]
    stop_on_signals(lambda: running[0])
    backend = LocalBackend(cfg, run_dir, spec, resume_state)
    print(
        f"apexq: single-process run {run_dir.run_id} in {run_dir.path} | env {cfg.env.id} | "
        f"{cfg.actors.num} actors x {cfg.actors.envs_per_actor} envs | {cfg.replay.shards} shard(s) | "
        f"ready in {driver.elapsed():.1f}s",
        file=out,
        flush=True,
    )
    summary: dict = {}
    try:
        running[0] = driver.interrupt
        driver.loop(backend)
    except KeyboardInterrupt:
        driver.stop_reason = "interrupted"
        print("apexq: stopping (interrupt received)...", file=out, flush=True)
    except RunDirError as exc:
        driver.stop_reason = f"run directory failed: {exc}"
        print(
            f"apexq: error: {exc}; stopping. The last complete checkpoint is kept: free space, then "
            f"apexq train --resume {run_dir.path}",
            file=out,
            flush=True,
        )
    finally:
        running[0] = None
        summary = backend.finish(driver)
    summary.update(driver.summary())
    return summary
