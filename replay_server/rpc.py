"""Sampling a standalone shard through Redis: the transport of ``apexq replay-server``.

A shard running outside Ray (``apexq replay-server --redis-url URL --shard K``) is reached
through the same password-protected (optionally TLS) Redis its actors append to, so it needs
no port, credentials or service discovery of its own:

* requests go onto the list ``apexq:<ns>:shard:<K>:rpc`` (RPUSH, served FIFO by BLPOP);
  priority updates onto ``...:shard:<K>:prio``, served by a second thread so a sample that
  waits on the rate limiter never delays them; both lists are trimmed to the newest
  ``MAX_QUEUED`` entries so a stopped server cannot make Redis grow;
* a reply goes onto the requester's own list ``...:shard:<K>:reply:<client id>`` (kept to its
  newest ``REPLY_KEEP`` entries, expiring after ``REPLY_TTL_MS``) and names the request id, so
  a late reply to an abandoned call is skipped.

The messages and their parser are :mod:`replay_server.rpc_messages`. One message never ends a
serving thread: a message the parser refuses is dropped and counted by reason (a request with a
good reply key and id gets ``{"ok": false, "error": reason}`` back), a Redis error on a reply
(say the key was SET as a string: WRONGTYPE) is counted as ``reply_failed``, and anything else
as ``internal``; each reason is logged at most once a minute. Each thread stamps a heartbeat at
every turn of its loop (at least once a second, when idle too), and :meth:`ShardRpcServer.problem`
names a thread that died or has not come back to its loop for ``STALL_S`` seconds, so the CLI
exits and a supervisor restarts the process.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, Optional

import numpy as np
import redis

from apexq.core.batch import SAMPLE_COLUMNS, SampleBatch
from apexq.core.connection import RETRYABLE, connect, with_backoff

from .keys import Keys
from .rpc_messages import (
    MAX_ITEMS,
    MAX_TIMEOUT,
    RpcError,
    decode,
    encode,
    parse_priorities,
    parse_request,
    prio_layout,
    sample_layout,
)

log = logging.getLogger(__name__)

__all__ = ["RpcError", "encode", "decode", "ShardRpcServer", "RedisShardClient"]
_sample_layout, _prio_layout = sample_layout, prio_layout  # the names benchmarks/learner.py uses
MAX_QUEUED = 1000
REPLY_TTL_MS = 20_000  # an abandoned reply goes after this (a caller waits at most MAX_TIMEOUT + 10 s)
REPLY_KEEP = 2  # replies kept on one reply list: the current call's and one late one
STALL_S = 30.0  # a serving thread away from its loop this long is stuck (one turn: a sample
# waits <= MAX_TIMEOUT, a Redis call times out after 10 s)
LOG_EVERY_S = 60.0  # each rejection reason is logged at most this often


class ShardRpcServer:
    """Serves ``sample`` / ``stats`` requests and priority updates for one in-process shard.

    ``max_items`` bounds the items of one request and of one priority update (the learner's
    ``batch_size * batches_per_request``; at most ``MAX_ITEMS``), and so the size of one reply.
    """

    def __init__(self, shard, redis_url: str, namespace: str, max_items: int):
        self.shard = shard
        self.k = shard.spec.shard_id
        self.keys = Keys(namespace)
        self.rpc_key = self.keys.rpc(self.k)
        self.prio_key = self.keys.prio(self.k)
        self.reply_prefix = self.keys.reply(self.k, "")
        self.redis_url = redis_url
        self.max_items = max(1, min(int(max_items), MAX_ITEMS))
        self.counters = {"requests": 0, "priority_messages": 0}
        self.rejected: dict[str, int] = {}
        self._logged: dict[str, float] = {}
        self._count_lock = threading.Lock()
        self._beats: dict[str, float] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> ShardRpcServer:
        for name, key, handler in (
            ("rpc", self.rpc_key, self._serve_request),
            ("prio", self.prio_key, self._serve_priorities),
        ):
            name = f"shard-{self.k}-{name}"
            self._beats[name] = time.monotonic()
            t = threading.Thread(target=self._loop, args=(name, key, handler), name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)

    def problem(self, stall_s: float = STALL_S) -> Optional[str]:
        """Why the server cannot serve (a thread died or is stuck), or None while it can."""
        now = time.monotonic()
        for t in self._threads:
            if not t.is_alive():
                return f"thread {t.name} died"
            if now - self._beats[t.name] > stall_s:
                return f"thread {t.name} made no progress for {now - self._beats[t.name]:.0f}s"
        return None

    def alive(self) -> bool:
        return self.problem() is None

    def stats(self) -> dict:
        with self._count_lock:
            rejected = dict(self.rejected)
        return {
            "rpc_requests": self.counters["requests"],
            "rpc_priority_messages": self.counters["priority_messages"],
            "rpc_rejected": rejected,
            "rpc_rejected_total": sum(rejected.values()),
        }

    def _loop(self, name: str, key: str, handler) -> None:
        client = connect(self.redis_url)
        beats = self._beats

        def waiting() -> bool:  # with_backoff asks between retries: waiting on Redis is no stall
            beats[name] = time.monotonic()
            return self._stop.is_set()

        while not self._stop.is_set():
            beats[name] = time.monotonic()
            try:
                item = with_backoff(lambda: client.blpop([key], timeout=1), what=f"shard {self.k} rpc", stop=waiting)
                if item is not None:
                    handler(client, item[1])
            except RpcError as exc:
                self._reject(exc.reason, exc)
            except RETRYABLE as exc:  # the reply is lost with Redis; the caller times out and retries
                self._reject("redis_unavailable", exc)
            except redis.RedisError as exc:  # e.g. WRONGTYPE: the reply key was made something else
                self._reject("reply_failed", exc)
            except Exception as exc:  # a bug: count it, say it, keep serving
                self._reject("internal", exc, trace=True)

    def _reject(self, reason: str, exc: BaseException, trace: bool = False) -> None:
        now = time.monotonic()
        with self._count_lock:
            n = self.rejected[reason] = self.rejected.get(reason, 0) + 1
            due = now - self._logged.get(reason, -LOG_EVERY_S) >= LOG_EVERY_S
            if due:
                self._logged[reason] = now
        if due:
            what = str(exc) if isinstance(exc, RpcError) else f"{reason}: {type(exc).__name__}: {exc}"
            log.warning(
                "shard %d: dropped an rpc message (%s); %d so far with this reason, logged at most once a minute",
                self.k,
                what[:200],
                n,
                exc_info=exc if trace else None,
            )

    def _serve_priorities(self, client, data: bytes) -> None:
        keys, pr = parse_priorities(data, self.max_items)
        self.counters["priority_messages"] += 1
        self.shard.update_priorities(keys, pr)

    def _serve_request(self, client, data: bytes) -> None:
        try:
            req = parse_request(data, self.reply_prefix, self.max_items)
        except RpcError as exc:
            if exc.answer is None:
                raise
            self._reject(exc.reason, exc)  # the reply key and id were good: tell the requester why
            self._send(client, exc.answer[0], encode({"id": exc.answer[1], "ok": False, "error": exc.reason}))
            return
        if time.time() > req.expires:  # the caller gave up on this one
            return
        self.counters["requests"] += 1
        if req.op == "sample":
            res = self.shard.sample(req.n, req.timeout)
            if res is None:
                msg = encode({"id": req.id, "ok": False})
            else:
                head = {
                    "id": req.id,
                    "ok": True,
                    "n": int(len(res.keys)),
                    "total": float(res.total),
                    "size": int(res.size),
                }
                layout = sample_layout(self.shard.spec.obs_dim)(head)  # the dtypes the client checks
                msg = encode(head, tuple(np.asarray(getattr(res, c), dt) for c, (dt, _) in zip(SAMPLE_COLUMNS, layout)))
        else:
            msg = encode({"id": req.id, "ok": True, "stats": {**self.shard.stats(), **self.stats()}})
        self._send(client, req.reply, msg)

    def _send(self, client, reply: str, msg: bytes) -> None:
        pipe = client.pipeline(transaction=False)
        pipe.rpush(reply, msg)
        pipe.ltrim(reply, -REPLY_KEEP, -1)
        pipe.pexpire(reply, REPLY_TTL_MS)
        pipe.execute()


class RedisShardClient:
    """The learner's view of a standalone shard (an :class:`apexq.core.interfaces.Shard`)."""

    in_process = False
    nonblocking_priorities = False  # update_priorities pushes onto a Redis list: a round trip

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
            self._push(
                self._keys.rpc(self.shard),
                encode({**header, "id": rid, "reply": self._reply, "expires": time.time() + wait}),
            )
            deadline = time.monotonic() + wait
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"replay shard {self.shard} did not answer within {wait:.0f}s "
                        f"(is `apexq replay-server --shard {self.shard}` running?)"
                    )
                # (key, value) as bytes: the client is made without decode_responses
                item: Any = self.client.blpop([self._reply], timeout=min(5, max(1, int(np.ceil(left)))))
                if item is None:
                    continue
                head, _ = decode(item[1], header_only=True)
                if head.get("id") != rid:
                    continue  # a late reply to a call that already timed out
                if head.get("error"):
                    raise RpcError(str(head["error"])[:40], f"replay shard {self.shard} refused {header}")
                return decode(bytearray(item[1]), layout) if layout else (head, [])  # writable arrays

    def sample(self, n: int, timeout: float = 1.0) -> Optional[SampleBatch]:
        timeout = min(float(timeout), MAX_TIMEOUT)  # the longest wait a server grants
        head, arrays = self._call({"op": "sample", "n": int(n), "timeout": timeout}, timeout + 10.0, self._layout)
        if not head.get("ok"):
            return None
        return SampleBatch._make((*arrays, float(head["total"]), int(head["size"]), self.shard))

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
