"""Each benchmark script runs end to end at a tiny size and keeps the output convention.

The convention (DESIGN.md, "Benchmarks: one convention"): a readable table, then as the last
line one JSON object ``{"benchmark": NAME, "figures": {...}, "targets": {...}}`` naming at
least the tracked figures. Only the shape is checked here, never whether a target is met:
``--smoke`` sizes are far too small to say anything about performance.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CASES = {
    "replay": ("ingest_tps", "raw_ingest_tps", "sample_tps", "shard_memory_ratio", "redis_memory_ratio"),
    "actors": ("actor_sps", "gym_loop_sps", "speedup", "sps_1_actor", "sps_2_actors"),
    "learner": ("updates_per_s", "bare_updates_per_s", "efficiency", "device", "batch_size"),
}


def run_smoke(name: str, timeout: float = 240) -> dict:
    script = ROOT / "benchmarks" / f"{name}.py"
    if not script.exists():
        pytest.skip(f"{script.name} not written yet")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(script), "--smoke"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script.name} --smoke failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) >= 2, f"expected a table before the JSON line, got:\n{proc.stdout}"
    return json.loads(lines[-1])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_smoke_prints_the_json_convention(name):
    out = run_smoke(name)
    assert out["benchmark"] == name
    figures, targets = out["figures"], out["targets"]
    assert isinstance(figures, dict) and isinstance(targets, dict)
    missing = [f for f in CASES[name] if f not in figures]
    assert not missing, f"{name}: figures {missing} missing from {sorted(figures)}"
    for key, t in targets.items():
        assert {"target", "met"} <= set(t), f"{name}: target {key} is {t}"
        assert isinstance(t["met"], bool)
