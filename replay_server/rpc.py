"""Sampling a standalone shard through Redis: the transport of ``apexq replay-server``.

A shard running outside Ray (``apexq replay-server --redis-url URL --shard K``) is reached
through the same password-protected (optionally TLS) Redis its actors append to, so it needs
no port, credentials or service discovery of its own:

* requests go onto the list ``apexq:<ns>:shard:<K>:rpc`` (RPUSH, served FIFO by BLPOP);
  priority updates onto ``...:shard:<K>:prio``, served by a second thread so a sample that
  waits on the rate limiter never delays them; both lists are trimmed to the newest
  ``MAX_QUEUED`` entries so a stopped server cannot make Redis grow;
* a reply goes onto the requester's own list ``...:shard:<K>:reply:<client id>`` (expiring
  after a minute) and names the request id, so a late reply to an abandoned call is skipped.

Every message is ``MAGIC | uint32 header length | JSON header | raw little-endian arrays`` whose
dtypes and shapes follow from the header and are checked exactly: nothing is unpickled, and a
malformed or forged message is dropped, counted by reason and logged once per reason.
"""
from __future__ import annotations

import json
import logging
import struct
import threading
import time
import uuid
from typing import Optional

import numpy as np
import redis

from .connection import RETRYABLE, connect, with_backoff
from .keys import Keys

log = logging.getLogger(__name__)

MAGIC = b"AQR1"
MAX_HEADER = 4096
MAX_ITEMS = 1 << 22
MAX_QUEUED = 1000
REPLY_TTL_MS = 60_000


class RpcError(ValueError):
    """A message that does not decode; ``reason`` is a short tag for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def encode(header: dict, arrays: tuple = ()) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([MAGIC, struct.pack("<I", len(h)), h] + [np.ascontiguousarray(a).tobytes() for a in arrays])


def decode(data: bytes, layout=None, header_only: bool = False) -> tuple[dict, list]:
    """``(header, arrays)``. ``layout(header)`` gives the expected ``[(dtype, shape), ...]`` of the payload
    (none without it); ``header_only`` skips the payload."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < 8 or data[:4] != MAGIC:
        raise RpcError("bad_magic")
    (hlen,) = struct.unpack_from("<I", data, 4)
    if hlen > MAX_HEADER or 8 + hlen > len(data):
        raise RpcError("bad_header_length", str(hlen))
    try:
        header = json.loads(bytes(data[8:8 + hlen]))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RpcError("bad_header_json") from None
    if not isinstance(header, dict):
        raise RpcError("bad_header_json", "not an object")
    if header_only:
        return header, []
    spec = layout(header) if layout else []
    need = sum(int(np.dtype(dt).itemsize * np.prod(shape)) for dt, shape in spec)
    if len(data) - 8 - hlen != need:
        raise RpcError("bad_payload_length", f"{len(data) - 8 - hlen} bytes, expected {need}")
    arrays, off = [], 8 + hlen
    for dt, shape in spec:
        a = np.frombuffer(data, dtype=dt, count=int(np.prod(shape)), offset=off).reshape(shape)
        arrays.append(a)
        off += a.nbytes
    return header, arrays


def _int_field(header: dict, name: str, lo: int, hi: int) -> int:
    v = header.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise RpcError(f"bad_{name}", repr(v)[:40])
    return v


def _sample_layout(obs_dim: int):
    def layout(h: dict):
        n = _int_field(h, "n", 0, MAX_ITEMS) if h.get("ok", True) else 0
        return [("<i8", (n,)), ("<f4", (n, obs_dim)), ("<i4", (n,)), ("<f4", (n,)), ("<f4", (n,)),
                ("<f4", (n, obs_dim)), ("<f8", (n,))]
    return layout


def _prio_layout(h: dict):
    n = _int_field(h, "n", 0, MAX_ITEMS)
    return [("<i8", (n,)), ("<f4", (n,))]


SAMPLE_COLUMNS = ("keys", "obs", "action", "ret", "discount", "next_obs", "prob")


