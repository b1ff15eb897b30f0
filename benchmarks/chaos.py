"""Chaos run: train the default config while killing actors, a shard, the learner and Redis.

The benchmark owns the Redis server (AOF everysec, loopback, random password) and hands it to
`apexq train` (through `$APEXQ_REDIS_URL`), so it can SIGKILL it and start it again on the same data folder.
Every `--every` seconds it kills one component chosen at random (each kind at least once when
time allows), measures how long until the run makes progress again, and at the end reconciles
the transition accounting from Redis. Prints a table, then one JSON line (DESIGN.md convention).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from owned_run import Run, start_owned_run  # noqa: E402

from apexq.core.connection import connect  # noqa: E402
from apexq.replay_server.accounting import reconcile  # noqa: E402

PROCESS = {"actor": "ray::ActorService", "shard": "ray::ShardService", "learner": "ray::LearnerService"}


def pids(pattern: str) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(l.split()[0]) for l in out.splitlines() if pattern in l]


def rss_mb(pattern: str) -> float:
    out = subprocess.run(["ps", "-eo", "rss=,args="], capture_output=True, text=True).stdout
    vals = [int(l.split()[0]) / 1024 for l in out.splitlines() if pattern in l]
    return max(vals) if vals else 0.0


def wait_until(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.25)
    return False


def progressing(run: Run, key: str, since: float, grow_from: float) -> bool:
    recs = [r for r in run.records() if r["time_s"] > since]
    return len(recs) >= 2 and recs[-1].get(key, 0) > max(grow_from, recs[-2].get(key, 0) - 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="about two minutes")
    ap.add_argument("--seconds", type=float, default=240.0)
    ap.add_argument("--every", type=float, default=12.0, help="seconds between faults")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default="actor,shard,learner,redis")
    args = ap.parse_args()
    seconds = 110.0 if args.quick else args.seconds
    rng = random.Random(args.seed)
    t_launch = time.monotonic()
    server, run_dir, proc = start_owned_run(
        "apexq-chaos-", seconds, ["train.progress_every_s=1", "learner.checkpoint_every_s=8", "eval.every_seconds=8"]
    )
    run = Run(run_dir)
    print(f"chaos: run directory {run_dir}", flush=True)  # tests watch its checkpoints while it runs
    faults: list[dict] = []
    peak = {k: 0.0 for k in PROCESS}
    peak["redis"] = 0.0
    kinds = args.kinds.split(",")
    try:
        if not wait_until(lambda: run.last().get("updates", 0) > 0, 180):
            raise SystemExit("chaos: the run never started training")
        order = kinds[:]
        rng.shuffle(order)
        while proc.poll() is None:
            time.sleep(args.every)
            if time.monotonic() - t_launch > seconds - args.every:
                break  # too close to the end of the run to watch a recovery
            for k in PROCESS:
                peak[k] = max(peak[k], rss_mb(PROCESS[k]))
            peak["redis"] = max(peak["redis"], rss_mb(Path(server.binary).name))
            if proc.poll() is not None:
                break
            kind = order.pop() if order else rng.choice(kinds)
            before = run.last()
            t0 = time.monotonic()
            at = before.get("time_s", 0.0)
            if kind == "redis":
                server.kill()
                time.sleep(1.0)
                server.start()
                ok = wait_until(
                    lambda: progressing(run, "transitions_inserted", at + 1, before.get("transitions_inserted", 0)), 60
                )
            else:
                victims = pids(PROCESS[kind])
                if not victims:
                    continue
                os.kill(rng.choice(victims), signal.SIGKILL)
                restarts = before.get("restarts", 0)
                key = {"actor": "env_steps", "shard": "replay_size", "learner": "updates"}[kind]
                ok = wait_until(
                    lambda: run.last().get("restarts", 0) > restarts and progressing(run, key, at + 0.5, 0), 60
                )
            took = time.monotonic() - t0
            faults.append({"kind": kind, "at_s": round(at, 1), "recovered": ok, "recovery_s": round(took, 2)})
            print(
                f"chaos: killed {kind:<8} at {at:6.1f}s -> {'recovered' if ok else 'NOT recovered'} in {took:5.1f}s",
                flush=True,
            )
        out, _ = proc.communicate(timeout=seconds + 240)
    finally:
        if proc.poll() is None:
            proc.kill()
    client = connect(server.url)
    acct = reconcile(client, run_dir.name, 0)
    accounting_file = run_dir / "accounting.json"
    driver_acct = json.loads(accounting_file.read_text()) if accounting_file.exists() else {}
    server.stop(remove=False)
    recs = run.records()
    solved = any(r.get("eval_return") is not None and r["eval_return"] >= -110 for r in recs)
    rec_times = [f["recovery_s"] for f in faults if f["recovered"]]
    by_kind: dict = {}
    for f in faults:
        by_kind[f["kind"]] = by_kind.get(f["kind"], 0) + 1
    figures = {
        "faults_injected": len(faults),
        "faults_by_kind": by_kind,
        "faults_recovered": sum(f["recovered"] for f in faults),
        "median_recovery_s": round(statistics.median(rec_times), 2) if rec_times else None,
        "max_recovery_s": round(max(rec_times), 2) if rec_times else None,
        "transitions_appended": acct["appended"],
        "transitions_ingested": acct["ingested"],
        "transitions_pending": acct["pending"],
        "balanced": acct["balanced"],
        "acked_lost": acct["appended"] - acct["ingested"] - acct["pending"],
        "lost_to_redis_restarts": driver_acct.get("lost_in_redis", None),
        "in_flight_lost": driver_acct.get("in_flight_lost", None),
        "solved": solved,
        "exit_code": proc.returncode,
        "peak_rss_mb": {k: round(v, 1) for k, v in peak.items()},
    }
    print(f"\n{'fault':<10}{'at s':>8}{'recovered':>11}{'seconds':>9}")
    for f in faults:
        print(f"{f['kind']:<10}{f['at_s']:>8}{str(f['recovered']):>11}{f['recovery_s']:>9}")
    print(
        f"appended {acct['appended']} = ingested {acct['ingested']} + pending {acct['pending']} -> "
        f"{'balanced' if acct['balanced'] else 'NOT balanced'}; solved: {solved}"
    )
    targets = {
        "faults_recovered": {"target": "all", "met": figures["faults_recovered"] == len(faults) and len(faults) > 0},
        "median_recovery_s": {"target": "< 10", "met": bool(rec_times) and figures["median_recovery_s"] < 10},
        "acked_lost": {"target": 0, "met": figures["acked_lost"] == 0},
        "solved": {"target": True, "met": solved},
    }
    print(json.dumps({"benchmark": "chaos", "figures": figures, "targets": targets}))


if __name__ == "__main__":
    main()
