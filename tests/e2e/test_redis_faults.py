"""The run's Redis dies, as it would for a user: nobody but apexq itself is there to bring it back.

The runs are started exactly as a user starts them (``apexq train``, the embedded Redis or a
``--redis-url``); the test only kills processes of that run (found among the driver's own
descendants), never restarts anything itself.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from procs import descendants, pids_of

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")


def records(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    return [json.loads(l) for l in f.read_text().splitlines() if l.strip()] if f.exists() else []


def wait(pred, timeout: float, what: str, run: "Run | None" = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        if run is not None and run.proc.poll() is not None:
            raise AssertionError(
                f"the run exited ({run.proc.returncode}) while waiting for {what}: " + "\n".join(run.lines[-30:])
            )
        time.sleep(0.2)
    raise AssertionError(
        f"timed out after {timeout:.0f}s waiting for {what}"
        + (": " + "\n".join(run.lines[-30:]) if run is not None else "")
    )


class Run:
    """``apexq train`` in a subprocess, its output collected line by line."""

    def __init__(self, run_dir: "Path | None", *args: str, env: dict = ENV):
        cmd = [
            sys.executable,
            "-m",
            "apexq.cluster.cli",
            "train",
            *(["--run-dir", str(run_dir)] if run_dir else []),
            *args,
        ]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self.seen_at: list[float] = []  # time.monotonic() when each line was read
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self):
        for line in self.proc.stdout:
            self.seen_at.append(time.monotonic())
            self.lines.append(line.rstrip("\n"))

    def saw(self, text: str) -> bool:
        return any(text in l for l in self.lines)

    def finish(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._t.join(timeout=10)
        assert not self._t.is_alive()
        return rc


@pytest.mark.slow
def test_default_run_survives_its_redis_then_a_shard_then_an_actor_being_killed(tmp_path):
    run_dir = tmp_path / "run"
    run = Run(
        run_dir,
        "--set",
        "train.max_seconds=300",
        "--set",
        "train.progress_every_s=1",
        "--set",
        "eval.every_seconds=0",
        "--set",
        "metrics.port=0",
    )
    try:
        pid = run.proc.pid
        wait(lambda: any(r["updates"] > 0 for r in records(run_dir)), 150, "the first learner update", run)
        redis_pids = [p for p, cmd in descendants(pid).items() if "valkey-server" in cmd or "redis-server" in cmd]
        assert len(redis_pids) == 1, descendants(pid)
        at_kill = records(run_dir)[-1]
        os.kill(redis_pids[0], signal.SIGKILL)
        t_kill = time.monotonic()
        wait(lambda: run.saw("Redis is back"), 30, "the driver to restart its Redis", run)
        back_s = time.monotonic() - t_kill
        # training goes on: the learner and the actors both move past where they were at the kill
        wait(
            lambda: (
                records(run_dir)[-1]["updates"] > at_kill["updates"] + 200
                and records(run_dir)[-1]["env_steps"] > at_kill["env_steps"] + 20_000
            ),
            90,
            f"training to go on after the Redis restart (at the kill: {at_kill})",
            run,
        )
        assert back_s < 15, back_s

        shard = pids_of(pid, "ray::ShardService")
        assert len(shard) == 1
        os.kill(shard[0], signal.SIGKILL)
        wait(lambda: run.saw("shard 0 process died"), 30, "the shard's restart", run)
        actors = pids_of(pid, "ray::ActorService")
        assert len(actors) == 2
        at_actor_kill = records(run_dir)[-1]
        os.kill(actors[0], signal.SIGKILL)
        wait(lambda: run.saw("actor 0 process died") or run.saw("actor 1 process died"), 30, "the actor's restart", run)
        wait(
            lambda: (
                records(run_dir)[-1]["env_steps"] > at_actor_kill["env_steps"] + 20_000
                and records(run_dir)[-1]["updates"] > at_actor_kill["updates"] + 100
            ),
            90,
            "training to go on after the shard and actor restarts",
            run,
        )
        run.proc.send_signal(signal.SIGTERM)
        rc = run.finish(120)
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    out = "\n".join(run.lines)
    assert rc == 0, out[-3000:]
    recs = [r for r in records(run_dir) if not r.get("final")]
    # counters a user reads never go backwards, actor restart included
    for key in ("env_steps", "episodes", "transitions_inserted"):
        values = [r[key] for r in recs]
        assert values == sorted(values), (key, values)
    assert recs[-1]["restarts"] >= 3  # Redis, the shard and the actor
    acct = json.loads((run_dir / "accounting.json").read_text())
    assert acct["balanced"], acct
    # SIGKILL loses at most what the append-only file had not been given (everysec: about a second);
    # the actors' own acknowledged counts say how many that was
    rate = max(r.get("env_steps_per_s", 0) for r in recs)
    assert acct["lost_in_redis"] <= 2 * rate, (acct["lost_in_redis"], rate)
    assert "accounting: appended" in out and "-> balanced" in out


@pytest.mark.slow
def test_run_stops_with_an_error_when_its_redis_stays_unreachable(tmp_path):
    from apexq.cluster.redis_server import RedisServer, find_server

    server = RedisServer(find_server()).start()
    run_dir = tmp_path / "run"
    try:
        run = Run(
            run_dir,
            "--redis-url",
            server.url,
            "--set",
            "train.max_seconds=300",
            "--set",
            "train.progress_every_s=1",
            "--set",
            "eval.every_seconds=0",
            "--set",
            "metrics.port=0",
            "--set",
            "redis.unreachable_timeout_s=8",
        )
        wait(lambda: any(r["updates"] > 0 for r in records(run_dir)), 150, "the first learner update", run)
        server.kill()  # someone else's Redis: apexq must not (and cannot) restart it
        t = time.monotonic()
        rc = run.finish(150)
        exited = time.monotonic()
        took = exited - t
    finally:
        server.stop()
    out = "\n".join(run.lines)
    assert rc == 1, out[-3000:]
    errors = [l for l in run.lines if l.startswith("apexq: error:")]
    assert any("unreachable for" in l and "redis.unreachable_timeout_s=8" in l for l in errors), out[-3000:]
    assert not any(l.startswith("apexq: done") for l in run.lines), out[-2000:]
    assert "Traceback" not in out
    assert (run_dir / "checkpoint.pt").is_file()  # the final checkpoint does not need Redis
    assert took < 8 + 90, took
    # the stop after the error does not wait out retries against the dead Redis: actors that cannot
    # flush, a queue of stale weights sends (30.5 s from the error line to the exit with both, 11.5-15
    # s without: the final checkpoint and export are most of that; 23.9 s waiting for the actors only)
    at = next(i for i, l in enumerate(run.lines) if "unreachable for" in l)
    assert exited - run.seen_at[at] < 25, exited - run.seen_at[at]
    # the learner's queue: the send under way at the error and the final one may fail, no stale ones
    failed_sends = [l for l in run.lines[at:] if "publishing weights v" in l and "failed" in l]
    assert len(failed_sends) <= 2, failed_sends
