"""Actor scaling: the whole distributed run at 1, 2, 4, ... actors, as a user starts it.

For each actor count N the benchmark runs ``apexq train --set actors.num=N`` (on this machine, or
on a cluster with ``--address``) twice at most:

* a **capacity** run with the rate limiter not binding (``replay.error_buffer`` so large that
  neither side ever waits on the other within the run): env steps/s then measure what actors,
  Redis and shards can move, not the learner's pace. Figures come from the run's own
  ``metrics.jsonl``, over its steady part (from the first record with learner updates to the end);
* a **solve** run (``--solve``) with the config's own ratio, timed from launch to the first greedy
  evaluation reaching ``--solve-at`` (the run's own ``apexq: solved`` line).

``scaling_efficiency`` is env steps/s at the largest N divided by N x env steps/s at 1 actor, both
measured in this invocation (1 actor is the baseline). With fewer cores than actors, actors share
cores and the efficiency says so; the DESIGN.md target (>= 0.8 at 8 actors) needs 8+ free cores.

Prints a table, then one JSON line: {"benchmark": "scaling", "figures": {...}, "targets": {...}}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

COLUMNS = (
    "actors",
    "env_steps_per_s",
    "inserts_per_s",
    "samples_per_s",
    "updates_per_s",
    "learner_waits_per_s",
    "insert_waits_per_s",
    "backpressure_per_s",
    "solve_s",
)


def run_apexq(args: list[str], timeout: float, label: str) -> tuple[int, list[str], Path]:
    run_dir = Path(tempfile.mkdtemp(prefix="apexq-scaling-")) / "run"
    cmd = [sys.executable, "-m", "apexq.cluster.cli", "train", "--run-dir", str(run_dir), *args]
    env = dict(os.environ)
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        # the run's progress line, and its first environment step and first learner update (the
        # latter names the learner's device and whether the update runs as one CUDA graph)
        if line.startswith(("[", "apexq: first")):
            print(f"  {label} {line.strip()}", file=sys.stderr, flush=True)
        if time.monotonic() - t0 > timeout:
            proc.kill()
            break
    rc = proc.wait()
    return rc, lines, run_dir


def steady_rates(run_dir: Path) -> dict:
    """Per-second rates over the run's steady part: from the first record with updates to the last."""
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    recs = [r for r in recs if not r.get("final")]
    start = next((i for i, r in enumerate(recs) if r["updates"] > 0), None)
    if start is None or len(recs) - start < 3:
        raise RuntimeError(f"{run_dir}: the learner never updated or the run was too short ({len(recs)} records)")
    a, b = recs[start], recs[-1]
    dt = b["time_s"] - a["time_s"]

    def rate(key):
        return round((b.get(key, 0) - a.get(key, 0)) / dt, 1)

    return {
        "env_steps_per_s": rate("env_steps"),
        "inserts_per_s": rate("transitions_inserted"),
        "samples_per_s": rate("transitions_sampled"),
        "updates_per_s": rate("updates"),
        "learner_waits_per_s": rate("sample_waits"),
        "insert_waits_per_s": rate("insert_waits"),
        "backpressure_per_s": rate("backpressure_waits"),
        "window_s": round(dt, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 and 2 actors, 25 s capacity runs, no solve runs")
    ap.add_argument("--actors", help="comma-separated actor counts (default: 1, 2, 4, ... up to the CPUs)")
    ap.add_argument("--seconds", type=float, help="length of each capacity run (default 40, --quick 25)")
    ap.add_argument("--address", help="run on this Ray cluster (as apexq train --address)")
    ap.add_argument("--config", help="base config (default: the default config)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="KEY=VALUE",
        help="extra overrides for every run, e.g. learner.device=cuda",
    )
    ap.add_argument(
        "--solve",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time a solve run per actor count (default: on, off with --quick)",
    )
    ap.add_argument("--solve-at", type=float, default=-110.0, help="greedy evaluation return that counts as solved")
    ap.add_argument("--solve-budget", type=float, default=150.0, help="seconds a solve run may take")
    ap.add_argument("--out", help="also write the JSON line to this file")
    args = ap.parse_args()
    cpus = os.cpu_count() or 1
    if args.actors:
        counts = [int(x) for x in args.actors.split(",")]
    elif args.quick:
        counts = [1, 2]
    else:
        counts, n = [], 1
        while n <= max(2, cpus):
            counts.append(n)
            n *= 2
    seconds = args.seconds or (25.0 if args.quick else 40.0)
    solve = (not args.quick) if args.solve is None else args.solve
    base = (["--config", args.config] if args.config else []) + (["--address", args.address] if args.address else [])
    for o in args.overrides:
        base += ["--set", o]
    common = ["--set", "metrics.port=0", "--set", "train.progress_every_s=2"]

    rows = []
    for n in counts:
        row: dict = {"actors": n}
        # capacity: the limiter never binds (a buffer larger than anything a run inserts)
        rc, lines, run_dir = run_apexq(
            base
            + common
            + [
                "--set",
                f"actors.num={n}",
                "--set",
                f"train.max_seconds={seconds}",
                "--set",
                "eval.every_seconds=0",
                "--set",
                "replay.error_buffer=1e15",
            ],
            timeout=seconds + 180,
            label=f"{n} actor(s), capacity:",
        )
        if rc != 0:
            raise SystemExit(f"scaling: the capacity run with {n} actors exited {rc}:\n" + "\n".join(lines[-15:]))
        row.update(steady_rates(run_dir))
        row["solve_s"] = None
        if solve:
            rc, lines, _ = run_apexq(
                base
                + common
                + [
                    "--set",
                    f"actors.num={n}",
                    "--set",
                    f"train.max_seconds={args.solve_budget}",
                    "--set",
                    "eval.every_seconds=5",
                    "--set",
                    f"train.stop_at_return={args.solve_at}",
                ],
                timeout=args.solve_budget + 180,
                label=f"{n} actor(s), solve:",
            )
            m = next(
                (
                    re.search(r"solved: reached train.stop_at_return ([0-9.]+)s after launch", l)
                    for l in lines
                    if "solved: reached" in l
                ),
                None,
            )
            row["solve_s"] = float(m.group(1)) if m else None
        rows.append(row)

    print()
    print(" | ".join(f"{c:>19}" for c in COLUMNS))
    for r in rows:
        print(" | ".join(f"{'-' if r.get(c) is None else r[c]:>19}" for c in COLUMNS))
    one = rows[0]["env_steps_per_s"] if rows[0]["actors"] == 1 else None
    top = rows[-1]
    eff = round(top["env_steps_per_s"] / (top["actors"] * one), 3) if one else None
    print(
        f"\nscaling efficiency at {top['actors']} actors: {eff} (env steps/s at {top['actors']} / "
        f"({top['actors']} x env steps/s at 1); {cpus} CPUs here{', cluster ' + args.address if args.address else ''})"
    )
    at8 = next((r for r in rows if r["actors"] == 8), None)
    eff8 = round(at8["env_steps_per_s"] / (8 * one), 3) if at8 and one else None
    result = {
        "benchmark": "scaling",
        "figures": {
            "actors": [r["actors"] for r in rows],
            "env_steps_per_s": [r["env_steps_per_s"] for r in rows],
            "inserts_per_s": [r["inserts_per_s"] for r in rows],
            "samples_per_s": [r["samples_per_s"] for r in rows],
            "updates_per_s": [r["updates_per_s"] for r in rows],
            "learner_waits_per_s": [r["learner_waits_per_s"] for r in rows],
            "insert_waits_per_s": [r["insert_waits_per_s"] for r in rows],
            "backpressure_per_s": [r["backpressure_per_s"] for r in rows],
            "scaling_efficiency": eff,
            "solve_s": [r["solve_s"] for r in rows],
            "cpus": cpus,
        },
        "targets": {
            "scaling_efficiency_at_8_actors": {
                "target": ">= 0.8",
                "value": eff8,
                "met": None if eff8 is None else eff8 >= 0.8,
            }
        },
    }
    line = json.dumps(result)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
