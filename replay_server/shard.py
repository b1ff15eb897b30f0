"""One replay shard: consumes its Redis stream into an in-memory prioritized ring.

Redis holds the durable log (the stream keeps the shard's whole window); the shard holds the
same transitions in columnar numpy arrays with a sum-tree, because random access inside Redis
is far too slow for sampling. A restarted shard rebuilds itself from the stream.

Items carry stable keys ``epoch << 40 | sequence``; a priority update whose key no longer
matches the slot (the item was evicted, or the shard restarted) is ignored.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import numpy as np
import redis

from .codec import Block, BlockError, decode_block
from .connection import RETRYABLE, connect, with_backoff
from .keys import Keys
from .rate_limiter import SampleToInsertRatio
from .sum_tree import SumTree

log = logging.getLogger(__name__)
SEQ_BITS = 40
SEQ_MASK = (1 << SEQ_BITS) - 1


@dataclass
class ShardSpec:
    shard_id: int
    capacity: int
    obs_dim: int
    num_actions: int
    priority_alpha: float = 0.6
    priority_eps: float = 1e-6
    samples_per_insert: float = 8.0
    min_size_to_sample: int = 1000
    error_buffer: float = 20000.0
    read_count: int = 16


class ReplayShard:
    def __init__(self, spec: ShardSpec, redis_url: str, namespace: str, seed: int = 0):
        self.spec = spec
        self.keys = Keys(namespace)
        self.stream = self.keys.stream(spec.shard_id)
        self.group = self.keys.group(spec.shard_id)
        self.consumer = "consumer"
        self.redis_url = redis_url
        self.rng = np.random.default_rng(seed)
        cap, dim = spec.capacity, spec.obs_dim
        self.obs = np.zeros((cap, dim), np.float32)
        self.next_obs = np.zeros((cap, dim), np.float32)
        self.action = np.zeros(cap, np.int32)
        self.ret = np.zeros(cap, np.float32)
        self.discount = np.zeros(cap, np.float32)
        self.item_keys = np.full(cap, -1, np.int64)
        self.tree = SumTree(cap)
        self.limiter = SampleToInsertRatio(spec.samples_per_insert, spec.min_size_to_sample, spec.error_buffer)
        self.seq = 0
        self.epoch = 0
        self.size = 0
        self.counters: Counter = Counter()
        self.rejected: Counter = Counter()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._logged_reasons: set[str] = set()
        self.redis: Optional[redis.Redis] = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> dict:
        """Connect, rebuild from the stream, and start consuming in a background thread."""
        self.redis = connect(self.redis_url)
        rebuilt = with_backoff(self._rebuild, what=f"shard {self.spec.shard_id} rebuild")
        self._thread = threading.Thread(target=self._ingest_loop, name=f"shard-{self.spec.shard_id}",
                                        daemon=True)
        self._thread.start()
        return {"rebuilt": rebuilt, "epoch": self.epoch}

    def run(self) -> dict:
        """Start (rebuild + consume) and block until :meth:`stop`; returns the final stats."""
        self.start()
        while not self._stop.wait(0.5):
            if not self._thread.is_alive():
                raise RuntimeError(f"shard {self.spec.shard_id}: ingest thread died")
        self._thread.join(timeout=10)
        return self.stats()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _rebuild(self) -> int:
        r = self.redis
        self.epoch = int(r.incr(self.keys.epoch(self.spec.shard_id)))
        try:
            r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            return 0
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        last = "0-0"
        for g in r.xinfo_groups(self.stream):
            if _s(g["name"]) == self.group:
                last = _s(g["last-delivered-id"])
        n = 0
        start = "-"
        while True:
            entries = r.xrange(self.stream, min=start, max=last, count=512)
            if not entries:
                break
            for entry_id, fields in entries:
                n += self._consume(fields, count_insert=False)
            start = "(" + _s(entries[-1][0])
            if _s(entries[-1][0]) == last:
                break
        # delivered-but-unacknowledged entries are now in memory: acknowledge them
        while True:
            pending = r.xpending_range(self.stream, self.group, min="-", max="+", count=1000)
            if not pending:
                break
            r.xack(self.stream, self.group, *[p["message_id"] for p in pending])
        self.counters["rebuilt"] += n
        log.info("shard %d: rebuilt %d transitions from %s (epoch %d)", self.spec.shard_id, n, self.stream, self.epoch)
        return n

    # -- ingest ----------------------------------------------------------------------------

    def _ingest_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.ingest_once()
            except RETRYABLE as exc:
                self.counters["redis_errors"] += 1
                log.warning("shard %d: Redis unavailable (%s); retrying", self.spec.shard_id, exc)
                self._stop.wait(0.5)
            except redis.ResponseError as exc:
                if "NOGROUP" in str(exc):  # Redis lost the stream (restart without persistence)
                    with_backoff(self._rebuild, what="shard rebuild", stop=self._stop.is_set)
                else:
                    log.exception("shard %d: unexpected Redis error", self.spec.shard_id)
                    self._stop.wait(0.5)

    def ingest_once(self, block_ms: int = 100) -> int:
        """Read up to ``read_count`` entries, insert the valid ones, acknowledge all. Returns entries read."""
        with self._cond:
            while not self._stop.is_set() and not self.limiter.can_insert(1, self.size):
                self.counters["insert_waits"] += 1
                self._cond.wait(0.1)
        if self._stop.is_set():
            return 0
        resp = self.redis.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                     count=self.spec.read_count, block=block_ms)
        if not resp:
            return 0
        entries = resp[0][1]
        ids = []
        for entry_id, fields in entries:
            self._consume(fields, count_insert=True)
            ids.append(entry_id)
        self.redis.xack(self.stream, self.group, *ids)
        return len(ids)

    def _consume(self, fields, count_insert: bool) -> int:
        payload = fields.get(b"b") if isinstance(fields, dict) else None
        try:
            block = decode_block(payload, self.spec.obs_dim, self.spec.num_actions)
        except BlockError as err:
            self.rejected[err.reason] += 1
            if err.reason not in self._logged_reasons:
                self._logged_reasons.add(err.reason)
                log.warning("shard %d: rejected a block (%s); further '%s' rejections are only counted",
                            self.spec.shard_id, err, err.reason)
            return 0
        self.insert(block, count_insert=count_insert)
        return len(block)

    def insert(self, block: Block, count_insert: bool = True) -> np.ndarray:
        n = len(block)
        cap = self.spec.capacity
        if n > cap:  # keep the newest `cap` of an oversized block
            block = Block(*(a[-cap:] for a in (block.obs, block.action, block.ret, block.discount,
                                               block.next_obs, block.priority)))
            self.counters["evicted"] += n - cap
            n = cap
        with self._cond:
            seqs = np.arange(self.seq, self.seq + n, dtype=np.int64)
            slots = seqs % cap
            evicted = int(np.count_nonzero(self.item_keys[slots] >= 0))
            self.obs[slots] = block.obs
            self.next_obs[slots] = block.next_obs
            self.action[slots] = block.action
            self.ret[slots] = block.ret
            self.discount[slots] = block.discount
            keys = (np.int64(self.epoch) << SEQ_BITS) | seqs
            self.item_keys[slots] = keys
            prio = (block.priority.astype(np.float64) + self.spec.priority_eps) ** self.spec.priority_alpha
            self.tree.set(slots, prio)
            self.seq += n
            self.size = min(cap, self.size + n)
            self.counters["ingested"] += n
            self.counters["evicted"] += evicted
            if count_insert:
                self.limiter.record_insert(n)
            self._cond.notify_all()
        return keys

    # -- learner side ----------------------------------------------------------------------

    def sample(self, n: int, timeout: float = 1.0) -> Optional[dict]:
        """``n`` items proportional to priority**alpha, or None if the rate limiter held for ``timeout`` s.

        ``prob`` is each item's probability within this shard; ``total`` the shard's priority mass
        (so a caller mixing shards can turn it into a global probability) and ``size`` its item count.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self.limiter.can_sample(n, self.size):
                self.counters["sample_waits"] += 1
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return None
                self._cond.wait(min(left, 0.1))
            slots = self.tree.sample(n, self.rng)
            total = self.tree.total
            prob = self.tree.get(slots) / total
            out = {
                "keys": self.item_keys[slots],
                "obs": self.obs[slots],
                "action": self.action[slots],
                "ret": self.ret[slots],
                "discount": self.discount[slots],
                "next_obs": self.next_obs[slots],
                "prob": prob,
                "total": total,
                "size": self.size,
                "shard": self.spec.shard_id,
            }
            self.limiter.record_sample(n)
            self.counters["sampled"] += n
            self._cond.notify_all()
        return out

    def update_priorities(self, keys, priorities) -> int:
        """Set new priorities (|TD| before eps/alpha) for items still present; returns how many applied."""
        keys = np.asarray(keys, np.int64)
        pr = np.asarray(priorities, np.float64)
        if keys.shape != pr.shape:
            raise ValueError(f"{keys.shape[0]} keys but {pr.shape[0]} priorities")
        ok = np.isfinite(pr) & (pr >= 0)
        slots = (keys & SEQ_MASK) % self.spec.capacity
        with self._cond:
            live = ok & (self.item_keys[slots] == keys)
            self.tree.set(slots[live], (pr[live] + self.spec.priority_eps) ** self.spec.priority_alpha)
            applied = int(live.sum())
            self.counters["priority_updates"] += applied
            self.counters["priority_updates_stale"] += int(keys.size - applied)
        return applied

    def stats(self) -> dict:
        with self._lock:
            return {
                "shard": self.spec.shard_id,
                "size": self.size,
                "capacity": self.spec.capacity,
                "epoch": self.epoch,
                "inserted": self.counters["ingested"],
                "rebuilt": self.counters["rebuilt"],
                "sampled": self.counters["sampled"],
                "evicted": self.counters["evicted"],
                "rejected": dict(self.rejected),
                "rejected_total": sum(self.rejected.values()),
                "insert_waits": self.counters["insert_waits"],
                "sample_waits": self.counters["sample_waits"],
                "priority_updates": self.counters["priority_updates"],
                "priority_updates_stale": self.counters["priority_updates_stale"],
                "redis_errors": self.counters["redis_errors"],
                "priority_total": self.tree.total,
            }

    def ping(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
