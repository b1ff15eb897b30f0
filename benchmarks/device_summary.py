"""The figures of one ``benchmarks/device.sh`` run, from the logs and JSON lines its steps left.

Usage: python benchmarks/device_summary.py OUT_DIR (the folder holding machine.txt and logs/).
Writes OUT_DIR/summary.json and prints a table, then the same JSON as its last line:
{"benchmark": "device", "figures": {...}, "targets": {...}}. A step that failed or never ran
leaves its figures None; the rest are still reported.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Optional

# each solve step runs one seed of one mode: its median is that seed's time; (median, final returns)
SOLVE_FIGURES = {
    "dist": ("apexq_median_solve_s", "apexq_final_returns"),
    "single": ("apexq_single_median_solve_s", "single_final_returns"),
}


def last_json(path: Path) -> Optional[dict]:
    """The last line of a log that parses as a JSON object (a benchmark's result), or None."""
    if not path.exists():
        return None
    for line in reversed(path.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def grep(path: Path, needle: str) -> Optional[str]:
    if not path.exists():
        return None
    return next((l.strip() for l in path.read_text(errors="replace").splitlines() if needle in l), None)


def ratio(a, b) -> Optional[float]:
    return round(a / b, 3) if a is not None and b else None


def median(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarise(out: Path) -> dict:
    logs = out / "logs"
    machine = (out / "machine.txt").read_text(errors="replace") if (out / "machine.txt").exists() else ""
    gpu = next((l.strip() for l in machine.splitlines() if l.startswith("GPU ")), None)
    tests_log = logs / "cuda_tests.txt"
    tests = tests_log.read_text(errors="replace").strip().splitlines() if tests_log.exists() else []

    learner = {mode: last_json(logs / f"learner_{mode}.txt") for mode in ("async", "sync")}
    bench = {}
    for mode, res in learner.items():
        f = (res or {}).get("figures", {})
        for key in (
            "updates_per_s_b512",
            "bare_updates_per_s_b512",
            "efficiency_b128",
            "efficiency_b512",
            "efficiency_b128_shard_process",
            "efficiency_b512_shard_process",
        ):
            bench[f"{key}_{mode}"] = f.get(key)
    bare = bench["bare_updates_per_s_b512_async"]

    rows = []
    for path in sorted(logs.glob("scaling_*.json"), key=lambda p: int(p.stem.split("_")[1])):
        f = json.loads(path.read_text())["figures"]
        rows.append({k: f[k][0] for k in ("actors", "env_steps_per_s", "updates_per_s", "learner_waits_per_s")})
    one = next((r["env_steps_per_s"] for r in rows if r["actors"] == 1), None)
    for r in rows:
        r["efficiency"] = ratio(r["env_steps_per_s"], r["actors"] * one) if one else None
        r["updates_vs_bare"] = ratio(r["updates_per_s"], bare)
    at = {r["actors"]: r for r in rows}
    first_update = next(
        (
            line.split("capacity: ", 1)[-1]
            for p in sorted(logs.glob("scaling_*.txt"))
            if (line := grep(p, "first learner update"))
        ),
        None,
    )

    solve: dict = {"dist": {}, "single": {}}
    for mode, (solve_key, final_key) in SOLVE_FIGURES.items():
        for path in sorted(logs.glob(f"solve_{mode}_*.txt")):
            f = (last_json(path) or {}).get("figures", {})
            solve[mode][int(path.stem.rsplit("_", 1)[1])] = {
                "solve_s": f.get(solve_key),
                "final_return": (f.get(final_key) or [None])[0],
            }
    dist_med = median(r["solve_s"] for r in solve["dist"].values())
    single_med = median(r["solve_s"] for r in solve["single"].values())

    eff8 = at.get(8, {}).get("efficiency")
    in_system8 = at.get(8, {}).get("updates_vs_bare")
    figures = {
        "machine": gpu,
        "cuda_tests": tests[-1] if tests else None,
        "first_update_line": first_update,
        "actors": [r["actors"] for r in rows],
        "env_steps_per_s": [r["env_steps_per_s"] for r in rows],
        "scaling_efficiency": [r["efficiency"] for r in rows],
        "scaling_efficiency_at_8": eff8,
        "learner_updates_per_s_in_system": [r["updates_per_s"] for r in rows],
        "learner_waits_per_s": [r["learner_waits_per_s"] for r in rows],
        "learner_in_system_vs_bare": [r["updates_vs_bare"] for r in rows],
        **bench,
        "solve_s_distributed": {s: r["solve_s"] for s, r in solve["dist"].items()},
        "solve_s_single": {s: r["solve_s"] for s, r in solve["single"].items()},
        "final_return_distributed": {s: r["final_return"] for s, r in solve["dist"].items()},
        "final_return_single": {s: r["final_return"] for s, r in solve["single"].items()},
        "median_solve_s_distributed": dist_med,
        "median_solve_s_single": single_med,
        "speedup_vs_single": ratio(single_med, dist_med),
    }
    targets = {
        "scaling_efficiency_at_8_actors": {"target": ">= 0.8", "value": eff8, "met": bool(eff8 and eff8 >= 0.8)},
        "learner_in_system_vs_bare_at_8_actors": {
            "target": ">= 0.9 of benchmarks/learner.py's bare graphed loop (batch 512)",
            "value": in_system8,
            "met": bool(in_system8 and in_system8 >= 0.9),
        },
        "distributed_faster_than_single_process": {
            "target": "> 1",
            "value": figures["speedup_vs_single"],
            "met": bool(figures["speedup_vs_single"] and figures["speedup_vs_single"] > 1),
        },
    }
    return {"benchmark": "device", "figures": figures, "targets": targets}


def main() -> None:
    out = Path(sys.argv[1])
    result = summarise(out)
    f = result["figures"]
    print(f"machine: {f['machine']}\nCUDA tests: {f['cuda_tests']}\nfirst update: {f['first_update_line']}")
    print(f"{'actors':>7} {'env steps/s':>12} {'efficiency':>10} {'learner upd/s':>14} {'vs bare':>8}")
    for i, n in enumerate(f["actors"]):
        print(
            f"{n:>7} {f['env_steps_per_s'][i]:>12} {str(f['scaling_efficiency'][i]):>10} "
            f"{f['learner_updates_per_s_in_system'][i]:>14} {str(f['learner_in_system_vs_bare'][i]):>8}"
        )
    for mode in ("async", "sync"):
        g = {k[: -len(mode) - 1]: v for k, v in f.items() if k.endswith("_" + mode)}
        print(
            f"learner.py ({mode} host copies), batch 512: {g['updates_per_s_b512']} vs bare "
            f"{g['bare_updates_per_s_b512']} upd/s; efficiency at batch 128 / 512: in process "
            f"{g['efficiency_b128']} / {g['efficiency_b512']}, shard in its own process "
            f"{g['efficiency_b128_shard_process']} / {g['efficiency_b512_shard_process']}"
        )
    print(
        f"time to solve: distributed {f['solve_s_distributed']} (median {f['median_solve_s_distributed']}), "
        f"single-process {f['solve_s_single']} (median {f['median_solve_s_single']}): x{f['speedup_vs_single']}"
    )
    line = json.dumps(result)
    (out / "summary.json").write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
