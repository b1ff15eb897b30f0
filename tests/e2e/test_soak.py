"""A bounded soak: once the replay is full, no process kind keeps growing in memory.

The verdict is the test's own: it samples the resident memory of the benchmark run's processes
itself (descendants of the benchmark, from /proc) once the benchmark says the replay is full, and
compares the last third of its samples with the middle third. The benchmark's summary is only
checked for being consistent with that.
"""

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from procs import descendants

ROOT = Path(__file__).resolve().parents[2]
KINDS = {
    "actor": "ray::ActorService",
    "shard": "ray::ShardService",
    "learner": "ray::LearnerService",
    "driver": "cluster.cli train",
    "redis": "-server ",
}
TOLERANCE_MB, TOLERANCE_PCT = 8.0, 5.0


def rss_mb(pid: int):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def sample(root: int) -> dict:
    """(kind, pid) -> RSS MB for the run's processes under ``root``."""
    out = {}
    for pid, cmd in descendants(root).items():
        kind = next((k for k, needle in KINDS.items() if needle in cmd + " "), None)
        mb = rss_mb(pid) if kind else None
        if mb is not None:
            out[(kind, pid)] = mb
    return out


@pytest.mark.slow
def test_memory_does_not_keep_growing_once_the_replay_is_full():
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    p = subprocess.Popen(
        [sys.executable, "benchmarks/soak.py", "--quick"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(l.rstrip("\n") for l in p.stdout), daemon=True)
    reader.start()
    samples: list[dict] = []
    try:
        deadline = time.monotonic() + 400
        while p.poll() is None and time.monotonic() < deadline:
            if any("replay full at" in l for l in lines) and not any(l.startswith("{") for l in lines):
                samples.append(sample(p.pid))
            time.sleep(2.0)
        p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    reader.join(10)
    out = "\n".join(lines)
    assert p.returncode == 0, out[-3000:]
    res = json.loads([l for l in lines if l.startswith("{")][-1])
    assert res["benchmark"] == "soak" and res["figures"]["exit_code"] == 0, out[-3000:]
    # the run's processes end when it stops: keep the samples taken while all of them were there
    samples = [s for s in samples if {k for k, _ in s} == set(KINDS)]
    assert len(samples) >= 15, f"only {len(samples)} full samples after the replay filled: {out[-2000:]}"
    series: dict = {}
    for s in samples:
        for key, mb in s.items():
            series.setdefault(key, []).append(mb)
    kept = {key: v for key, v in series.items() if len(v) >= 0.8 * len(samples)}
    assert sorted(k for k, _ in kept) == ["actor", "actor", "driver", "learner", "redis", "shard"], sorted(kept)
    grew = {}
    for (kind, pid), v in kept.items():
        n = len(v)
        middle, last = statistics.median(v[n // 3 : 2 * n // 3]), statistics.median(v[2 * n // 3 :])
        if last - middle > max(TOLERANCE_MB, middle * TOLERANCE_PCT / 100):
            grew[f"{kind} {pid}"] = (round(middle, 1), round(last, 1))
    assert not grew, f"resident memory kept growing (middle third -> last third, MB): {grew}"
    assert set(res["figures"]["rss"]) == set(KINDS) and res["figures"]["rss"]["actor"]["processes"] == 2
