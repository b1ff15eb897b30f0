"""Each benchmark script runs end to end at a tiny size and keeps the output convention.

The convention (DESIGN.md, "Benchmarks: one convention"): a readable table, then as the last
line one JSON object ``{"benchmark": NAME, "figures": {...}, "targets": {...}}`` naming at
least the tracked figures. Whether a target is met is never checked here (``--smoke`` sizes are
far too small to say anything about performance), but every rate must be a real measurement:
finite and above zero, and each derived figure must agree with the rates it is derived from.
"""

import json
import math
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


# figures that measure something: a zero (nothing flowed) or NaN fails
RATES = {
    "replay": (
        "ingest_tps",
        "raw_ingest_tps",
        "sample_tps",
        "shard_memory_ratio",
        "redis_memory_ratio",
        "transitions_in_shard",
    ),
    "actors": ("actor_sps", "gym_loop_sps", "sps_1_actor", "sps_2_actors", "speedup"),
    "learner": ("updates_per_s", "bare_updates_per_s", "efficiency"),
}
# derived figure = numerator / denominator, as rounded in the JSON
RATIOS = {
    "replay": [("ingest_vs_raw", "ingest_tps", "raw_ingest_tps")],
    "actors": [("speedup", "actor_sps", "gym_loop_sps")],
    "learner": [],  # its efficiency is the median of per-round ratios, not a ratio of the medians
}


def run_smoke(name: str, timeout: float = 240) -> dict:
    script = ROOT / "benchmarks" / f"{name}.py"
    assert script.exists(), f"{script} is missing"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(script), "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
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
    for key in RATES[name]:
        v = figures[key]
        assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, f"{name}: {key} = {v!r}"
    for ratio, num, den in RATIOS[name]:
        assert figures[ratio] == pytest.approx(figures[num] / figures[den], rel=0.05, abs=0.06), (
            f"{name}: {ratio} = {figures[ratio]} but {num} / {den} = {figures[num] / figures[den]:.3f}"
        )
    if name == "learner":
        assert figures["device"] == "cpu" and figures["batch_size"] == 512
