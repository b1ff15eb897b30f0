"""`apexq train` against a Redis server the benchmark owns (chaos.py, soak.py).

Owning the server lets a benchmark kill and restart it, or find its process; the run gets it
through ``$APEXQ_REDIS_URL``. ``Run`` reads the run's metrics.jsonl as it grows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from apexq.cluster.redis_server import RedisServer, find_server  # noqa: E402


class Run:
    def __init__(self, run_dir: Path):
        self.metrics = run_dir / "metrics.jsonl"

    def records(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        return [json.loads(l) for l in self.metrics.read_text().splitlines() if l.strip()]

    def last(self) -> dict:
        r = self.records()
        return r[-1] if r else {}


def start_owned_run(prefix: str, seconds: float, sets: list[str]) -> tuple[RedisServer, Path, subprocess.Popen]:
    """Start a private Redis (AOF in a folder that outlives kills) and ``apexq train`` against it.

    ``sets`` are extra ``KEY=VALUE`` overrides; stdout and stderr of the run are piped together.
    """
    work = Path(tempfile.mkdtemp(prefix=prefix))
    (work / "redis").mkdir()
    server = RedisServer(find_server(), data_dir=str(work / "redis")).start()
    run_dir = work / "run"
    # the URL (with its password) in the environment, as the README says: never in argv
    env = dict(
        os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", APEXQ_REDIS_URL=server.url
    )
    cmd = [
        sys.executable,
        "-m",
        "apexq.cluster.cli",
        "train",
        "--run-dir",
        str(run_dir),
        "--set",
        f"train.max_seconds={seconds}",
        "--set",
        "metrics.port=0",
    ]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return server, run_dir, proc
