"""Hostile messages against a running `apexq replay-server`, sent through Redis as anyone with the
password could: each is dropped and counted by reason, and the server goes on answering."""

import json
import struct
import threading
import time
import uuid

import numpy as np
import pytest
import redis
from test_replay_server import block, start_server, wait_for  # noqa: E402 (the same server and blocks)

from apexq.replay_server.client import StreamWriter
from apexq.replay_server.codec import MAX_PRIORITY, encode_block
from apexq.replay_server.keys import Keys
from apexq.replay_server.rpc import RedisShardClient, ShardRpcServer, decode, encode
from apexq.replay_server.rpc_messages import MAGIC

NS = "hx"
K = Keys(NS)


def raw(header_json: str, payload: bytes = b"") -> bytes:
    h = header_json.encode()
    return MAGIC + struct.pack("<I", len(h)) + h + payload


def request(reply: str, **fields) -> str:
    h = {"op": "sample", "id": uuid.uuid4().hex, "reply": reply, "expires": time.time() + 60, "n": 4, "timeout": 1.0}
    h.update(fields)
    return json.dumps(h)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (clock ticks of 1/100 s)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def rejected(client) -> dict:
    return client.stats()["rpc_rejected"]


def test_hostile_messages_are_dropped_and_the_server_keeps_answering(redis_server):
    p, _ = start_server(redis_server.url, ns=NS)
    attacker = redis.Redis.from_url(redis_server.url)  # the components' user: what a leaked password allows
    admin = redis.Redis.from_url(redis_server.admin_url)
    client = RedisShardClient(redis_server.url, NS, 0, obs_dim=2)
    evil = K.reply(0, "evil")
    try:
        # 1. NaN timeout with a count the empty shard can never serve (the limiter needs 100 items): this
        # once spun the rpc thread at 100% forever. Sent with a valid but unservable request after it,
        # which waits its 2 s and gets "not ready".
        c0 = cpu_seconds(p.pid)
        attacker.rpush(
            K.rpc(0),
            raw(request(evil, n=500).replace('"timeout": 1.0', '"timeout": NaN')),
            raw(request(evil, n=500, timeout=2.0, id="wait")),
        )
        time.sleep(3.0)
        assert cpu_seconds(p.pid) - c0 < 1.0, "the server burns CPU on an unservable request"
        replies = [decode(m, header_only=True)[0] for m in admin.lrange(evil, 0, -1)]
        assert [r.get("error") for r in replies] == ["bad_timeout", None] and replies[1] == {"id": "wait", "ok": False}
        admin.delete(evil)
        assert rejected(client) == {"bad_timeout": 1}

        w = StreamWriter(redis_server.url, NS, 0, actor_id=0, maxlen=100, max_backlog=50)
        for i in range(5):
            w.append(block(200, start=i * 200, seq=i))
        assert wait_for(lambda: client.stats()["inserted"] == 1000)

        # 2. 4 KB of nested JSON on both lists; 3. a timeout of 10**400; 4. a huge count (a 158-byte
        # request that asked for a 1.78 MB reply): refused, with a short error reply
        attacker.rpush(
            K.rpc(0),
            raw("[" * 2040 + "]" * 2040),
            raw(request(evil).replace('"timeout": 1.0', '"timeout": 1' + "0" * 400)),
            raw(request(evil, n=10**9, id="huge")),
        )
        attacker.rpush(K.prio(0), raw('{"n": ' + "[" * 2040 + "]" * 2040 + "}"))
        assert wait_for(lambda: rejected(client) == {"bad_timeout": 2, "too_deep": 2, "bad_n": 1}), rejected(client)
        error_reply = admin.lrange(evil, 0, -1)
        assert [decode(m, header_only=True)[0].get("error") for m in error_reply] == ["bad_timeout", "bad_n"]
        assert max(len(m) for m in error_reply) < 200
        admin.delete(evil)

        # 5. a reply key first SET as a string: the push fails with WRONGTYPE, counted, nothing dies
        attacker.set(evil, "taken")
        attacker.rpush(K.rpc(0), raw(request(evil)))
        assert wait_for(lambda: rejected(client).get("reply_failed") == 1)
        assert admin.get(evil) == b"taken"

        # 6. 2,500 distinct sizes (each once made the shard keep n float64s forever): those up to the cap
        # are served, the rest refused; the reply list keeps 2 replies, the server's memory stays put
        admin.delete(evil)
        rss0 = rss_mb(p.pid)
        for lo in range(1, 2501, 500):  # in chunks: a client's request trims the list to its newest 1000
            attacker.rpush(K.rpc(0), *(raw(request(evil, n=n, timeout=0.0)) for n in range(lo, lo + 500)))
            assert wait_for(lambda: admin.llen(K.rpc(0)) == 0, timeout=60)
        assert wait_for(lambda: rejected(client).get("bad_n") == 1 + 2500 - 512, timeout=60), (
            client.stats()["rpc_rejected"],
            client.stats()["rpc_requests"],
        )
        grown = rss_mb(p.pid) - rss0
        print(f"2,500 distinct sizes: server RSS {rss0:.1f} MB -> {rss0 + grown:.1f} MB")
        assert grown < 15, f"RSS grew {grown:.1f} MB"
        assert admin.llen(evil) <= 2 and 0 < admin.pttl(evil) <= 20_000
        assert client.stats()["rpc_requests"] >= 512

        # 7. forged priority 3.4e38: clamped to MAX_PRIORITY; a NaN one refused
        s = client.sample(8)
        attacker.rpush(
            K.prio(0),
            encode({"n": 1}, (s.keys[:1], np.array([3.4e38], "<f4"))),
            encode({"n": 1}, (s.keys[1:2], np.array([np.nan], "<f4"))),
        )
        assert wait_for(lambda: client.stats()["priority_updates_clamped"] == 1)
        st = client.stats()
        assert st["priority_total"] == pytest.approx(MAX_PRIORITY + 999, rel=1e-6)  # alpha 1: bounded mass
        assert st["rpc_rejected"]["bad_priority"] == 1

        # 8. blocks with a reserved flag set or a priority of 3.4e38, straight onto the stream
        good = encode_block(block(4, start=0, seq=9))
        flagged = good[:16] + struct.pack("<I", 1) + good[20:]
        huge = good[:-4] + np.array([3.4e38], "<f4").tobytes()
        attacker.xadd(K.stream(0), {"b": flagged})
        attacker.xadd(K.stream(0), {"b": huge})
        assert wait_for(lambda: client.stats()["rejected"] == {"bad_flags": 1, "priority_too_large": 1})

        # after all of it: still running, still answering a valid request
        assert p.poll() is None
        out = client.sample(64)
        assert out.obs.shape == (64, 2) and client.stats()["size"] == 1000
    finally:
        p.kill()
        p.wait(10)


