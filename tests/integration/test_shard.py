"""A replay shard against a real Redis server process."""

import time

import numpy as np
import pytest
import redis
from default_components import shard_spec

from apexq.replay_server.client import StreamWriter
from apexq.replay_server.codec import Block, encode_block
from apexq.replay_server.keys import Keys
from apexq.replay_server.shard import ReplayShard


def block(n, start=0.0, seq=0, prio=1.0):
    obs = (np.arange(n, dtype=np.float32)[:, None] + start).repeat(2, axis=1)
    return Block(
        obs=obs,
        action=(np.arange(n) % 3).astype(np.int32),
        ret=np.full(n, -1, np.float32),
        discount=np.full(n, 0.99, np.float32),
        next_obs=obs + 1,
        priority=np.full(n, prio, np.float32),
        block_seq=seq,
    )


def spec(**kw):
    return shard_spec(**{**dict(capacity=1000, min_size_to_sample=10, samples_per_insert=1.0, error_buffer=1e9), **kw})


def wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_actor_to_shard_to_sample_and_priority_updates(redis_server):
    shard = ReplayShard(spec(), redis_server.url, "t1", seed=0)
    shard.start()
    try:
        w = StreamWriter(redis_server.url, "t1", 0, actor_id=1, maxlen=100, max_backlog=50)
        for i in range(4):
            w.append(block(100, start=i * 100, seq=i))
        assert wait_for(lambda: shard.stats()["inserted"] == 400)
        s = shard.sample(64)
        assert s.obs.shape == (64, 2) and s.keys.shape == (64,)
        np.testing.assert_allclose(s.prob, 1 / 400)  # equal priorities -> uniform
        np.testing.assert_array_equal(s.next_obs, s.obs + 1)
        # raise one item's priority: it is drawn far more often
        key = s.keys[0]
        assert shard.update_priorities([key], [1000.0]) == 1
        s2 = shard.sample(256)
        heavy = (1000.0 + 1e-6) ** 0.6  # priority ** alpha
        share = heavy / (heavy + 399 * (1.0 + 1e-6) ** 0.6)  # ~0.137
        assert abs((s2.keys == key).sum() - 256 * share) <= 3  # stratified: within a stratum or two
        np.testing.assert_allclose(s2.prob[s2.keys == key], share, rtol=1e-6)
        appended = redis.Redis.from_url(redis_server.admin_url).hget(Keys("t1").appended(0), "1")  # (HGET: admin only)
        assert int(appended) == 400
    finally:
        shard.stop()


def test_update_for_an_evicted_item_is_ignored(redis_server):
    shard = ReplayShard(spec(capacity=100), redis_server.url, "t2", seed=0)
    shard.epoch = 1
    keys_old = shard.insert(block(100))
    shard.insert(block(100, start=1000))  # overwrites every slot
    assert shard.update_priorities(keys_old[:10], np.full(10, 5.0)) == 0
    assert shard.stats()["priority_updates_stale"] == 10
    assert shard.stats()["evicted"] == 100


def test_restarted_shard_rebuilds_every_acknowledged_transition(redis_server):
    w = StreamWriter(redis_server.url, "t3", 0, actor_id=0, maxlen=100, max_backlog=100)
    shard = ReplayShard(spec(), redis_server.url, "t3", seed=0)
    shard.start()
    for i in range(5):
        w.append(block(50, start=i * 50, seq=i))
    assert wait_for(lambda: shard.stats()["inserted"] == 250)
    shard.stop()  # "killed": its memory is gone
    for i in range(5, 7):  # appended while no shard runs
        w.append(block(50, start=i * 50, seq=i))
    fresh = ReplayShard(spec(), redis_server.url, "t3", seed=0)
    info = fresh.start()
    try:
        assert info["rebuilt"] == 250 and info["epoch"] == 2
        assert wait_for(lambda: fresh.stats()["size"] == 350)
        got = np.sort(fresh.obs[:350, 0])
        np.testing.assert_array_equal(got, np.arange(350, dtype=np.float32))
    finally:
        fresh.stop()


