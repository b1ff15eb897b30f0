"""Supervision of a real run, as the README promises it, in one ``apexq train`` (start-up is the cost).

1. The learner process is SIGKILLed after a checkpoint: Ray restarts it, it continues from the
   checkpoint, and the weights it publishes are newer than any the actors hold (the version in
   Redis never goes back below what it was at the kill), so the actors take them.
2. An actor process is SIGSTOPped (alive, answering nothing): after
   ``supervision.heartbeat_timeout_s`` the driver says it is hung, kills it, and the run goes on.
3. Two actor processes are SIGKILLed: with those, the run has had more than
   ``supervision.max_restarts`` restarts within ``supervision.window_s``, so it gives up: one
   error line, exit status 1.
The run's Redis is the test's own (``--redis-url``), so the test reads the published version there.
"""

import os
import signal
import threading
import time

import pytest
import redis
from test_redis_faults import Run, pids_of, records, wait

from apexq.core.weights_store import WeightsKeys

NAMESPACE = "supervised"


def gone(pid: int) -> bool:
    """The process exited (a zombie counts: it runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


class VersionWatch(threading.Thread):
    """Reads the published weights version every 10 ms; keeps every value it saw."""

    def __init__(self, client: redis.Redis, key: str):
        super().__init__(daemon=True)
        self.client, self.key, self.seen = client, key, []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            v = self.client.get(self.key)
            if v is not None:
                self.seen.append(int(v))
            time.sleep(0.01)


@pytest.mark.slow
def test_learner_restart_hung_actor_and_giving_up(tmp_path, redis_server):
    from apexq.learner.checkpoint import load

    run_dir = tmp_path / "run"
    admin = redis.Redis.from_url(redis_server.admin_url)
    version_key = WeightsKeys(NAMESPACE).version
    run = Run(
        run_dir,
        "--redis-url",
        redis_server.url,
        "--set",
        f"replay.namespace={NAMESPACE}",
        "--set",
        "train.max_seconds=600",
        "--set",
        "train.progress_every_s=1",
        "--set",
        "eval.every_seconds=0",
        "--set",
        "metrics.port=0",
        "--set",
        "replay.min_size_to_sample=500",
        "--set",
        "learner.checkpoint_every_s=4",
        "--set",
        "supervision.heartbeat_timeout_s=8",
        "--set",
        "supervision.max_restarts=3",
        "--set",
        "supervision.window_s=600",
    )
    stopped = []
    t_start = time.monotonic()
    try:
        pid = run.proc.pid
        # -- 1. the learner, killed after a checkpoint --------------------------------------------
        wait(
            lambda: (
                (run_dir / "checkpoint.pt").exists()
                and records(run_dir)
                and min(records(run_dir)[-1]["actor_weights_versions"]) > 0
            ),
            150,
            "a checkpoint and actors on weights",
            run,
        )
        seen_ckpt = int(load(run_dir / "checkpoint.pt")["weights_version"])
        # published versions run ahead of the checkpoint's: the restarted learner must not go back to it
        wait(
            lambda: int(admin.get(version_key) or 0) >= seen_ckpt + 5, 60, "weights published after the checkpoint", run
        )
        learner = pids_of(pid, "ray::LearnerService")
        assert len(learner) == 1, learner
        os.kill(learner[0], signal.SIGKILL)
        wait(lambda: gone(learner[0]), 10, "the learner process to exit")
        at_kill = int(admin.get(version_key))
        ckpt = load(run_dir / "checkpoint.pt")  # what the restarted learner continues from
        assert int(ckpt["weights_version"]) < at_kill, (int(ckpt["weights_version"]), at_kill)
        held = max(max(r["actor_weights_versions"]) for r in records(run_dir))
        assert held <= at_kill
        watch = VersionWatch(redis.Redis.from_url(redis_server.admin_url), version_key)
        watch.start()
        t_kill = time.monotonic()
        wait(lambda: run.saw("learner 0 process died"), 30, "the driver to see the learner die", run)
        n = len(records(run_dir))
        after = wait(
            lambda: next((r for r in records(run_dir)[n:] if min(r["actor_weights_versions"]) > at_kill), None),
            90,
            f"every actor on weights newer than v{at_kill} (the version at the kill)",
            run,
        )
        picked_up_s = time.monotonic() - t_kill
        watch.stop.set()
        watch.join()
        changes = [v for i, v in enumerate(watch.seen) if i == 0 or v != watch.seen[i - 1]]
        assert min(changes) >= at_kill, f"published versions after the kill at v{at_kill} went back: {changes[:20]}"
        assert after["weights_version"] > at_kill and after["updates"] >= int(ckpt["updates"]), after

        # -- 2. an actor that hangs ---------------------------------------------------------------
        actors = pids_of(pid, "ray::ActorService")
        assert len(actors) == 2, actors
        os.kill(actors[0], signal.SIGSTOP)
        stopped.append(actors[0])
        t_stop = time.monotonic()
        wait(lambda: run.saw(" hung (no heartbeat for "), 60, "the driver to call the actor hung", run)
        hung_s = time.monotonic() - t_stop
        hung = next(l for l in run.lines if " hung (no heartbeat for " in l)
        assert hung.startswith("apexq: actor "), hung
        which = hung.split()[2]
        wait(lambda: run.saw(f"actor {which} process died"), 30, "the hung actor's restart", run)
        wait(lambda: gone(actors[0]), 30, "the hung process to be killed")
        at_restart = records(run_dir)[-1]
        wait(
            lambda: (
                len(pids_of(pid, "ray::ActorService")) == 2
                and records(run_dir)[-1]["env_steps"] > at_restart["env_steps"] + 20_000
            ),
            90,
            "a new actor process and env steps growing after the restart",
            run,
        )

        # -- 3. two more restarts: over supervision.max_restarts ----------------------------------
        # the learner and the hung actor, once each (a run resubmitted while Ray was still restarting
        # the process failed again and counted a second restart)
        assert records(run_dir)[-1]["restarts"] == 2, "\n".join(l for l in run.lines if l.startswith("apexq:"))
        # the shard and the actor that did not hang (a death of a component just restarted may be
        # taken for its last one: see Supervisor.same_death)
        survivor = actors[1]  # the actor process that was not stopped
        shard = pids_of(pid, "ray::ShardService")
        assert survivor in pids_of(pid, "ray::ActorService") and len(shard) == 1, shard
        os.kill(shard[0], signal.SIGKILL)
        os.kill(survivor, signal.SIGKILL)
        t_gave_up = time.monotonic()
        try:
            wait(lambda: run.proc.poll() is not None, 120, "the run to give up and exit")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: " + "\n".join(run.lines[-40:])) from None
        rc = run.finish(10)
        exit_s = time.monotonic() - t_gave_up
    finally:
        for p in stopped:
            if not gone(p):
                os.kill(p, signal.SIGCONT)
        if run.proc.poll() is None:
            run.proc.kill()
        admin.close()
    out = "\n".join(run.lines)
    assert rc == 1, out[-3000:]
    errors = [l for l in run.lines if l.startswith("apexq: error:")]
    assert len(errors) == 1 and "4 component restarts within 600s (supervision.max_restarts=3)" in errors[0], out[
        -3000:
    ]
    assert any(l.startswith("apexq: stopped (gave up: ") for l in run.lines), out[-2000:]
    assert "Traceback" not in out
    print(
        f"actors on newer weights {picked_up_s:.1f}s after the learner kill "
        f"(v{at_kill} -> v{after['weights_version']}); "
        f"hung actor named {hung_s:.1f}s after SIGSTOP; exit {exit_s:.1f}s after the last kills; "
        f"whole run {time.monotonic() - t_start:.0f}s"
    )
