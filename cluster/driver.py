"""The training run's driver loop, written once: evaluation, stopping, records and progress.

It runs over a :class:`Backend`, the components of one run: in this process
(``--single-process``, :mod:`.serial`) or on Ray (:mod:`.launch`). The backend steps or
supervises its components; the driver decides when to evaluate, when to stop and what each
record says, so both modes write the same ``metrics.jsonl`` records and the same progress line.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional, Protocol, TextIO

import numpy as np

from .config import Config
from .run_dir import RunDir

# what a checkpoint's "extra" and state.json carry: the counters a resumed run continues from
CARRIED = ("time_s", "env_steps", "episodes", "transitions_inserted", "transitions_sampled")


@dataclass
class Snapshot:
    """What the components reported at one tick.

    ``totals`` are counters summed over every process a component has had (a component Ray
    restarted begins its own counters at 0; the backend carries the old ones forward).
    """

    actors: list[dict]
    shards: list[dict]
    learner: dict
    totals: dict = field(default_factory=dict)  # env_steps, episodes, inserted, rejected_total
    restarts: int = 0


class Backend(Protocol):
    """The components of one run, as the driver loop uses them."""

    def poll(self) -> None:
        """One pass of the backend's own work: step in-process components, or supervise Ray ones."""

    def snapshot(self) -> Snapshot:
        """Every component's latest stats (and, for a backend that supervises, its heartbeat check)."""

    def weights_reachable(self) -> bool:
        """Whether :meth:`latest_weights` can answer now (the weights live in a Redis that may be down)."""

    def latest_weights(self) -> Optional[tuple[int, dict]]:
        """(version, numpy state dict) of the learner's latest published weights, for evaluation."""

    def give_best_policy(self, version: int, eval_return: float, state: dict, wait: bool = False) -> None:
        """Hand the best evaluated weights to the learner: its policy files are exported from them."""

    def sync_files(self, force: bool = False) -> bool:
        """Write the learner's new checkpoint and policy files into the run directory (RunDirError if full)."""

    def set_extra(self, extra: dict) -> None:
        """The run's counters, stored with the learner's next checkpoint."""

    def finish(self, driver: Driver) -> dict:
        """Stop every component, take the final checkpoint and write the final record; the summary."""


