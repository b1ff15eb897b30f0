"""`ray job submit --working-dir . -- apexq train --address auto` against a local `ray start --head`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


@pytest.mark.slow
def test_ray_job_submit_runs_a_training_to_completion(tmp_path):
    pytest.importorskip("aiohttp", reason="the Ray job server needs ray[default] (the test extra)")
    from cluster.redis_server import free_port
    port, dash = free_port(), free_port()
    # one setting for every process that talks to this loopback-only test cluster
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="disabled")
    start = subprocess.run([RAY, "start", "--head", "--num-cpus", "3", "--port", str(port), "--dashboard-host",
                            "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard=true",
                            "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stderr[-2000:]
    run_dir = tmp_path / "run"
    try:
        job = subprocess.run([RAY, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
                              "--", sys.executable, "-m", "cluster.cli", "train", "--address", "auto",
                              "--run-dir", str(run_dir), "--set", "train.max_seconds=30", "--set", "metrics.port=0",
                              "--set", "eval.episodes=20", "--set", "replay.min_size_to_sample=500"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert job.returncode == 0 and "succeeded" in job.stdout + job.stderr, (job.stdout + job.stderr)[-3000:]
        records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
        assert records[-1]["updates"] > 0 and records[-1]["env_steps"] > 0
        assert json.loads((run_dir / "accounting.json").read_text())["balanced"]
        assert (run_dir / "checkpoint.pt").exists()
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
