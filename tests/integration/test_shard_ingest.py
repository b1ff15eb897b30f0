"""The shard's ingest loop (read-ahead) keeps the semantics of reading one batch at a time."""

import threading
import time

import numpy as np
import redis
from default_components import shard_spec

from apexq.core.connection import connect
from apexq.replay_server.codec import Block, encode_block
from apexq.replay_server.keys import Keys
from apexq.replay_server.shard import ReplayShard


def block(n, start=0.0):
    obs = (np.arange(n, dtype=np.float32)[:, None] + start).repeat(2, axis=1)
    return Block(
        obs=obs,
        action=(np.arange(n) % 3).astype(np.int32),
        ret=np.full(n, -1, np.float32),
        discount=np.full(n, 0.99, np.float32),
        next_obs=obs + 1,
        priority=np.full(n, 1.0, np.float32),
    )


def fill(url, ns, entries, n=10):
    r = redis.Redis.from_url(url)
    stream = Keys(ns).stream(0)
    for i in range(entries):
        r.xadd(stream, {b"b": encode_block(block(n, start=i * n))})
    return r, stream


def at_limit(shard, timeout=60.0):
    """The inserted count once the shard's ingest waits on its rate limiter.

    The limiter refusing an insert is not enough (a batch read ahead may still be on its way in);
    the ingest thread is in its wait loop, with nothing in flight, once ``insert_waits`` moves on
    after that. A shard that reads past the limit shows the larger count here.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with shard._cond:
            blocked = not shard.limiter.can_insert(1, shard.size)
            waits = shard.counters["insert_waits"]
        if blocked:
            while time.monotonic() < deadline:
                if shard.stats()["insert_waits"] >= waits + 2:
                    return shard.stats()["inserted"]
                time.sleep(0.02)
        time.sleep(0.02)
    raise AssertionError(f"the shard never came to wait on its limiter within {timeout:.0f} s: {shard.stats()}")


def inserted(shard, want, timeout=60.0):
    """Wait until ``want`` items were inserted; the count then (or at the deadline)."""
    deadline = time.monotonic() + timeout
    while shard.stats()["inserted"] < want and time.monotonic() < deadline:
        time.sleep(0.02)
    return shard.stats()["inserted"]


def test_read_ahead_never_reads_past_what_the_limiter_allows(redis_server):
    # samples_per_insert 1, error buffer 500: reading one batch (16 blocks x 10) at a time, a shard
    # inserts 160, 320, 480, 640 and then waits (641 > 500); reading ahead must stop at the same point.
    spec = shard_spec(capacity=10_000, samples_per_insert=1.0, min_size_to_sample=1, error_buffer=500.0, read_count=16)
    for ns, read_ahead in (("ra1", True), ("ra2", False)):
        fill(redis_server.url, ns, 100)
        shard = ReplayShard(spec, redis_server.url, ns, seed=0)
        if read_ahead:
            shard.start()  # the background thread runs ingest()
        else:  # the reference: one batch at a time
            shard.redis = connect(redis_server.url)
            shard._rebuild()
            threading.Thread(target=lambda: [shard.ingest_once() for _ in range(8)], daemon=True).start()
        try:
            assert at_limit(shard) == 640, ns
            if read_ahead:
                # the learner samples 400: diff 240, so two more batches fit (401, then 561 > 500)
                assert shard.sample(400) is not None
                assert at_limit(shard) == 960
        finally:
            shard.stop()


def test_everything_read_is_inserted_and_acknowledged(redis_server):
    r, stream = fill(redis_server.url, "ra3", 300, n=7)
    spec = shard_spec(capacity=10_000, samples_per_insert=1.0, min_size_to_sample=1, error_buffer=1e12, read_count=16)
    shard = ReplayShard(spec, redis_server.url, "ra3", seed=0)
    shard.start()
    try:
        for i in range(300, 400):  # appends while the shard consumes
            r.xadd(stream, {b"b": encode_block(block(7, start=i * 7))})
        assert inserted(shard, 400 * 7) == 400 * 7
    finally:
        shard.stop()
    assert int(r.xpending(stream, Keys("ra3").group(0))["pending"]) == 0
    assert [g["lag"] for g in r.xinfo_groups(stream)] == [0]  # every entry was read
    assert shard.stats()["inserted"] == 400 * 7  # and none twice
    got = np.sort(shard.obs[:2800, 0])
    np.testing.assert_array_equal(got, np.arange(2800, dtype=np.float32))
