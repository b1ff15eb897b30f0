"""A run whose driver does not see the workers' filesystem, as on a real cluster (AWS, KubeRay).

One machine, two views of it: Ray (and so the learner) is started by a helper process outside,
and the driver runs in a private mount namespace (``unshare -m``) with a tmpfs over the run
directory's parent. A file the learner wrote there itself would land in the outer view, not the
driver's; the checkpoint and policy must come to the driver. Then, in the same namespace,
``apexq evaluate`` reads the run and ``apexq train --resume`` continues its counters.
"""

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.needs import unavailable

ROOT = Path(__file__).resolve().parents[2]
# Ray 2.60 turns token authentication on for a head started by ray.init too; a driver joining
# from another process then needs the token. This loopback-only test cluster goes without.
ENV = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")

# a Ray head of its own, outside the driver's mount namespace
HEAD = """
import sys, ray
ray.init(num_cpus=4, include_dashboard=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test closes it
ray.shutdown()
"""

RUN = [
    "--set",
    "train.progress_every_s=1",
    "--set",
    "learner.checkpoint_every_s=3",
    "--set",
    "eval.every_seconds=5",
    "--set",
    "eval.episodes=5",
    "--set",
    "replay.min_size_to_sample=500",
    "--set",
    "replay.capacity=50000",
    "--set",
    "actors.envs_per_actor=8",
    "--set",
    "metrics.port=0",
]


def can_unshare_and_mount(where: Path) -> str:
    """'' if this process may make a mount namespace with a tmpfs in it, else why not."""
    try:
        r = subprocess.run(
            ["unshare", "-m", "sh", "-c", f"mount -t tmpfs tmpfs {shlex.quote(str(where))}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except FileNotFoundError:
        return "no unshare command here"
    return "" if r.returncode == 0 else f"unshare -m + mount not permitted here ({r.stderr.strip()[:200]})"


def records(run: Path) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_run_files_reach_a_driver_that_does_not_share_the_learners_filesystem(tmp_path):
    import torch

    private = tmp_path / "driver-only"  # the tmpfs goes here, seen by the driver alone
    private.mkdir()
    why = can_unshare_and_mount(private)
    if why:
        unavailable(why)  # a skip on a workstation; CI runs as root, where this must run
    out = tmp_path / "seen-by-driver"  # copies of the driver's run directory, for the asserts
    out.mkdir()
    head = subprocess.Popen(
        [sys.executable, "-c", HEAD],
        cwd=ROOT,
        env=dict(ENV, PYTHONPATH=str(ROOT)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        address = head.stdout.readline().strip()
        assert address, "the Ray head did not start"
        run = private / "run"
        cli = [sys.executable, "-m", "apexq.cluster.cli"]
        q = shlex.quote
        script = "\n".join(
            [
                f"mount -t tmpfs -o size=256m tmpfs {q(str(private))} || exit 97",
                shlex.join(cli + ["train", "--address", address, "--run-dir", str(run)])
                + f" {shlex.join(['--set', 'train.max_seconds=25', *RUN])}"
                f" > {q(str(out / 'train1.log'))} 2>&1; echo $? > {q(str(out / 'train1.rc'))}",
                f"cp -a {q(str(run))} {q(str(out / 'after-train'))}",
                f"{shlex.join(cli + ['evaluate', str(run), '--episodes', '3', '--json'])}"
                f" > {q(str(out / 'eval.json'))} 2>&1; echo $? > {q(str(out / 'eval.rc'))}",
                # the resumed run goes on for another 15 s of its own clock (train.max_seconds counts the whole run)
                f"T=$(tail -n 1 {q(str(run / 'metrics.jsonl'))} | {q(sys.executable)} -c "
                "'import json,sys; print(int(json.load(sys.stdin)[\"time_s\"]) + 15)')",
                f"{shlex.join(cli + ['train', '--resume', str(run), '--address', address])} --set train.max_seconds=$T"
                f" > {q(str(out / 'train2.log'))} 2>&1; echo $? > {q(str(out / 'train2.rc'))}",
                f"cp -a {q(str(run))} {q(str(out / 'after-resume'))}",
            ]
        )
        r = subprocess.run(
            ["unshare", "-m", "sh", "-c", script], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=420
        )
        assert r.returncode == 0, r.stderr[-2000:]
    finally:
        head.stdin.close()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
    log1 = (out / "train1.log").read_text()
    assert (out / "train1.rc").read_text().strip() == "0", log1[-3000:]
    # the split is real: what the driver wrote is not in the outer view, where the learner runs
    assert not run.exists(), sorted(p.name for p in private.iterdir())
    first = out / "after-train"
    onnx = ("policy.onnx",) if importlib.util.find_spec("onnx") else ()  # written when onnx is installed
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "state.json",
        "accounting.json",
        "placement.json",
        "curve.png",
        "checkpoint.pt",
        "policy.pt2",
        "policy.safetensors",
        "policy.json",
        *onnx,
    ):
        assert (first / name).is_file(), (name, sorted(p.name for p in first.iterdir()), log1[-2000:])
    assert not list(first.glob("*.tmp"))
    final = records(first)[-1]
    ckpt = torch.load(first / "checkpoint.pt", weights_only=True)
    # the final checkpoint, not only a periodic one, made it here: it holds the run's last counters
    assert final.get("final") and final["updates"] > 0 and ckpt["updates"] == final["updates"], (final, log1[-2000:])
    assert ckpt["extra"]["env_steps"] == final["env_steps"] > 0
    policy = json.loads((first / "policy.json").read_text())
    assert policy["env_id"] == "MountainCar-v0" and policy["weights_version"] >= 1
    # apexq evaluate, on the driver's node, reads the policy that came over
    ev = (out / "eval.json").read_text()
    assert (out / "eval.rc").read_text().strip() == "0", ev[-2000:]
    res = json.loads(ev.strip().splitlines()[-1])
    assert len(res["returns"]) == 3 and -200 <= res["mean"] <= 0, res
    # --resume, from the driver's run directory, continues the counters
    log2 = (out / "train2.log").read_text()
    assert (out / "train2.rc").read_text().strip() == "0", log2[-3000:]
    resumed = records(out / "after-resume")[len(records(first)) :]
    assert resumed, log2[-2000:]
    assert all(x["updates"] >= final["updates"] and x["env_steps"] >= final["env_steps"] for x in resumed), resumed
    assert resumed[-1]["updates"] > final["updates"] and resumed[-1]["env_steps"] > final["env_steps"]
    again = torch.load(out / "after-resume" / "checkpoint.pt", weights_only=True)
    assert again["updates"] == resumed[-1]["updates"] > ckpt["updates"]