class SlowShard:
    """A shard whose sample takes ``delay`` seconds and whose stats() fails: a stuck thread and a bug."""

    class spec:
        shard_id, obs_dim = 0, 2

    def __init__(self, delay):
        self.delay = delay

    def sample(self, n, timeout):
        time.sleep(self.delay)

    def stats(self):
        raise KeyError("a bug")

    def update_priorities(self, keys, pr):
        pass


def test_liveness_names_a_stuck_thread_and_a_bug_ends_no_thread(redis_server):
    server = ShardRpcServer(SlowShard(3.0), redis_server.url, NS, max_items=64).start()
    try:
        client = RedisShardClient(redis_server.url, NS, 0, obs_dim=2)
        with pytest.raises(TimeoutError):
            client.stats(timeout=1.0)  # stats() raises inside the server: counted, no reply
        assert wait_for(lambda: server.stats()["rpc_rejected"].get("internal") == 1)
        assert server.problem(stall_s=1.5) is None  # idle threads still beat every second
        time.sleep(1.6)
        assert server.problem(stall_s=1.5) is None
        threading.Thread(target=lambda: client.sample(4, 0.0), daemon=True).start()
        assert wait_for(lambda: server.problem(stall_s=1.5) is not None, timeout=5)
        assert "shard-0-rpc made no progress" in server.problem(stall_s=1.5)
        assert wait_for(lambda: server.problem(stall_s=1.5) is None, timeout=5)  # back once the sample returns
        assert all(t.is_alive() for t in server._threads)
    finally:
        server.stop()
