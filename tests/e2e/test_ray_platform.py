"""Which Ray `apexq train` uses, and the learner's GPU request, against a real `ray start --head`.

One head for the module, with Ray's default (token) authentication and its own temp folder, so
its `ray_current_cluster` address file is where Ray looks for the processes given that folder.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from ray_head import RayHead

ROOT = Path(__file__).resolve().parents[2]
SHORT = [
    "--set",
    "train.max_seconds=8",
    "--set",
    "metrics.port=0",
    "--set",
    "eval.every_seconds=0",
    "--set",
    "replay.min_size_to_sample=500",
    "--set",
    "actors.envs_per_actor=8",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head():
    h = RayHead(num_cpus=4).start()
    yield h
    h.stop()


def apexq(args, env, timeout=240):
    """`apexq train ARGS` as a user runs it: (exit status, stdout, stderr, seconds)."""
    t = time.monotonic()
    p = subprocess.Popen(
        [sys.executable, "-m", "apexq.cluster.cli", "train", *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"apexq train did not finish in {timeout} s:\n{out[-2000:]}\n{err[-2000:]}") from None
    return p.returncode, out, err, time.monotonic() - t


def first_apexq_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("apexq:"))


def one_error_line(err: str) -> str:
    """The single `apexq: error:` line of stderr; no traceback."""
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("apexq: error:")]
    assert len(errors) == 1, err[-3000:]
    return errors[0]


def test_address_finds_the_token_where_ray_looks(head, tmp_path):
    env = dict(head.env, HOME=str(head.home))  # the token only in RAY_AUTH_TOKEN_PATH; RAY_AUTH_MODE unset
    code, out, err, _ = apexq(["--address", head.address, "--run-dir", str(tmp_path / "run"), *SHORT], env)
    assert code == 0, out[-2000:] + err[-2000:]
    assert first_apexq_line(out) == (
        f"apexq: joined the Ray cluster at {head.address} (from --address; token "
        f"authentication with the token in RAY_AUTH_TOKEN_PATH ({head.token_path}))"
    )
    assert "apexq: done (reached train.max_seconds)" in out


def test_address_without_a_token_says_what_to_set(head, tmp_path):
    env = {k: v for k, v in head.env.items() if k != "RAY_AUTH_TOKEN_PATH"}
    env["HOME"] = str(head.home)  # no ~/.ray/auth_token there
    code, out, err, took = apexq(["--address", head.address, "--run-dir", str(tmp_path / "a"), *SHORT], env)
    assert code == 2 and took < 30, (code, took, err[-2000:])
    assert one_error_line(err) == (
        f"apexq: error: the Ray cluster at {head.address} (--address) requires token authentication and no token was "
        "found: put the cluster's token (`ray get-auth-token` on its head prints it) in ~/.ray/auth_token, or in "
        "RAY_AUTH_TOKEN or a file named by RAY_AUTH_TOKEN_PATH, and set RAY_AUTH_MODE=token"
    )
    env["RAY_AUTH_TOKEN"] = "0" * 64  # a wrong token: named, never printed
    code, out, err, took = apexq(["--address", head.address, "--run-dir", str(tmp_path / "b"), *SHORT], env)
    assert code == 2 and took < 30, (code, took, err[-2000:])
    line = one_error_line(err)
    assert (
        line.startswith(
            f"apexq: error: the Ray cluster at {head.address} (--address) rejected the token in RAY_AUTH_TOKEN: "
        )
        and "0" * 64 not in err + out
    )


def test_plain_train_starts_its_own_ray_beside_a_live_or_a_stale_cluster(head, tmp_path):
    """A `ray start` on the machine (live), then the address file a killed Ray left (stale)."""
    stale = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's sockets go below it
    (stale / "ray").mkdir()
    from apexq.cluster.redis_server import free_port

    dead = f"127.0.0.1:{free_port()}"
    (stale / "ray" / "ray_current_cluster").write_text(dead)
    try:
        for tmpdir, named in ((head.tmp, head.address), (stale, dead)):
            env = dict(head.env, RAY_TMPDIR=str(tmpdir))
            code, out, err, _ = apexq(
                ["--run-dir", str(tmp_path / f"run-{tmpdir.name}"), "--set", "ray.num_cpus=3", *SHORT], env
            )
            assert code == 0, out[-2000:] + err[-3000:]
            assert first_apexq_line(out) == (
                f"apexq: started a local Ray (3 CPUs); not the cluster at {named} that "
                f"{tmpdir}/ray/ray_current_cluster names (--address auto joins that one)"
            )
            assert "apexq: done (reached train.max_seconds)" in out
    finally:
        shutil.rmtree(stale, ignore_errors=True)


def test_a_learner_that_needs_a_gpu_stops_with_one_line_when_none_comes(head, tmp_path):
    env = dict(head.env, HOME=str(head.home))
    gpu = ["--set", "learner.device=cuda", "--set", "learner.gpu_wait_s=5"]
    code, out, err, took = apexq(["--address", head.address, "--run-dir", str(tmp_path / "a"), *gpu, *SHORT], env)
    assert code == 2 and took < 60, (code, took, out[-2000:], err[-2000:])
    assert "apexq: the learner asks Ray for 1 GPU (learner.device=cuda); the cluster has 0 now" in out
    assert one_error_line(err) == (
        "apexq: error: learner.device=cuda: no GPU for the learner within learner.gpu_wait_s=5s (the cluster has 0 "
        "GPUs); add a GPU node, raise learner.gpu_wait_s, or set learner.device=cpu"
    )
    # a local Ray of apexq's own has no autoscaler: it says so at once
    code, out, err, took = apexq(["--run-dir", str(tmp_path / "b"), "--set", "ray.num_cpus=3", *gpu, *SHORT], env)
    assert code == 2, (code, out[-2000:], err[-2000:])
    assert one_error_line(err) == (
        "apexq: error: learner.device=cuda: this machine has no GPU that Ray sees; set learner.device to auto or "
        "cpu, or join a cluster that has or adds GPU nodes (--address)"
    )
