"""A two-minute chaos run: actor, shard, learner and Redis killed while training; nothing acknowledged lost."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_chaos_quick_recovers_everything_and_accounts_for_every_transition():
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    r = subprocess.run([sys.executable, "benchmarks/chaos.py", "--quick"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    f = res["figures"]
    assert res["benchmark"] == "chaos" and f["exit_code"] == 0
    assert f["faults_injected"] >= 4 and set(f["faults_by_kind"]) == {"actor", "shard", "learner", "redis"}
    assert f["faults_recovered"] == f["faults_injected"], r.stdout[-2000:]
    assert f["balanced"] and f["acked_lost"] == 0 and f["transitions_appended"] > 0
