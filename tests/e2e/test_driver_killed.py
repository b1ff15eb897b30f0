"""SIGKILL of the driver alone: nothing the run started outlives it, and ``--resume`` goes on."""

import json
import time

import pytest
from procs import descendants, start_time
from test_redis_faults import Run, records, wait


@pytest.mark.slow
def test_sigkilled_driver_leaves_nothing_running_and_resume_continues(tmp_path):
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
        "--set",
        "learner.checkpoint_every_s=3",
    )
    try:
        wait(
            lambda: (run_dir / "checkpoint.pt").exists() and any(r["updates"] > 0 for r in records(run_dir)),
            150,
            "a first checkpoint",
            run,
        )
        time.sleep(1.0)  # let the reaper record the full tree once more (it looks every 0.5 s)
        started = {pid: start_time(pid) for pid in descendants(run.proc.pid)}
        kinds = " ".join(descendants(run.proc.pid).values())
        assert "raylet" in kinds and "ray::ActorService" in kinds and "ray::DashboardAgent" in kinds, kinds
        assert "valkey-server" in kinds or "redis-server" in kinds, kinds
        run.proc.kill()  # SIGKILL: no handler, no shutdown, no finally
        run.finish(30)

        def leftovers():
            return [p for p in started if start_time(p) is not None and start_time(p) == started[p]]

        deadline = time.monotonic() + 20
        while leftovers() and time.monotonic() < deadline:
            time.sleep(0.25)
        assert not leftovers(), leftovers()
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    from apexq.learner.checkpoint import load

    ckpt_updates = int(load(run_dir / "checkpoint.pt")["updates"])
    assert ckpt_updates > 0
    last_env_steps = max(r["env_steps"] for r in records(run_dir))
    resumed = Run(
        None,
        "--resume",
        str(run_dir),
        "--set",
        "train.max_seconds=1000000",
        "--set",
        "train.max_env_steps=" + str(last_env_steps + 100_000),
    )
    rc = resumed.finish(240)
    out = "\n".join(resumed.lines)
    assert rc == 0, out[-3000:]
    after = [r for r in records(run_dir) if r["time_s"] > 0]
    final = [r for r in after if r.get("final")][-1]
    assert final["updates"] >= ckpt_updates, (final["updates"], ckpt_updates)
    assert final["env_steps"] >= last_env_steps + 100_000 - 1
    acct = json.loads((run_dir / "accounting.json").read_text())
    assert acct["balanced"], acct