class Driver:
    """The loop: evaluate every ``eval.every_seconds``, record every ``train.progress_every_s``, stop."""

    def __init__(
        self,
        cfg: Config,
        run_dir: RunDir,
        spec: dict,
        out: TextIO = sys.stdout,
        launch_time: Optional[float] = None,
        resume: bool = False,
    ):
        self.cfg, self.run_dir, self.spec, self.out = cfg, run_dir, spec, out
        self.t0 = time.monotonic()
        self.launch_wall = time.time()
        if launch_time is not None:  # count start-up (imports included) from the command's start
            self.launch_wall = launch_time
            self.t0 -= time.time() - launch_time
        # a resumed run goes on counting from its last record
        state = (run_dir.read_state() if resume else None) or {}
        self.offset: dict = {k: state.get(k, 0) for k in CARRIED}
        self.eval_return: Optional[float] = None
        self.confirm_return: Optional[float] = None  # the latest confirming evaluation's mean
        self.eval_wall: Optional[float] = None  # Unix time of the latest finished evaluation
        self.eval_time = 0.0  # seconds spent evaluating (excluded from time to solve)
        self.solved_at: Optional[float] = None
        self.stop_reason = "finished"
        # (eval return, weights version, numpy state or None when the learner already holds it)
        self.best: Optional[tuple] = None
        self.first_env_step_s: Optional[float] = None
        self.first_update_s: Optional[float] = None
        self.last_record: Optional[dict] = None
        self.learner_stats: dict = {}  # the learner's stats at the latest tick
        self.interrupt = threading.Event()  # set by SIGINT/SIGTERM while the loop runs

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def run_time(self) -> float:
        """Seconds of training so far, a resumed run's earlier parts included."""
        return self.offset["time_s"] + self.elapsed()

    # -- the loop ----------------------------------------------------------------------------

    def loop(self, backend: Backend) -> None:
        cfg = self.cfg
        prev = self.last_record
        next_tick = time.monotonic() + min(cfg.train.progress_every_s, 2.0)
        next_eval = time.monotonic() + cfg.eval.every_seconds if cfg.eval.every_seconds > 0 else float("inf")
        while True:
            if self.interrupt.is_set():
                raise KeyboardInterrupt  # from a known place: see stop_on_signals
            backend.poll()
            now = time.monotonic()
            if now >= next_eval and not backend.weights_reachable():
                next_eval = now + 1.0  # the weights live in Redis: evaluate once it is back
            if now >= next_eval:
                self.evaluate(backend)
                next_eval = time.monotonic() + cfg.eval.every_seconds
            if now >= next_tick or self.solved_at is not None:
                rec = self.tick(backend, prev)
                prev = rec
                next_tick = now + cfg.train.progress_every_s
                if cfg.train.max_env_steps is not None and rec["env_steps"] >= cfg.train.max_env_steps:
                    self.stop_reason = "reached train.max_env_steps"
                    return
            if self.solved_at is not None:
                return
            if cfg.train.max_seconds is not None and self.run_time() >= cfg.train.max_seconds:
                self.stop_reason = "reached train.max_seconds"
                return

    def tick(self, backend: Backend, prev: Optional[dict]) -> dict:
        snap = backend.snapshot()
        self.learner_stats = snap.learner
        self.adopt_best(snap.learner)
        backend.sync_files()  # raises RunDirError when the disk is full
        rec = self.record(snap, prev)
        self.run_dir.append_metrics(rec)
        print(progress_line(rec), file=self.out, flush=True)
        extra = {k: rec[k] for k in CARRIED}
        backend.set_extra(extra)
        self.run_dir.write_state(extra)
        self.last_record = rec
        return rec

    # -- evaluation and the best policy ------------------------------------------------------

    def evaluate(self, backend: Backend) -> Optional[float]:
        """Greedy episodes of the latest weights (``eval.episodes``, seeded); keeps the best.

        With ``train.stop_at_return`` set, an evaluation that reaches it is confirmed before the run
        stops: the same weights play ``eval.confirm_episodes`` other episodes, and the run is solved
        only if those reach it too. Every evaluation of a run plays the same starts, so the first
        weights to pass them are partly chosen by luck on those starts; the confirming episodes are
        fresh to them. The solving weights become the run's policy.
        """
        from apexq.actors.policy import NumpyQPolicy

        from .evaluate import CONFIRM_FIRST_EPISODE, evaluate

        cfg = self.cfg
        target, confirm = cfg.train.stop_at_return, None
        t = time.monotonic()
        try:
            got = backend.latest_weights()
            if got is None:
                return None
            policy = NumpyQPolicy(self.spec, cfg.learner.hidden_sizes, cfg.learner.dueling)
            policy.load_state(got[1])
            value = float(np.mean(evaluate(policy, cfg.env.id, cfg.eval.episodes, seed=cfg.seed)))
            m = cfg.eval.episodes if cfg.eval.confirm_episodes is None else cfg.eval.confirm_episodes
            if target is not None and value >= target and m > 0:
                confirm = float(
                    np.mean(evaluate(policy, cfg.env.id, m, seed=cfg.seed, first_episode=CONFIRM_FIRST_EPISODE))
                )
        finally:
            self.eval_time += time.monotonic() - t
        self.eval_return, self.eval_wall = value, time.time()
        solved = target is not None and value >= target and (confirm is None or confirm >= target)
        # a confirmed version is judged on all the episodes it played
        score = value
        if confirm is not None:
            self.confirm_return = confirm
            n = cfg.eval.episodes
            score = (value * n + confirm * m) / (n + m)
            verdict = "confirmed" if solved else "not confirmed"
            print(
                f"apexq: evaluation {value:.1f} reached train.stop_at_return {target:g}; {m} other episodes: "
                f"{confirm:.1f} ({verdict})",
                file=self.out,
                flush=True,
            )
        self.adopt_best(self.learner_stats)
        if solved or self.best is None or score > self.best[0]:
            self.best = (score, int(got[0]), got[1])
        self.give_best_policy(backend)
        if solved:
            self.solved_at = self.run_time()
            self.stop_reason = f"eval return {value:.1f} >= train.stop_at_return"
            if confirm is not None:
                self.stop_reason += f", confirmed on {m} other episodes ({confirm:.1f})"
        return value

    def adopt_best(self, learner_stats: dict) -> None:
        """A resumed run's best evaluation so far is the one in its checkpoint, which the learner read."""
        if self.best is None and learner_stats.get("best_eval_return") is not None:
            self.best = (float(learner_stats["best_eval_return"]), int(learner_stats["best_weights_version"]), None)

    def give_best_policy(self, backend: Backend, wait: bool = False) -> None:
        """Hand the best evaluated weights to the learner (again after a restart lost them)."""
        if self.best is None or self.best[2] is None:
            return
        if not wait and self.learner_stats.get("best_weights_version") == self.best[1]:
            return
        backend.give_best_policy(self.best[1], self.best[0], self.best[2], wait=wait)

    # -- records -----------------------------------------------------------------------------

    def record(self, snap: Snapshot, prev: Optional[dict]) -> dict:
        """One ``metrics.jsonl`` record (see the README's table of record fields)."""
        a, sh, ls, tot = snap.actors, snap.shards, snap.learner, snap.totals
        rets = [r for s in a for r in s.get("returns", [])]
        off = self.offset
        rec = {
            "time_s": round(self.run_time(), 3),
            "env_steps": int(off["env_steps"] + tot.get("env_steps", 0)),
            "episodes": int(off["episodes"] + tot.get("episodes", 0)),
            "updates": int(ls.get("updates", 0)),
            "transitions_inserted": int(off["transitions_inserted"] + tot.get("inserted", 0)),
            "transitions_sampled": int(off["transitions_sampled"] + ls.get("transitions_sampled", 0)),
            "replay_size": int(sum(s.get("size", 0) for s in sh)),
            "rejected": int(tot.get("rejected_total", 0)),
            "weights_version": int(ls.get("weights_version", 0)),
            "actor_weights_versions": [s.get("weights_version", -1) for s in a],
            "mean_return": float(np.mean(rets)) if rets else None,
            "eval_return": self.eval_return,
            "confirm_return": self.confirm_return,
            "solved": self.solved_at is not None,
            "eval_time_s": round(self.eval_time, 3),
            "loss": ls.get("loss"),
            "td_abs": ls.get("td_abs"),
            "q_mean": ls.get("q_mean"),
            "restarts": snap.restarts,
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
            print(
                f"apexq: first learner update {self.first_update_s:.1f}s after launch ({on})", file=self.out, flush=True
            )
        rec["first_update_s"] = self.first_update_s
        if prev is not None:
            dt = max(1e-6, rec["time_s"] - prev["time_s"])
            rec["env_steps_per_s"] = round((rec["env_steps"] - prev["env_steps"]) / dt, 1)
            rec["updates_per_s"] = round((rec["updates"] - prev["updates"]) / dt, 2)
        return rec

    def summary(self) -> dict:
        out = {"stop_reason": self.stop_reason, "solved_at_s": self.solved_at, "eval_time_s": self.eval_time}
        if self.best is not None:
            out["best_eval_return"], out["best_weights_version"] = self.best[0], self.best[1]
        return out


def progress_line(r: dict) -> str:
    def k(x):
        return f"{x / 1e6:.2f}M" if x >= 1e6 else (f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}")

    ret = f"{r['mean_return']:.1f}" if r["mean_return"] is not None else "-"
    ev = f"{r['eval_return']:.1f}" if r["eval_return"] is not None else "-"
    return (
        f"[{r['time_s']:6.0f}s] env steps {k(r['env_steps'])} ({k(r.get('env_steps_per_s', 0))}/s) | "
        f"updates {k(r['updates'])} ({r.get('updates_per_s', 0):.0f}/s) | return {ret} | eval {ev} | "
        f"replay {k(r['replay_size'])} | weights v{r['weights_version']}"
    )


def stop_on_signals(interrupt: Callable[[], Optional[threading.Event]]) -> None:
    """SIGINT and SIGTERM stop the run gracefully.

    ``interrupt`` returns the running driver's flag (None before its loop runs). While the loop
    runs, the first signal only sets that flag, which the loop turns into the graceful stop at
    its next pass: an exception raised at an arbitrary point, e.g. inside a Ray call, could leave
    a lock held and hang the shutdown. Before the loop (start-up), and for a second signal, they
    interrupt at once (KeyboardInterrupt).
    """

    def handler(signum, frame):
        flag = interrupt()
        if flag is not None and not flag.is_set():
            flag.set()
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
