"""One replay shard: consumes its Redis stream into an in-memory prioritized ring.

Redis holds the durable log (the stream keeps the shard's whole window); the shard holds the
same transitions in columnar numpy arrays with a sum-tree, because random access inside Redis
is far too slow for sampling. A restarted shard rebuilds itself from the stream.

Items carry stable keys ``epoch << 40 | sequence``; a priority update whose key no longer
matches the slot (the item was evicted, or the shard restarted) is ignored. Priorities above
``codec.MAX_PRIORITY`` are clamped to it, on insert and on update.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import redis

from apexq.core.batch import SampleBatch
from apexq.core.connection import RETRYABLE, connect, with_backoff

from .codec import HEADER_SIZE, MAX_PRIORITY, Block, BlockError, decode_batch, decode_block, transition_nbytes
from .keys import Keys
from .rate_limiter import SampleToInsertRatio
from .sum_tree import SumTree

log = logging.getLogger(__name__)
SEQ_BITS = 40
SEQ_MASK = (1 << SEQ_BITS) - 1


@dataclass(kw_only=True)
class ShardSpec:
    """One shard's settings; cluster/components.py builds them from the config's replay section, whose
    default file (configs/mountaincar.yaml) is the only place their defaults live."""

    shard_id: int
    capacity: int
    obs_dim: int
    num_actions: int
    priority_alpha: float
    priority_eps: float
    samples_per_insert: float
    min_size_to_sample: int
    error_buffer: float
    read_count: int = 16  # stream entries per XREADGROUP (not a config key)


def memory_per_item(obs_dim: int) -> int:
    """Bytes one item takes in a shard, at most: its columns in the ring (obs and next_obs
    float32[obs_dim], action, ret and discount 4 bytes each, an int64 key) and the sum-tree's
    float64 nodes, up to 4 per item (its leaves round up to a power of two)."""
    return 2 * 4 * obs_dim + 3 * 4 + 8 + 4 * 8


class ReplayShard:
    """One shard; to the learner in its process, an :class:`apexq.core.interfaces.Shard` itself."""

    in_process = True
    nonblocking_priorities = False  # update_priorities does its work before it returns

    def __init__(self, spec: ShardSpec, redis_url: str, namespace: str, seed: int):
        self.spec = spec
        self.keys = Keys(namespace)
        self.stream = self.keys.stream(spec.shard_id)
        self.counts_key = self.keys.counts(spec.shard_id)
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
        self._reader: Optional[redis.Redis] = None  # the read-ahead connection of ingest()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> dict:
        """Connect, rebuild from the stream, and start consuming in a background thread."""
        self.redis = connect(self.redis_url)
        rebuilt = with_backoff(self._rebuild, what=f"shard {self.spec.shard_id} rebuild")
        self._thread = threading.Thread(target=self._ingest_loop, name=f"shard-{self.spec.shard_id}", daemon=True)
        self._thread.start()
        return {"rebuilt": rebuilt, "epoch": self.epoch}

    def open_local(self) -> ReplayShard:
        """Use without Redis (single-process mode): blocks come through :meth:`insert`.

        The shard then has no stream to rebuild from; its item keys carry epoch 1, as a first
        start's would.
        """
        self.epoch = 1
        return self

    def run(self) -> dict:
        """Start (rebuild + consume) and block until :meth:`stop`; returns the final stats."""
        self.start()
        thread = self._thread
        assert thread is not None
        while not self._stop.wait(0.5):
            if not thread.is_alive():
                raise RuntimeError(f"shard {self.spec.shard_id}: ingest thread died")
        thread.join(timeout=10)
        return self.stats()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._reader is not None and (self._thread is None or not self._thread.is_alive()):
            self._reader.close()
            self._reader = None

    @property
    def _redis(self) -> redis.Redis:
        """The connection :meth:`start` opened (a shard used without Redis never gets here)."""
        assert self.redis is not None, "start() first"
        return self.redis

    def _rebuild(self) -> int:
        r = self._redis
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
            n += self._consume_entries([fields for _, fields in entries], count_insert=False)
            start = "(" + _s(entries[-1][0])
            if _s(entries[-1][0]) == last:
                break
        # delivered-but-unacknowledged entries (the previous shard died between insert and ack)
        # are now in memory: acknowledge them, counting them as ingested now
        while True:
            pending = r.xpending_range(self.stream, self.group, min="-", max="+", count=1000)
            if not pending:
                break
            ids = [p["message_id"] for p in pending]
            good = bad = 0
            for entry_id in ids:
                got = r.xrange(self.stream, min=entry_id, max=entry_id)
                try:
                    good += len(
                        decode_block(_payload(got[0][1]) if got else None, self.spec.obs_dim, self.spec.num_actions)
                    )
                except BlockError:
                    bad += 1
            self._ack(ids, ingested=good, rejected=bad)
        self.counters["rebuilt"] += n
        log.info("shard %d: rebuilt %d transitions from %s (epoch %d)", self.spec.shard_id, n, self.stream, self.epoch)
        return n

    # -- ingest ----------------------------------------------------------------------------

    def _ingest_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.ingest()
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

    def ingest(self, max_entries: Optional[int] = None, block_ms: int = 100) -> int:
        """Consume the stream until :meth:`stop` (or ``max_entries`` entries); returns entries consumed.

        The same work and guarantees as :meth:`ingest_once` in a loop -- each batch of up to
        ``read_count`` entries is decoded, inserted, then acknowledged, and a read is only sent
        when the rate limiter allows an insert with every earlier batch counted -- but the read
        of the next batch goes out *before* the current batch is processed, so Redis serves it
        while this thread decodes and inserts. The read-ahead is sent only when the limiter,
        told the current batch is already inserted (at its largest), still allows an insert;
        otherwise the next read waits for the limiter as :meth:`ingest_once` does. On a Redis
        error the read in flight is abandoned: its entries stay pending in the group and in the
        stream, so a restarted shard rebuilds them like any delivered, unacknowledged entry.
        """
        args = (
            "XREADGROUP",
            "GROUP",
            self.group,
            self.consumer,
            "COUNT",
            int(self.spec.read_count),
            "BLOCK",
            int(block_ms),
            "STREAMS",
            self.stream,
            ">",
        )
        if self._reader is None:
            self._reader = connect(self.redis_url)
        pool = self._reader.connection_pool
        conn = pool.get_connection()
        done = 0
        batch: Optional[list] = None
        try:
            while True:
                if batch is None:
                    if (max_entries is not None and done >= max_entries) or not self._wait_for_insert_room():
                        break
                    conn.send_command(*args)
                    batch = _stream_entries(conn.read_response())
                    if not batch:
                        batch = None
                        continue
                ahead = (
                    not self._stop.is_set()
                    and (max_entries is None or done + len(batch) < max_entries)
                    and self._room_after(batch)
                )
                if ahead:
                    conn.send_command(*args)
                self._consume_and_ack(batch, count_insert=True)
                done += len(batch)
                batch = (_stream_entries(conn.read_response()) or None) if ahead else None
        except BaseException:
            conn.disconnect()  # a reply may still be on its way: never reuse this socket
            raise
        finally:
            pool.release(conn)
        return done

    def _ack(self, entry_ids: list, ingested: int = 0, rejected: int = 0) -> None:
        """Acknowledge entries whose blocks were inserted (or rejected): the one place both
        ingest paths acknowledge through. The durable counters move in the same transaction, so
        ``appended = ingested + pending`` holds in Redis whatever crashes or restarts."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.xack(self.stream, self.group, *entry_ids)
        if ingested:
            pipe.hincrby(self.counts_key, "ingested", int(ingested))
        if rejected:
            pipe.hincrby(self.counts_key, "rejected_entries", int(rejected))
        pipe.execute()

    def _consume_and_ack(self, batch: list, count_insert: bool) -> int:
        before = sum(self.rejected.values())
        n = self._consume_entries([fields for _, fields in batch], count_insert=count_insert)
        self._ack([entry_id for entry_id, _ in batch], ingested=n, rejected=sum(self.rejected.values()) - before)
        return n

    def _wait_for_insert_room(self) -> bool:
        """Block while the rate limiter holds inserts; False once the shard is stopping."""
        with self._cond:
            while not self._stop.is_set() and not self.limiter.can_insert(1, self.size):
                self.counters["insert_waits"] += 1
                self._cond.wait(0.1)
        return not self._stop.is_set()

    def _room_after(self, batch: list) -> bool:
        """Would the limiter allow an insert once ``batch`` is inserted (every block valid)?"""
        per = transition_nbytes(self.spec.obs_dim)
        n = 0
        for _, fields in batch:
            p = _payload(fields)
            if isinstance(p, bytes) and len(p) > HEADER_SIZE:
                n += (len(p) - HEADER_SIZE) // per
        with self._lock:
            return self.limiter.can_insert(1 + n, min(self.spec.capacity, self.size + n))

    def ingest_once(self, block_ms: int = 100) -> int:
        """Read up to ``read_count`` entries, insert the valid ones, acknowledge all. Returns entries read."""
        if not self._wait_for_insert_room():
            return 0
        # redis-py types the RESP3 reply (a dict); apexq's connections speak RESP2: [[stream, entries]]
        resp: Any = self._redis.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=self.spec.read_count, block=block_ms
        )
        if not resp:
            return 0
        entries = resp[0][1]
        self._consume_and_ack(entries, count_insert=True)
        return len(entries)

    def _consume_entries(self, entries: list, count_insert: bool) -> int:
        """Decode, validate and insert the fields of many stream entries at once.

        The entries are checked together (:func:`decode_batch`) and every run of consecutive
        valid ones goes into the ring as one insert: one copy per column and one sum-tree range
        update, instead of a dozen numpy calls per block. Rejections are counted by reason.
        """
        payloads = [_payload(f) for f in entries]
        per = transition_nbytes(self.spec.obs_dim)
        longest = max((len(p) for p in payloads if isinstance(p, bytes)), default=0)
        if len(payloads) > 1 and (longest - HEADER_SIZE) // per > self.spec.capacity:
            # a block larger than the ring keeps only its newest `capacity` transitions (see insert):
            # take such batches entry by entry so every block is trimmed on its own, as ever
            return sum(self._consume_entries([f], count_insert) for f in entries)
        blocks, errors = decode_batch(payloads, self.spec.obs_dim, self.spec.num_actions)
        for err in errors:
            self.rejected[err.reason] += 1
            if err.reason not in self._logged_reasons:
                self._logged_reasons.add(err.reason)
                log.warning(
                    "shard %d: rejected a block (%s); further '%s' rejections are only counted",
                    self.spec.shard_id,
                    err,
                    err.reason,
                )
        n = 0
        for block in blocks:
            if len(payloads) == 1:  # one stream block: exactly what insert() does with it
                n += len(self._store(block, count_insert=count_insert, keep_seq=False))
            else:  # several merged: each was at most `capacity` long
                self._store(block, count_insert=count_insert, keep_seq=True)
                n += len(block)
        return n

    def insert(self, block: Block, count_insert: bool = True) -> np.ndarray:
        """Insert one block (the newest ``capacity`` of an oversized one); returns the items' keys."""
        return self._store(block, count_insert=count_insert, keep_seq=False)

    def _store(self, block: Block, count_insert: bool, keep_seq: bool) -> np.ndarray:
        """Write ``block`` into the ring at the next sequence numbers.

        A block larger than the ring keeps its newest ``capacity`` transitions; the others count
        as evicted. With ``keep_seq`` (several stream blocks merged into one) the dropped ones
        still use up their sequence numbers, as they would have inserted block by block.
        """
        n = len(block)
        cap = self.spec.capacity
        cols: tuple[np.ndarray, ...] = (block.obs, block.next_obs, block.action, block.ret, block.discount)
        prio_in = block.priority
        dropped = 0
        if n > cap:
            dropped = n - cap
            cols = tuple(a[-cap:] for a in cols)
            prio_in = prio_in[-cap:]
        m = n - dropped
        prio = np.minimum(np.asarray(prio_in, np.float64), MAX_PRIORITY)
        prio += self.spec.priority_eps
        prio **= self.spec.priority_alpha
        if not prio.min() >= 0:  # refused before anything is written
            raise ValueError("sum-tree values must be >= 0")
        with self._cond:
            if keep_seq:
                self.seq += dropped
            seq0 = self.seq
            keys = np.arange(seq0, seq0 + m, dtype=np.int64)
            keys |= np.int64(self.epoch) << SEQ_BITS
            lo = seq0 % cap
            first = min(m, cap - lo)
            evicted = dropped
            full = self.size == cap  # every slot holds an item (slots fill in order, never empty)
            for dst, src in ((lo, slice(0, first)), (0, slice(first, m))):
                k = src.stop - src.start
                if k <= 0:
                    continue
                dsl = slice(dst, dst + k)
                evicted += k if full else int(np.count_nonzero(self.item_keys[dsl] >= 0))
                for ring, col in zip((self.obs, self.next_obs, self.action, self.ret, self.discount), cols):
                    ring[dsl] = col[src]
                self.item_keys[dsl] = keys[src]
                self.tree._write_range(dst, prio[src])
            self.seq += m
            self.size = min(cap, self.size + m)
            self.counters["ingested"] += n if keep_seq else m
            self.counters["evicted"] += evicted
            if count_insert:
                self.limiter.record_insert(n if keep_seq else m)
            self._cond.notify_all()
        return keys

    # -- learner side ----------------------------------------------------------------------

    def sample(self, n: int, timeout: float = 1.0) -> Optional[SampleBatch]:
        """``n`` items proportional to priority**alpha, or None if the rate limiter held for ``timeout`` s.

        ``prob`` is each item's probability within this shard; ``total`` the shard's priority mass
        (so a caller mixing shards can turn it into a global probability) and ``size`` its item count.
        A NaN or negative ``timeout`` means no wait (a NaN deadline once made this loop spin).
        """
        timeout = float(timeout)
        deadline = time.monotonic() + (timeout if timeout > 0 else 0.0)
        with self._cond:
            while not self.limiter.can_sample(n, self.size):
                self.counters["sample_waits"] += 1
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return None
                self._cond.wait(min(left, 0.1))
            # take() rather than fancy indexing: several times faster for the 2-D columns
            slots, leaf = self.tree.sample_with_values(n, self.rng)
            total = self.tree.total
            leaf /= total
            out = SampleBatch(
                keys=self.item_keys.take(slots),
                obs=self.obs.take(slots, axis=0),
                action=self.action.take(slots),
                ret=self.ret.take(slots),
                discount=self.discount.take(slots),
                next_obs=self.next_obs.take(slots, axis=0),
                prob=leaf,
                total=total,
                size=self.size,
                shard=self.spec.shard_id,
            )
            self.limiter.record_sample(n)
            self.counters["sampled"] += n
            self._cond.notify_all()
        return out

    def update_priorities(self, keys, priorities) -> int:
        """Set new priorities (|TD| before eps/alpha) for items still present; returns how many applied.

        Negative or non-finite ones are skipped; ones above ``MAX_PRIORITY`` are clamped to it
        (counted in ``priority_updates_clamped``).
        """
        keys = np.asarray(keys, np.int64)
        pr = np.asarray(priorities, np.float64)
        if keys.shape != pr.shape:
            raise ValueError(f"{keys.shape[0]} keys but {pr.shape[0]} priorities")
        all_ok = pr.size == 0 or bool(pr.min() >= 0 and pr.max() <= MAX_PRIORITY)  # NaN fails both
        if not all_ok:
            big = np.isfinite(pr) & (pr > MAX_PRIORITY)
            if big.any():
                pr = np.where(big, MAX_PRIORITY, pr)
                self.counters["priority_updates_clamped"] += int(np.count_nonzero(big))
        slots = keys & SEQ_MASK
        slots %= self.spec.capacity
        with self._cond:
            live = self.item_keys.take(slots) == keys
            if not all_ok:
                live &= np.isfinite(pr) & (pr >= 0)
            applied = int(np.count_nonzero(live))
            if applied < live.size:
                slots, pr = slots[live], pr[live]
            vals = pr + self.spec.priority_eps
            vals **= self.spec.priority_alpha
            self.tree.set(slots, vals)
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
                "priority_updates_clamped": self.counters["priority_updates_clamped"],
                "redis_errors": self.counters["redis_errors"],
                "priority_total": self.tree.total,
            }

    def ping(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _stream_entries(reply) -> list:
    """The ``[id, fields]`` entries of a raw XREADGROUP reply for one stream (RESP2 or RESP3)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(next(iter(reply.values())) or [])
    return list(reply[0][1] or [])


def _payload(fields):
    """The block payload (field ``b``) of an entry's fields: a dict, a flat [k, v, ...] list or None."""
    if isinstance(fields, dict):
        return fields.get(b"b")
    if isinstance(fields, list):
        payload = None
        for i in range(0, len(fields) - 1, 2):
            if fields[i] == b"b":
                payload = fields[i + 1]  # the last one wins, as in a dict
        return payload
    return None
