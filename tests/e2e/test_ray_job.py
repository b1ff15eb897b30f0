"""`ray job submit --working-dir . -- apexq train` (no --address) against a local `ray start --head`.

Ray's authentication stays at its default: with a token where Ray looks, `ray start --head`
turns token authentication on, and the ray CLI is given RAY_AUTH_MODE=token as Ray tells a
user to. Inside the job Ray sets RAY_ADDRESS, and apexq joins that cluster by itself. The Redis URL
comes from the head's environment (APEXQ_REDIS_URL, as a Kubernetes Secret or the launcher sets it),
so it is in no `ray job` record: the test looks for its password in every one, the job's logs
and the run's files.
"""

import json
import subprocess
from pathlib import Path

import pytest
from ray_head import RAY, RayHead

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_ray_job_submit_without_address_joins_the_cluster_and_runs_to_completion(tmp_path):
    from needs import require_module

    require_module("aiohttp", "the Ray job server needs ray[default] (the test extra)")
    import redis

    from apexq.cluster.redis_server import RedisServer, find_server

    server = RedisServer(find_server()).start()
    head = RayHead(num_cpus=4)
    head.env["APEXQ_REDIS_URL"] = server.url  # the head's environment; the job's driver inherits it
    head.start()
    run_dir = tmp_path / "run"
    cli = dict(head.env, RAY_AUTH_MODE="token")  # what the ray CLI needs to reach an authenticated job server
    job = f"http://127.0.0.1:{head.dash}"
    try:
        assert "Token authentication is enabled" in head.log_tail()  # the default, not turned off
        sub = subprocess.run(
            [
                RAY,
                "job",
                "submit",
                "--address",
                job,
                "--submission-id",
                "apexq-job",
                "--working-dir",
                str(ROOT),
                "--",
                "apexq",
                "train",
                "--run-dir",
                str(run_dir),
                "--set",
                "train.max_seconds=15",
                "--set",
                "metrics.port=0",
                "--set",
                "eval.episodes=10",
                "--set",
                "replay.min_size_to_sample=500",
            ],
            cwd=ROOT,
            env=cli,
            capture_output=True,
            text=True,
            timeout=400,
        )
        out = sub.stdout + sub.stderr
        assert sub.returncode == 0, out[-3000:]
        status = subprocess.run(
            [RAY, "job", "status", "--address", job, "apexq-job"], env=cli, capture_output=True, text=True, timeout=60
        )
        assert "Job 'apexq-job' succeeded" in status.stdout, status.stdout + status.stderr
        logs = subprocess.run(
            [RAY, "job", "logs", "--address", job, "apexq-job"], env=cli, capture_output=True, text=True, timeout=60
        ).stdout
        apexq_lines = [line for line in logs.splitlines() if line.startswith("apexq:")]
        # the run's first line says which Ray it uses; the last says it finished
        assert apexq_lines[0] == f"apexq: joined the Ray cluster at {head.address} (from RAY_ADDRESS)", logs[-3000:]
        assert any(line.startswith("apexq: done (reached train.max_seconds)") for line in apexq_lines), logs[-3000:]
        records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
        assert records[-1]["updates"] > 0 and records[-1]["env_steps"] > 0
        assert json.loads((run_dir / "accounting.json").read_text())["balanced"]
        assert (run_dir / "checkpoint.pt").exists()
        # the run used the head's Redis, and its password is in no record a user or Ray keeps
        admin = redis.Redis.from_url(server.admin_url)
        assert admin.xlen("apexq:run:shard:0:stream") > 0
        admin.close()
        listed = subprocess.run(
            [RAY, "job", "list", "--address", job], env=cli, capture_output=True, text=True, timeout=60
        )
        assert "apexq-job" in listed.stdout, listed.stdout + listed.stderr
        records = {
            "ray job list": listed.stdout + listed.stderr,
            "ray job status": status.stdout,
            "ray job logs": logs,
            "ray job submit": out,
        }
        records.update({str(f): f.read_bytes().decode(errors="replace") for f in run_dir.rglob("*") if f.is_file()})
        leaked = [name for name, text in records.items() if server.password in text]
        assert not leaked, f"the Redis password is in {leaked}"
    finally:
        head.stop()
        server.stop()
