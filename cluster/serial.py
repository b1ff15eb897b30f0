"""Single-process mode: the same components wired into one process, no Ray and no Redis.

For debugging (like sample-factory's serial mode or RLlib with zero env runners) and as the
baseline the distributed run is compared against: actors insert straight into the shard, the
learner trains whenever the rate limiter lets it, weights are shared by reference.
"""
from __future__ import annotations

import sys
import time
from typing import Optional

import numpy as np

from apexq.actors.actor import ApexActor
from apexq.actors.envs import env_spec
from apexq.learner.learner import Learner
from apexq.learner.network import build_network
from apexq.learner.prefetch import PrefetchSampler
from apexq.replay_server.shard import ReplayShard

from .components import actor_settings, learner_settings, shard_spec
from .config import Config
from .evaluate import evaluate
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


def train_serial(cfg: Config, run_dir: RunDir, out=sys.stdout, resume_state: Optional[dict] = None,
                 launch_time: Optional[float] = None) -> dict:
    t0 = time.monotonic()
    if launch_time is not None:  # count start-up (imports included) from the command's start, as train() does
        t0 -= time.time() - launch_time
    # a resumed run goes on counting seconds and env steps from its checkpoint
    saved = dict((resume_state or {}).get("extra") or {})
    time_off, steps_off = float(saved.get("time_s", 0.0)), int(saved.get("env_steps", 0))
    spec = env_spec(cfg.env.id)
    shards = [ReplayShard(shard_spec(cfg, k, spec), "", run_dir.run_id, cfg.seed * 1000 + k)
              for k in range(cfg.replay.shards)]
    for sh in shards:
        sh.epoch = 1
    # the learner's checkpoints and policy files reach the run directory as in a distributed run:
    # as bytes from its outbox, written here (see write_files)
    learner = Learner(learner_settings(cfg), spec, shards, None, run_dir.run_id, None, resume_state, cfg.to_dict())
    seen: list = ["", 0]

    def write_files() -> None:
        if tuple(learner.outbox.mark()) != tuple(seen):
            token, version, files = learner.artifacts(*seen)
            run_dir.write_files(files)  # RunDirError when the disk is full
            seen[:] = [token, version]

    actors = [ApexActor(actor_settings(cfg, i), None, run_dir.run_id, spec,
                        writer=DirectWriter(shards[i % cfg.replay.shards]), weights=DirectWeights(learner))
              for i in range(cfg.actors.num)]
    for a in actors:
        a._load(*a.weights.poll())
        a.reset()
    sampler = PrefetchSampler(shards, cfg.learner.batch_size, 1, learner.device, learner.beta, rng=learner.sample_rng,
                              timeout=0.0)
    print(f"apexq: single-process run {run_dir.run_id} in {run_dir.path} | env {cfg.env.id} | "
          f"{cfg.actors.num} actors x {cfg.actors.envs_per_actor} envs | ready in {time.monotonic() - t0:.1f}s",
          file=out, flush=True)
    eval_time = 0.0
    eval_return = None
    solved_at = None
    stop_reason = "reached train.max_seconds"
    next_tick = time.monotonic() + cfg.train.progress_every_s
    next_eval = time.monotonic() + cfg.eval.every_seconds if cfg.eval.every_seconds > 0 else float("inf")
    prev = None
    try:
        while True:
            for a in actors:
                a.step()
            while True:
                got = sampler.sample_once()
                if got is None:
                    break
                batch = got[0]
                extra = learner.step(batch)
                learner.send_priorities(batch["keys"], batch["shard"], extra["td"])
                if learner.updates % cfg.learner.publish_every == 0:
                    learner.publish()
                if learner.updates % 10 == 0:
                    learner.metrics = {"loss": float(extra["loss"]), "td_abs": float(extra["td"].abs().mean()),
                                       "q_mean": float(extra["q_taken"].mean())}
            now = time.monotonic()
            elapsed = time_off + now - t0
            if now >= next_eval:
                t = time.monotonic()
                net = build_network(spec, cfg.learner.hidden_sizes, cfg.learner.dueling)
                net.load_state_dict(learner.online.state_dict())
                eval_return = float(np.mean(evaluate(net, cfg.env.id, cfg.eval.episodes, seed=cfg.seed)))
                if learner.best_policy is None or eval_return > learner.best_policy["eval_return"]:
                    learner.set_best_policy(learner.weights_version, eval_return, net.state_dict())
                eval_time += time.monotonic() - t
                next_eval = time.monotonic() + cfg.eval.every_seconds
                if cfg.train.stop_at_return is not None and eval_return >= cfg.train.stop_at_return:
                    solved_at = time_off + time.monotonic() - t0
                    stop_reason = f"eval return {eval_return:.1f} >= train.stop_at_return"
            env_steps = steps_off + sum(a.env_steps for a in actors)
            learner.checkpoint_if_due({"time_s": round(elapsed, 3), "env_steps": env_steps})
            write_files()
            if now >= next_tick or solved_at is not None:
                rets = [r for a in actors for r in a.returns]
                rec = {"time_s": round(elapsed, 3), "env_steps": env_steps, "updates": learner.updates,
                       "transitions_inserted": sum(s.counters["ingested"] for s in shards),
                       "transitions_sampled": sampler.sampled, "replay_size": sum(s.size for s in shards),
                       "weights_version": learner.weights_version,
                       "actor_weights_versions": [a.weights.version for a in actors],
                       "mean_return": float(np.mean(rets)) if rets else None, "eval_return": eval_return,
                       "eval_time_s": round(eval_time, 3), "loss": learner.metrics.get("loss"),
                       "td_abs": learner.metrics.get("td_abs"), "q_mean": learner.metrics.get("q_mean")}
                if prev:
                    dt = max(1e-6, rec["time_s"] - prev["time_s"])
                    rec["env_steps_per_s"] = round((rec["env_steps"] - prev["env_steps"]) / dt, 1)
                    rec["updates_per_s"] = round((rec["updates"] - prev["updates"]) / dt, 2)
                run_dir.append_metrics(rec)
                ev = f"{eval_return:.1f}" if eval_return is not None else "-"
                ret = f"{rec['mean_return']:.1f}" if rec["mean_return"] is not None else "-"
                print(f"[{elapsed:6.0f}s] env steps {env_steps} | updates {learner.updates} | return {ret} | "
                      f"eval {ev} | replay {rec['replay_size']}", file=out, flush=True)
                prev = rec
                next_tick = now + cfg.train.progress_every_s
            if solved_at is not None:
                break
            if cfg.train.max_env_steps is not None and env_steps >= cfg.train.max_env_steps:
                stop_reason = "reached train.max_env_steps"
                break
            if cfg.train.max_seconds is not None and elapsed >= cfg.train.max_seconds:
                break
    except KeyboardInterrupt:
        stop_reason = "interrupted"
    except RunDirError as exc:
        stop_reason = f"run directory failed: {exc}"
        print(f"apexq: error: {exc}; stopping. The last complete checkpoint is kept: free space, then "
              f"apexq train --resume {run_dir.path}", file=out, flush=True)
    learner.save_checkpoint({"time_s": round(time_off + time.monotonic() - t0, 3),
                             "env_steps": steps_off + sum(a.env_steps for a in actors)})
    try:
        write_files()
        path: Optional[str] = str(run_dir.checkpoint)
    except RunDirError as exc:
        path = None
        print(f"apexq: final checkpoint failed: {exc}", file=out, flush=True)
    best = learner.best_policy or {}
    return {"stop_reason": stop_reason, "solved_at_s": solved_at, "checkpoint": path,
            "eval_time_s": eval_time, "record": prev or {}, "best_eval_return": best.get("eval_return"),
            "best_weights_version": best.get("weights_version")}