class ShardRpcServer:
    """Serves ``sample`` / ``stats`` requests and priority updates for one in-process shard."""

    def __init__(self, shard, redis_url: str, namespace: str):
        self.shard = shard
        self.k = shard.spec.shard_id
        self.keys = Keys(namespace)
        self.rpc_key = self.keys.rpc(self.k)
        self.prio_key = self.keys.prio(self.k)
        self.reply_prefix = self.keys.reply(self.k, "")
        self.redis_url = redis_url
        self.counters = {"requests": 0, "priority_messages": 0}
        self.rejected: dict[str, int] = {}
        self._logged: set[str] = set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> "ShardRpcServer":
        for name, key, handler in (("rpc", self.rpc_key, self._serve_request),
                                   ("prio", self.prio_key, self._serve_priorities)):
            t = threading.Thread(target=self._loop, args=(key, handler), name=f"shard-{self.k}-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)

    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def stats(self) -> dict:
        return {"rpc_requests": self.counters["requests"], "rpc_priority_messages": self.counters["priority_messages"],
                "rpc_rejected": dict(self.rejected), "rpc_rejected_total": sum(self.rejected.values())}

    def _loop(self, key: str, handler) -> None:
        client = connect(self.redis_url)
        while not self._stop.is_set():
            try:
                item = with_backoff(lambda: client.blpop([key], timeout=1), what=f"shard {self.k} rpc",
                                    stop=self._stop.is_set)
            except RETRYABLE:
                continue
            if item is None:
                continue
            try:
                handler(client, item[1])
            except RpcError as exc:
                self._reject(exc)
            except RETRYABLE as exc:  # the reply is lost with Redis; the caller times out and retries
                log.warning("shard %d: reply failed (%s)", self.k, exc)

    def _reject(self, exc: RpcError) -> None:
        self.rejected[exc.reason] = self.rejected.get(exc.reason, 0) + 1
        if exc.reason not in self._logged:
            self._logged.add(exc.reason)
            log.warning("shard %d: rejected an rpc message (%s); further ones with this reason are only counted",
                        self.k, exc)

    def _serve_priorities(self, client, data: bytes) -> None:
        header, (keys, pr) = decode(data, _prio_layout)
        self.counters["priority_messages"] += 1
        self.shard.update_priorities(keys, pr)

    def _serve_request(self, client, data: bytes) -> None:
        header, _ = decode(data)
        op, reply, rid = header.get("op"), header.get("reply"), header.get("id")
        if not isinstance(reply, str) or not reply.startswith(self.reply_prefix) or len(reply) > 200:
            raise RpcError("bad_reply_key", repr(reply)[:60])
        if not isinstance(rid, str) or len(rid) > 64:
            raise RpcError("bad_id")
        expires = header.get("expires")
        if not isinstance(expires, (int, float)) or isinstance(expires, bool):
            raise RpcError("bad_expires")
        if time.time() > expires:  # the caller gave up on this one
            return
        self.counters["requests"] += 1
        if op == "sample":
            n = _int_field(header, "n", 1, MAX_ITEMS)
            wait = header.get("timeout")
            wait = float(wait) if isinstance(wait, (int, float)) and not isinstance(wait, bool) else 1.0
            res = self.shard.sample(n, min(max(wait, 0.0), 10.0))
            if res is None:
                msg = encode({"id": rid, "ok": False})
            else:
                head = {"id": rid, "ok": True, "n": int(len(res["keys"])), "total": float(res["total"]),
                        "size": int(res["size"])}
                layout = _sample_layout(self.shard.spec.obs_dim)(head)  # the dtypes the client checks
                msg = encode(head, tuple(np.asarray(res[c], dt) for c, (dt, _) in zip(SAMPLE_COLUMNS, layout)))
        elif op == "stats":
            st = {**self.shard.stats(), **self.stats()}
            msg = encode({"id": rid, "ok": True, "stats": st})
        else:
            raise RpcError("bad_op", repr(op)[:40])
        pipe = client.pipeline(transaction=False)
        pipe.rpush(reply, msg)
        pipe.pexpire(reply, REPLY_TTL_MS)
        pipe.execute()


class RedisShardClient:
    """The learner's view of a standalone shard (same methods as a Ray shard proxy)."""

    def __init__(self, redis_url: str, namespace: str, shard: int, obs_dim: int):
        self.redis_url, self.namespace, self.shard, self.obs_dim = redis_url, namespace, shard, obs_dim
        self._client: Optional[redis.Redis] = None
        self._keys = Keys(namespace)
        self._layout = _sample_layout(obs_dim)
        self._lock = threading.Lock()
        self._reply = self._keys.reply(shard, uuid.uuid4().hex)

    def __getstate__(self):  # picklable for Ray: a fresh connection on the other side
        return {"redis_url": self.redis_url, "namespace": self.namespace, "shard": self.shard, "obs_dim": self.obs_dim}

    def __setstate__(self, state):
        self.__init__(**state)

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = connect(self.redis_url)
        return self._client

    def _push(self, key: str, msg: bytes) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.rpush(key, msg)
        pipe.ltrim(key, -MAX_QUEUED, -1)
        pipe.execute()

    def _call(self, header: dict, wait: float, layout=None) -> tuple[dict, list]:
        with self._lock:  # one reply list per client: calls take turns
            rid = uuid.uuid4().hex
            self._push(self._keys.rpc(self.shard), encode(
                {**header, "id": rid, "reply": self._reply, "expires": time.time() + wait}))
            deadline = time.monotonic() + wait
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"replay shard {self.shard} did not answer within {wait:.0f}s "
                                       f"(is `apexq replay-server --shard {self.shard}` running?)")
                item = self.client.blpop([self._reply], timeout=min(5, max(1, int(np.ceil(left)))))
                if item is None:
                    continue
                head, _ = decode(item[1], header_only=True)
                if head.get("id") != rid:
                    continue  # a late reply to a call that already timed out
                return decode(bytearray(item[1]), layout) if layout else (head, [])  # writable arrays

    def sample(self, n: int, timeout: float = 1.0) -> Optional[dict]:
        head, arrays = self._call({"op": "sample", "n": int(n), "timeout": float(timeout)}, timeout + 10.0, self._layout)
        if not head.get("ok"):
            return None
        out = dict(zip(SAMPLE_COLUMNS, arrays))
        out.update(total=float(head["total"]), size=int(head["size"]), shard=self.shard)
        return out

    def update_priorities(self, keys, priorities) -> None:
        keys = np.asarray(keys, "<i8")
        self._push(self._keys.prio(self.shard), encode({"n": int(keys.size)}, (keys, np.asarray(priorities, "<f4"))))

    def stats(self, timeout: float = 10.0) -> dict:
        head, _ = self._call({"op": "stats"}, timeout)
        return head["stats"]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