def test_forged_entries_are_rejected_and_counted_and_the_shard_keeps_serving(redis_server):
    shard = ReplayShard(spec(), redis_server.url, "t4", seed=0)
    shard.start()
    try:
        r = redis.Redis.from_url(redis_server.url)
        stream = Keys("t4").stream(0)
        rng = np.random.default_rng(0)
        good = encode_block(block(20))
        forged = 0
        for i in range(2000):
            kind = i % 5
            if kind == 0:
                payload = rng.bytes(int(rng.integers(0, 200)))
            elif kind == 1:
                payload = bytearray(good)
                payload[int(rng.integers(0, len(good)))] ^= 0xFF
                payload = bytes(payload)
            elif kind == 2:
                payload = good[: int(rng.integers(0, len(good)))]
            elif kind == 3:
                payload = good[:36] + np.full((len(good) - 36) // 4, np.nan, np.float32).tobytes()
            else:
                r.xadd(stream, {b"x": b"no block field"})
                forged += 1
                continue
            r.xadd(stream, {b"b": payload})
            forged += 1
        r.xadd(stream, {b"b": good})

        def entries_done():
            st = shard.stats()
            return st["rejected_total"] + st["inserted"] // 20 >= 2001  # every entry decided

        assert wait_for(entries_done, timeout=30)
        st = shard.stats()
        # a random bit flip inside a float column can still be a valid block: count those as inserted
        assert st["rejected_total"] >= 1500
        assert st["rejected"].get("missing_field") == 400
        assert {"too_short", "bad_length", "non_finite"} <= set(st["rejected"])
        assert wait_for(lambda: shard.sample(8) is not None)
        assert shard.ping()
    finally:
        shard.stop()


def test_wrong_password_is_refused(redis_server):
    from apexq.core.connection import RedisAuthError, check

    bad = redis_server.url.replace(redis_server.password, "not-the-password")
    with pytest.raises(RedisAuthError, match="refused the password"):
        check(bad)
    nopw = f"redis://{redis_server.host}:{redis_server.port}/0"
    with pytest.raises(RedisAuthError):
        check(nopw)
    # the client user may not run dangerous commands
    with pytest.raises(redis.ResponseError):
        redis.Redis.from_url(redis_server.url).flushall()


def test_accounting_balances_across_a_shard_restart(redis_server):
    from apexq.replay_server.accounting import reconcile

    r = redis.Redis.from_url(redis_server.url)
    w = StreamWriter(redis_server.url, "t5", 0, actor_id=3, maxlen=100, max_backlog=100)
    shard = ReplayShard(spec(), redis_server.url, "t5", seed=0)
    shard.start()
    for i in range(4):
        w.append(block(25, start=i * 25, seq=i))
    r.xadd(Keys("t5").stream(0), {b"b": b"forged"})
    assert wait_for(lambda: shard.stats()["inserted"] == 100 and shard.stats()["rejected_total"] == 1)
    shard.stop()
    for i in range(4, 6):
        w.append(block(25, start=i * 25, seq=i))  # appended while no shard runs: pending
    acct = reconcile(r, "t5", 0)
    assert (acct["appended"], acct["ingested"], acct["pending"], acct["rejected_entries"]) == (150, 100, 50, 1)
    assert acct["balanced"] and acct["appended_by_actor"] == {3: 150}
    # an entry delivered to a shard that died before acknowledging is pending, then counted once rebuilt
    r.xreadgroup(Keys("t5").group(0), "dead-consumer", {Keys("t5").stream(0): ">"}, count=1)
    assert reconcile(r, "t5", 0)["pending"] == 50
    fresh = ReplayShard(spec(), redis_server.url, "t5", seed=0)
    fresh.start()
    try:
        assert wait_for(lambda: reconcile(r, "t5", 0)["ingested"] == 150)
        acct = reconcile(r, "t5", 0)
        assert acct["pending"] == 0 and acct["balanced"]
        assert fresh.stats()["size"] == 150
    finally:
        fresh.stop()
