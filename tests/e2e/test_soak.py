"""A bounded soak: once the replay is full, no process kind keeps growing in memory."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_memory_does_not_keep_growing_once_the_replay_is_full():
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    r = subprocess.run([sys.executable, "benchmarks/soak.py", "--quick"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    f = res["figures"]
    assert res["benchmark"] == "soak" and f["exit_code"] == 0 and f["samples"] >= 20
    assert set(f["rss"]) == {"actor", "shard", "learner", "driver", "redis"}, f["rss"]
    assert f["rss"]["actor"]["processes"] == 2
    assert res["targets"]["no_growth"]["met"], r.stdout[-2000:]
