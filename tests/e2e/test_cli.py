"""`apexq` as a user runs it: a subprocess, real local Ray, real Redis, real gymnasium."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import Watch

ROOT = Path(__file__).resolve().parents[2]
PROCS = ("raylet", "gcs_server", "redis-server", "valkey-server")
ENV = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")


def apexq(*args, **kw):
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    return subprocess.run(
        [sys.executable, "-m", "apexq.cluster.cli", *args],
        cwd=kw.pop("cwd", ROOT),
        env=env,
        capture_output=True,
        text=True,
        **kw,
    )


def watched(args: list, timeout: float) -> tuple[subprocess.CompletedProcess, Watch]:
    """``apexq ARGS`` with its process tree recorded while it runs (its own processes only: other
    tests may run Ray or Redis on this machine at the same time)."""
    p = subprocess.Popen(
        [sys.executable, "-m", "apexq.cluster.cli", *args],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watch = Watch(p.pid)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        watch.stop()
    return subprocess.CompletedProcess(p.args, p.returncode, out, err), watch


def assert_nothing_left(watch: Watch, timeout: float = 20.0) -> None:
    """Every process the run started has ended (Ray's own shutdown takes a few seconds)."""
    assert watch.kinds("raylet") or watch.kinds("gcs_server"), "the watch never saw the run's Ray"
    left = watch.wait_gone(timeout)
    assert not left, f"outlived the run: {left}"


@pytest.mark.parametrize(
    "override, message",
    [
        ("actors.num=-3", "apexq: error: actors.num: must be between 1 and 4096, got -3"),
        ("replay.capacity=abc", "apexq: error: replay.capacity: expected an integer, got 'abc'"),
        ("actors.numm=2", "apexq: error: actors.numm: unknown key (did you mean actors.num?)"),
        ("env.id=NoSuchEnv-v9", "apexq: error: env.id: 'NoSuchEnv-v9' cannot be made by gymnasium"),
        (
            "env.id=Pendulum-v1",
            "apexq: error: env.id: 'Pendulum-v1' has a Box action space; apexq needs a Discrete one",
        ),
    ],
)
def test_invalid_config_is_one_line_exit_2_and_starts_nothing(override, message, tmp_path):
    r, watch = watched(["train", "--set", override, "--run-dir", str(tmp_path / "run")], timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()
    started = [cmd for cmd in (c for _, c in watch.seen.values()) if any(p in cmd for p in PROCS)]
    assert not started, started


def short_run_args(run_dir, seconds):
    return [
        "train",
        "--run-dir",
        str(run_dir),
        "--set",
        f"train.max_seconds={seconds}",
        "--set",
        "train.progress_every_s=2",
        "--set",
        "eval.every_seconds=5",
        "--set",
        "eval.episodes=20",
        "--set",
        "replay.min_size_to_sample=500",
        "--set",
        "replay.capacity=50000",
        "--set",
        "actors.envs_per_actor=16",
        "--set",
        "learner.checkpoint_every_s=5",
    ]


@pytest.mark.slow
def test_train_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    # ends on env steps, not a clock: the rate limiter (8 samples per insert, error buffer 20,000) and
    # the actors' backlog (64 blocks of 256 each) let 100k env steps happen only with ~500 learner
    # updates done, however slow the machine
    r, watch = watched(
        [*short_run_args(run_dir, 400), "--set", "train.max_env_steps=100000", "--set", "eval.every_seconds=3"],
        timeout=420,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    for key in (
        "time_s",
        "env_steps",
        "updates",
        "transitions_inserted",
        "transitions_sampled",
        "replay_size",
        "weights_version",
        "mean_return",
    ):
        assert key in last
    # transitions flowed actor -> Redis -> shard -> learner
    assert last["env_steps"] > 0 and last["transitions_inserted"] > 0 and last["replay_size"] > 0
    assert last["transitions_sampled"] > 0 and last["updates"] > 0
    # weights versions advanced and reached the actors
    assert last["weights_version"] > 2
    assert min(last["actor_weights_versions"]) > 1
    assert any(r_.get("eval_return") is not None for r_ in records)
    assert (run_dir / "checkpoint.pt").stat().st_size > 0
    assert (run_dir / "config.yaml").exists() and (run_dir / "curve.png").stat().st_size > 1000
    assert "env steps" in r.stdout and "apexq: done" in r.stdout
    assert re.search(r"apexq: first learner update [\d.]+s after launch \(on cpu\)", r.stdout), r.stdout[:2000]
    # every transition accounted for: appended = ingested + pending, and nothing lost
    acct = json.loads((run_dir / "accounting.json").read_text())
    assert acct["balanced"] and acct["appended"] > 0 and acct["appended"] == acct["ingested"] + acct["pending"]
    assert acct["lost_in_redis"] == 0 and "balanced" in r.stdout
    assert_nothing_left(watch)
    # the policy evaluates from the run directory exactly as the run evaluated it (seed 0, eval.episodes)
    ev = apexq("evaluate", str(run_dir), "--episodes", "20", "--seed", "0", "--json", timeout=120)
    assert ev.returncode == 0, ev.stderr
    res = json.loads(ev.stdout.strip().splitlines()[-1])
    desc = json.loads((run_dir / "policy.json").read_text())
    assert res["episodes"] == 20 and res["mean"] == desc["eval_return"] is not None, (res, desc)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_gracefully_with_a_checkpoint(tmp_path, sig):
    run_dir = tmp_path / "run"
    p = subprocess.Popen(
        [sys.executable, "-m", "apexq.cluster.cli", *short_run_args(run_dir, 300)],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    watch = Watch(p.pid)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if metrics.exists() and any(json.loads(l)["updates"] > 0 for l in metrics.read_text().splitlines() if l):
            break
        time.sleep(0.5)
    else:
        p.kill()
        watch.stop()
        pytest.fail("the run never started updating")
    t0 = time.monotonic()
    p.send_signal(sig)
    try:
        out, _ = p.communicate(timeout=60)
    except subprocess.TimeoutExpired as exc:
        p.kill()
        pytest.fail(f"no exit 60 s after {sig.name}: {(exc.output or b'')[-3000:]!r}")
    took = time.monotonic() - t0
    assert p.returncode == 0, out[-3000:]
    assert took < 15, f"graceful stop took {took:.1f}s"
    assert "interrupted" in out and "Traceback" not in out
    assert (run_dir / "checkpoint.pt").exists()
    acct = json.loads((run_dir / "accounting.json").read_text())
    assert acct["balanced"] and acct["appended"] > 0, acct
    watch.stop()
    assert_nothing_left(watch)


@pytest.mark.slow
def test_killed_run_resumes_with_its_counters(tmp_path):
    """SIGKILL the whole `apexq train` mid-run, then `--resume`: counters go on from the checkpoint."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    args = short_run_args(run_dir, 300)
    p = subprocess.Popen(
        [sys.executable, "-m", "apexq.cluster.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ckpt = run_dir / "checkpoint.pt"
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        state = json.loads((run_dir / "state.json").read_text()) if (run_dir / "state.json").exists() else {}
        if ckpt.exists() and state.get("env_steps", 0) > 0:
            import torch

            saved = torch.load(ckpt, weights_only=True)
            if saved["updates"] > 0:
                break
        time.sleep(1)
    else:
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail("no checkpoint with updates appeared")
    os.killpg(p.pid, signal.SIGKILL)  # the driver and everything in its session
    p.wait()
    saved = torch.load(ckpt, weights_only=True)
    before_updates = saved["updates"]
    before_steps = json.loads((run_dir / "state.json").read_text())["env_steps"]
    before_time = json.loads((run_dir / "state.json").read_text())["time_s"]
    r = apexq("train", "--resume", str(run_dir), "--set", f"train.max_seconds={before_time + 25}", timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = [x for x in records if x["time_s"] > before_time]
    assert resumed, "no records after the resume"
    assert all(x["updates"] >= before_updates for x in resumed)
    assert all(x["env_steps"] >= before_steps for x in resumed) and resumed[-1]["env_steps"] > before_steps
    assert resumed[-1]["updates"] > before_updates
    final = torch.load(ckpt, weights_only=True)
    assert final["updates"] > before_updates


@pytest.mark.slow
def test_killed_single_process_run_resumes_with_its_counters(tmp_path):
    """--single-process checkpoints periodically too; SIGKILLed, it resumes its counters."""
    import torch

    run_dir = tmp_path / "run"
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    p = subprocess.Popen(
        [sys.executable, "-m", "apexq.cluster.cli", *short_run_args(run_dir, 300), "--single-process"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ckpt = run_dir / "checkpoint.pt"
    deadline = time.monotonic() + 120
    saved = None
    while time.monotonic() < deadline:
        if ckpt.exists():
            saved = torch.load(ckpt, weights_only=True)
            if saved["updates"] > 0 and saved["extra"].get("env_steps", 0) > 0:
                break
        time.sleep(0.5)
    else:
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail("no periodic checkpoint with updates appeared")
    os.killpg(p.pid, signal.SIGKILL)  # the run and its policy-export helper
    p.wait()
    saved = torch.load(ckpt, weights_only=True)
    before_updates, before_steps = saved["updates"], saved["extra"]["env_steps"]
    before_time = saved["extra"]["time_s"]
    assert before_time > 0
    r = apexq(
        "train",
        "--resume",
        str(run_dir),
        "--single-process",
        "--set",
        f"train.max_seconds={before_time + 12}",
        timeout=240,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = records[[i for i, x in enumerate(records) if x["updates"] >= before_updates][0] :]
    resumed = [x for x in resumed if x["time_s"] > before_time]
    assert resumed, "no records after the resume"
    assert all(x["updates"] >= before_updates and x["env_steps"] >= before_steps for x in resumed)
    assert resumed[-1]["env_steps"] > before_steps and resumed[-1]["updates"] > before_updates
    # the single-process run writes the distributed run's records (one driver loop): its fields, a final one
    for key in (
        "episodes",
        "rejected",
        "restarts",
        "first_env_step_s",
        "first_update_s",
        "sample_waits",
        "insert_waits",
        "backpressure_waits",
        "eval_time_s",
        "actor_weights_versions",
    ):
        assert key in resumed[-1], key
    assert records[-1].get("final") is True and records[-1]["episodes"] > 0
    final = torch.load(ckpt, weights_only=True)
    assert final["updates"] > before_updates and final["extra"]["env_steps"] > before_steps
    assert final["extra"]["time_s"] > before_time
    assert (run_dir / "policy.pt2").exists()


def test_bad_input_at_every_door_is_one_line(tmp_path, redis_server):
    import socket

    cases = []
    closed = socket.socket()  # bound, never listening: nothing can answer on this port during the test
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    cases.append(
        (
            ["train", "--redis-url", f"redis://:pw@127.0.0.1:{port}/0", "--run-dir", str(tmp_path / "a")],
            "apexq: error: cannot reach Redis at redis://:***@127.0.0.1",
        )
    )
    wrong = redis_server.url.replace(redis_server.password, "wrong")
    cases.append(
        (
            ["train", "--redis-url", wrong, "--run-dir", str(tmp_path / "b")],
            "apexq: error: Redis at redis://apexq:***@127.0.0.1",
        )
    )
    blocker = tmp_path / "a-file"  # a run directory that cannot be created (tests run as root,
    blocker.write_text("x")  # so permissions would not stop it)
    cases.append((["train", "--run-dir", str(blocker / "run")], "apexq: error: --run-dir"))
    bad = tmp_path / "badrun"
    bad.mkdir()
    (bad / "config.yaml").write_text("seed: 0\n")
    (bad / "checkpoint.pt").write_bytes(b"garbage")
    cases.append((["train", "--resume", str(bad)], "apexq: error: --resume: "))
    cases.append((["train", "--resume", str(tmp_path / "nothing")], "apexq: error: --resume"))
    cases.append((["train", "--config", str(tmp_path / "missing.yaml")], "apexq: error: --config"))
    (tmp_path / "broken.yaml").write_text("actors: [unclosed\n")
    cases.append((["train", "--config", str(tmp_path / "broken.yaml")], "apexq: error: --config"))
    cases.append((["evaluate", str(bad)], "apexq: error: "))
    for args, prefix in cases:
        r = apexq(*args, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, (args, r.stdout[-500:], r.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith(prefix), (args, r.stderr)
    assert (bad / "checkpoint.pt").read_bytes() == b"garbage"  # nothing already stored was touched
    closed.close()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 MiB tmpfs: a disk that can really fill up (needs mount rights, as root in CI)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:  # CI runs as root and can: there a failed mount fails the test
        from needs import unavailable

        unavailable(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(path: Path) -> Path:
    """Write a file until the disk is full."""
    filler = path / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


@pytest.mark.slow
def test_full_disk_stops_the_run_with_one_line_and_keeps_what_was_stored(tiny_disk):
    """The run directory's disk fills mid-run: one clear error line, non-zero exit, no traceback; the
    last checkpoint and every metrics line already written stay intact, and the run resumes once
    there is space again."""
    run_dir = tiny_disk / "run"
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "apexq.cluster.cli",
            *short_run_args(run_dir, 200),
            "--set",
            "learner.checkpoint_every_s=2",
            "--set",
            "train.progress_every_s=1",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        import torch

        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            ckpt = run_dir / "checkpoint.pt"
            if ckpt.exists() and torch.load(ckpt, weights_only=True)["updates"] > 0:
                break
            time.sleep(1)
        else:
            pytest.fail("no checkpoint with updates appeared")
        filler = fill(tiny_disk)
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("apexq: error:")]
    assert len(errors) == 1 and "No space left on device while writing" in errors[0], out[-3000:]
    assert f"apexq train --resume {run_dir}" in errors[0]
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)  # whole, not a torn write
    assert saved["updates"] > 0
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert lines and all(json.loads(line) for line in lines)  # no half-written record
    assert not list(run_dir.glob("*.tmp"))
    # space again: the run goes on from its checkpoint
    filler.unlink()
    last_time = json.loads(lines[-1])["time_s"]
    r = apexq("train", "--resume", str(run_dir), "--set", f"train.max_seconds={last_time + 12}", timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["updates"] > saved["updates"]
