"""`apexq replay-server`: a shard as its own process (no Ray), sampled through Redis by the learner's client."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import redis

from apexq.replay_server.client import StreamWriter
from apexq.replay_server.codec import Block
from apexq.replay_server.keys import Keys
from apexq.replay_server.rpc import RedisShardClient, decode, encode

SETTINGS = [
    "--set",
    "replay.capacity=4000",
    "--set",
    "replay.min_size_to_sample=100",
    "--set",
    "replay.samples_per_insert=1000",
    "--set",
    "learner.batch_size=64",
    "--set",
    "replay.error_buffer=1000000000",
    "--set",
    "replay.priority_alpha=1.0",
]


def block(n, start, seq):
    obs = np.stack([np.arange(n, dtype=np.float32) + start, np.zeros(n, np.float32)], 1)
    return Block(
        obs=obs,
        action=(np.arange(n) % 3).astype(np.int32),
        ret=np.full(n, -1, np.float32),
        discount=np.full(n, 0.9, np.float32),
        next_obs=obs + 1,
        priority=np.ones(n, np.float32),
        block_seq=seq,
    )


def start_server(url, ns="rs", shard=0):
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "apexq.cluster.cli",
            "replay-server",
            "--redis-url",
            url,
            "--shard",
            str(shard),
            "--namespace",
            ns,
            *SETTINGS,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    line = p.stdout.readline()
    assert "apexq replay-server: shard 0" in line, line + p.stderr.read()
    return p, line


def wait_for(pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_standalone_shard_samples_updates_survives_forgery_and_kill(redis_server):
    p, line = start_server(redis_server.url)
    try:
        w = StreamWriter(redis_server.url, "rs", 0, actor_id=0, maxlen=100, max_backlog=50)
        for i in range(5):
            w.append(block(200, start=i * 200, seq=i))
        client = RedisShardClient(redis_server.url, "rs", 0, obs_dim=2)
        assert wait_for(lambda: client.stats()["inserted"] == 1000)
        s = client.sample(256)
        assert s.obs.shape == (256, 2) and s.obs.dtype == np.float32 and s.keys.dtype == np.int64
        assert s.size == 1000 and s.total == pytest.approx(1000.0 * (1 + 1e-6))
        np.testing.assert_allclose(s.prob, 1 / 1000, rtol=1e-5)  # equal priorities: uniform
        np.testing.assert_array_equal(s.next_obs, s.obs + 1)  # the rows that were written
        np.testing.assert_array_equal(s.action, s.obs[:, 0].astype(np.int64) % 200 % 3)
        assert s.obs[:, 0].min() >= 0 and s.obs[:, 0].max() < 1000

        # a priority update for one item: with alpha 1 its share of the mass is 999/(999+999)
        client.update_priorities(s.keys[:1], np.array([999.0], np.float32))
        assert wait_for(lambda: client.stats()["priority_updates"] == 1)
        many = np.concatenate([client.sample(512).keys for _ in range(4)])  # 512: the server's cap (64 x 8)
        share = np.mean(many == s.keys[0])
        assert 0.45 < share < 0.55

        # forged and malformed messages are dropped with a reason; the shard keeps answering
        keys = Keys("rs")
        r = redis.Redis.from_url(redis_server.url)
        r.rpush(
            keys.rpc(0),
            b"garbage",
            b"AQR1\xff\xff\xff\xff",
            encode({"op": "sample", "id": "x", "reply": "apexq:elsewhere", "expires": time.time() + 60, "n": 3}),
            encode({"op": "flushall", "id": "x", "reply": keys.reply(0, "x"), "expires": time.time() + 60}),
        )
        r.rpush(keys.prio(0), encode({"n": 5}, (np.zeros(3, "<i8"), np.zeros(3, "<f4"))))
        assert wait_for(lambda: client.stats()["rpc_rejected_total"] == 5)
        st = client.stats()
        assert set(st["rpc_rejected"]) == {
            "bad_magic",
            "bad_header_length",
            "bad_reply_key",
            "bad_op",
            "bad_payload_length",
        }
        assert client.sample(16).obs.shape == (16, 2) and st["size"] == 1000
        assert not r.exists("apexq:elsewhere")  # nothing written outside this shard's reply lists
        # a request with a good reply key and id learns why it was refused
        admin = redis.Redis.from_url(redis_server.admin_url)  # LPOP is not a client command
        assert decode(admin.lpop(keys.reply(0, "x")), header_only=True)[0] == {
            "id": "x",
            "ok": False,
            "error": "bad_op",
        }

        # kill -9: a restarted server rebuilds every acknowledged transition from the stream
        p.kill()
        p.wait(10)
        p, line = start_server(redis_server.url)
        assert "rebuilt 1000 transitions" in line
        assert client.stats()["size"] == 1000
        # SIGTERM: a clean stop, exit 0
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=20)
        assert p.returncode == 0, err
        assert "stopped | size 1000" in out
    finally:
        if p.poll() is None:
            p.kill()


def test_sample_times_out_clearly_without_a_server(redis_server):
    client = RedisShardClient(redis_server.url, "nobody", 0, obs_dim=2)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="replay shard 0 did not answer.*apexq replay-server --shard 0"):
        client.stats(timeout=1.0)
    assert time.monotonic() - t0 < 5
    # requests to a missing server do not pile up without bound
    for _ in range(1100):
        client.update_priorities(np.zeros(1, np.int64), np.ones(1, np.float32))
    assert (
        redis.Redis.from_url(redis_server.admin_url).llen(Keys("nobody").prio(0)) == 1000
    )  # (LLEN: not a client command)


def test_bad_arguments_one_line(redis_server):
    for argv, msg in (
        (["--shard", "3"], "--shard: must be between 0 and replay.shards-1=0, got 3"),
        (["--shard", "0"], "--namespace: give the run's namespace"),
        (["--shard", "0", "--namespace", "x", "--set", "replay.capacity=-1"], "replay.capacity"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "apexq.cluster.cli", "replay-server", "--redis-url", redis_server.url, *argv],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_training_run_with_a_standalone_shard(redis_server, tmp_path):
    """apexq train with replay.external: the run starts no shard; the learner samples the replay-server."""
    p, _ = start_server(redis_server.url, ns="ext")
    try:
        env = {**os.environ, "PYTHONPATH": os.getcwd()}
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "apexq.cluster.cli",
                "train",
                "--redis-url",
                redis_server.url,
                "--run-dir",
                str(tmp_path / "run"),
                *SETTINGS,
                "--set",
                "replay.external=true",
                "--set",
                "replay.namespace=ext",
                "--set",
                "train.max_seconds=25",
                "--set",
                "actors.num=1",
                "--set",
                "actors.envs_per_actor=8",
                "--set",
                "eval.every_seconds=0",
                "--set",
                "ray.num_cpus=2",
            ],
            capture_output=True,
            text=True,
            timeout=240,
            env=env,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert "-> balanced" in r.stdout, r.stdout
        import json

        recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert recs[-1]["updates"] > 0 and recs[-1]["transitions_inserted"] > 0 and recs[-1]["replay_size"] > 0
        assert p.poll() is None  # the run leaves the operator's shard running
        placement = json.loads((tmp_path / "run" / "placement.json").read_text())
        assert {x["kind"] for x in placement} == {"actor", "learner"}
    finally:
        p.kill()
        p.wait(10)
