"""Soak: train for a while with the replay full and watch every process's memory.

The benchmark owns the Redis server (as chaos.py does) so it knows every process of the run: the
driver, each actor, each shard, the learner and Redis. It samples their resident memory every
``--interval`` seconds. Once the replay is full nothing should keep growing, so for each process
kind it compares the median RSS of the last third of the samples (taken after the replay filled)
against the middle third. Prints a table, then one JSON line (DESIGN.md convention).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from owned_run import Run, start_owned_run  # noqa: E402

KINDS = {"actor": "ray::ActorService", "shard": "ray::ShardService", "learner": "ray::LearnerService"}


def rss_by_pid() -> dict[int, tuple[float, str]]:
    """pid -> (RSS in MB, command line) of every process, from ps."""
    out = subprocess.run(["ps", "-eo", "pid=,rss=,args="], capture_output=True, text=True).stdout
    res = {}
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3:
            res[int(parts[0])] = (int(parts[1]) / 1024, parts[2])
    return res


def sample(driver_pid: int, redis_pid: int) -> dict[str, dict[int, float]]:
    """kind -> {pid: RSS MB} for the run's processes."""
    procs = rss_by_pid()
    out: dict[str, dict[int, float]] = {k: {} for k in (*KINDS, "driver", "redis")}
    for pid, (mb, args) in procs.items():
        for kind, pattern in KINDS.items():
            if pattern in args:
                out[kind][pid] = mb
    if driver_pid in procs:
        out["driver"][driver_pid] = procs[driver_pid][0]
    if redis_pid in procs:
        out["redis"][redis_pid] = procs[redis_pid][0]
    return out


def growth(series: list[float]) -> dict:
    """Median of the middle third vs the last third of a series of RSS samples."""
    n = len(series)
    mid, last = series[n // 3 : 2 * n // 3], series[2 * n // 3 :]
    m, l = statistics.median(mid), statistics.median(last)
    return {
        "middle_mb": round(m, 1),
        "last_mb": round(l, 1),
        "growth_mb": round(l - m, 1),
        "growth_pct": round(100 * (l - m) / m, 2) if m else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="about two minutes (the test suite's soak)")
    ap.add_argument("--seconds", type=float, default=900.0, help="training time")
    ap.add_argument("--interval", type=float, default=2.0, help="seconds between memory samples")
    ap.add_argument("--capacity", type=int, default=20_000, help="replay.capacity (small: it fills early)")
    ap.add_argument("--tolerance-pct", type=float, default=5.0)
    ap.add_argument("--tolerance-mb", type=float, default=8.0)
    args = ap.parse_args()
    seconds = 80.0 if args.quick else args.seconds
    server, run_dir, proc = start_owned_run(
        "apexq-soak-",
        seconds,
        [
            "train.progress_every_s=2",
            f"replay.capacity={args.capacity}",
            "replay.min_size_to_sample=1000",
            "learner.checkpoint_every_s=10",
            "eval.every_seconds=15",
        ],
    )
    run = Run(run_dir)
    samples: list[tuple[float, dict]] = []
    full_at = None
    t0 = time.monotonic()
    try:
        while proc.poll() is None:
            time.sleep(args.interval)
            if full_at is None and run.last().get("replay_size", 0) >= args.capacity:
                full_at = time.monotonic() - t0
                print(f"soak: replay full at {full_at:.0f}s; watching memory", flush=True)
            if full_at is not None:
                samples.append((time.monotonic() - t0, sample(proc.pid, server.proc.pid)))
                if len(samples) % 15 == 0:
                    s = samples[-1][1]
                    print("soak: " + " | ".join(f"{k} {sum(v.values()):.0f} MB" for k, v in s.items()), flush=True)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    # one series per process, kept if it was seen in most samples (processes exit at the stop)
    per_kind: dict[str, dict] = {}
    for kind in (*KINDS, "driver", "redis"):
        seen: dict[int, list[float]] = {}
        for _, s in samples:
            for pid, mb in s[kind].items():
                seen.setdefault(pid, []).append(mb)
        rows = {pid: growth(v) for pid, v in seen.items() if len(v) >= max(9, 0.8 * len(samples))}
        if rows:
            worst = max(rows.values(), key=lambda r: r["growth_mb"])
            per_kind[kind] = {**worst, "processes": len(rows)}
    grows = {
        k: v["growth_mb"] > max(args.tolerance_mb, v["middle_mb"] * args.tolerance_pct / 100)
        for k, v in per_kind.items()
    }
    print(f"\n{'process':<9}{'n':>3}{'middle MB':>11}{'last MB':>9}{'growth':>9}")
    for k, v in per_kind.items():
        flag = "  GROWS" if grows[k] else ""
        print(f"{k:<9}{v['processes']:>3}{v['middle_mb']:>11}{v['last_mb']:>9}{v['growth_mb']:>+8.1f}{flag}")
    figures = {
        "seconds": seconds,
        "replay_full_at_s": round(full_at, 1) if full_at else None,
        "samples": len(samples),
        "exit_code": proc.returncode,
        "rss": per_kind,
    }
    targets = {
        "no_growth": {
            "target": f"last third <= middle third + max({args.tolerance_mb} MB, "
            f"{args.tolerance_pct}%) for every process kind",
            "met": bool(per_kind) and len(samples) >= 9 and not any(grows.values()),
        }
    }
    if proc.returncode != 0:
        print(out[-3000:], file=sys.stderr)
    print(json.dumps({"benchmark": "soak", "figures": figures, "targets": targets}))


if __name__ == "__main__":
    main()
