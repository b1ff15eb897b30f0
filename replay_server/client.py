"""What actors call: append encoded blocks to a shard's stream, with backpressure."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from apexq.core.connection import connect, with_backoff

from .codec import Block, encode_block
from .keys import Keys


class StreamWriter:
    """Appends blocks to one shard's stream.

    ``maxlen`` bounds the stream (approximate trimming keeps at least that many entries, so
    the shard's whole window stays durable). ``max_backlog`` is the most entries the shard may
    have left unread before :meth:`append` waits: actors slow down instead of Redis growing.
    """

    def __init__(self, redis_url: str, namespace: str, shard: int, actor_id: int, maxlen: int, max_backlog: int):
        self.redis = connect(redis_url)
        self.keys = Keys(namespace)
        self.stream = self.keys.stream(shard)
        self.appended_key = self.keys.appended(shard)
        self.actor_id = actor_id
        self.maxlen = int(maxlen)
        self.max_backlog = int(max_backlog)
        self.blocks = 0
        self.transitions = 0
        self.backpressure_waits = 0
        self.backpressure_seconds = 0.0

    def backlog(self) -> int:
        """Entries in the stream not yet delivered to the shard (0 when unknown)."""
        groups: list[Any] = self.redis.xinfo_groups(self.stream)  # dicts with str or bytes keys
        for g in groups:
            lag = g.get("lag", g.get(b"lag"))
            return int(lag) if lag is not None else 0
        return 0

    def wait_for_room(self, stop: Callable[[], bool] = lambda: False) -> None:
        t0 = None
        while not stop():
            try:
                if self.backlog() < self.max_backlog:
                    break
            except Exception:  # stream or group not there yet: the shard is starting
                break
            if t0 is None:
                t0 = time.monotonic()
                self.backpressure_waits += 1
            time.sleep(0.02)
        if t0 is not None:
            self.backpressure_seconds += time.monotonic() - t0

    def append(self, block: Block, stop: Callable[[], bool] = lambda: False) -> None:
        """Append one block; returns once Redis acknowledged it (retries through Redis restarts)."""
        payload = encode_block(block)
        self.wait_for_room(stop)

        def send():
            pipe = self.redis.pipeline(transaction=True)
            pipe.xadd(self.stream, {b"b": payload}, maxlen=self.maxlen, approximate=True)
            pipe.hincrby(self.appended_key, str(self.actor_id), len(block))
            return pipe.execute()

        with_backoff(send, what=f"actor {self.actor_id} append", stop=stop)
        self.blocks += 1
        self.transitions += len(block)
