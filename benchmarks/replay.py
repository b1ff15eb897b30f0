"""Replay shard throughput and memory against raw Redis streams, measured side by side.

One private Redis-protocol server (the one ``apexq train`` would start: loopback, password,
AOF everysec) and one Python process (this one, same client library) measure:

* ``raw_xadd_tps``    XADD of pre-encoded MountainCar blocks (pipelined), transitions/s;
* ``raw_ingest_tps``  XREADGROUP (``read_count`` entries per call) + XACK of those blocks, no
                      decoding: the wire cost any consumer-group reader pays (the shard must
                      acknowledge what it inserted); ``raw_read_noack_tps`` is the same read
                      with NOACK and no XACK, reported for reference;
* ``ingest_tps``      a real ``ReplayShard`` consuming the same stream with ``ingest()`` (the loop
                      its background thread runs; it sends the next read before processing the
                      current batch): read, decode, validate, insert into a full ring
                      (evicting), acknowledge; ``ingest_once_tps`` is its one-batch step called
                      in a loop (no read-ahead), for reference;
* ``sample_tps``      ``ReplayShard.sample(512)`` then ``update_priorities`` of the same keys
                      on a full shard, transitions/s;
* ``rpc_sample_tps``  the same sampling (4 minibatches of ``--batch`` per request, as the learner
                      asks) from an ``apexq replay-server`` process through Redis, with a priority
                      update per request: what a learner gets from a standalone shard (info);
* ``shard_memory_ratio``  peak bytes allocated (tracemalloc: numpy arrays and Python objects)
                      while a shard is built and fills to 1M transitions from the stream,
                      divided by the raw bytes of 1M transitions (32 B each for MountainCar);
* ``redis_memory_ratio``  growth of Redis ``used_memory`` (INFO memory, admin user) when the
                      stream holds the shard's window of 1M transitions (MAXLEN ~ window, every
                      entry acknowledged), divided by the raw bytes of the transitions in it.

Ingest is measured in interleaved rounds (XADD a round; the raw readers and the shard each
consume it, in an order that rotates) once the shard's ring is full, so all see the same load;
the figures are medians of the per-round rates. Sampling likewise reports the median rate over
chunks of 200 calls. This machine is shared: medians keep a burst of someone else's work from
deciding a figure. Prints a table, then one JSON line:
{"benchmark": "replay", "figures": {...}, "targets": {...}}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import tracemalloc
from dataclasses import replace

import numpy as np
import redis

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from apexq.cluster.components import shard_spec  # noqa: E402
from apexq.cluster.config import load_config  # noqa: E402
from apexq.cluster.redis_server import RedisServer, find_server  # noqa: E402
from apexq.core.connection import connect  # noqa: E402
from apexq.replay_server.codec import Block, encode_block  # noqa: E402
from apexq.replay_server.keys import Keys  # noqa: E402
from apexq.replay_server.shard import ReplayShard, ShardSpec  # noqa: E402

OBS_DIM, NUM_ACTIONS = 2, 3
RAW_BYTES = 2 * OBS_DIM * 4 + 4 + 4 + 4 + 4  # obs + next_obs + action + return + discount + priority = 32
NAMESPACE = "bench"
SIZES = {  # capacity, ingest rounds, entries per round, sample calls
    "full": (1_000_000, 120, 512, 30000),
    "quick": (1_000_000, 48, 512, 10000),
    "smoke": (65_536, 4, 64, 200),
}


def mountain_car_blocks(count: int, block_size: int, seed: int = 0) -> list[bytes]:
    """``count`` distinct encoded blocks of plausible MountainCar n-step transitions."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        n = block_size
        obs = np.stack([rng.uniform(-1.2, 0.6, n), rng.uniform(-0.07, 0.07, n)], 1).astype(np.float32)
        nxt = obs + rng.normal(0, 0.01, (n, 2)).astype(np.float32)
        term = rng.random(n) < 0.01
        out.append(
            encode_block(
                Block(
                    obs=obs,
                    action=rng.integers(0, NUM_ACTIONS, n).astype(np.int32),
                    ret=np.where(term, -1.0, -2.9701).astype(np.float32),
                    discount=np.where(term, 0.0, 0.99**3).astype(np.float32),
                    next_obs=nxt,
                    priority=rng.uniform(0.01, 2.0, n).astype(np.float32),
                    actor_id=i % 4,
                    block_seq=i,
                )
            )
        )
    return out


def used_memory(admin: redis.Redis) -> int:
    return int(admin.info("memory")["used_memory"])


def xadd_entries(
    r: redis.Redis, stream: str, blocks: list[bytes], n: int, maxlen: int, start: int = 0, pipeline: int = 64
) -> float:
    """Append ``n`` entries (cycling through ``blocks``), ``pipeline`` per round trip; returns seconds."""
    t0 = time.perf_counter()
    done = 0
    while done < n:
        k = min(pipeline, n - done)
        pipe = r.pipeline(transaction=False)
        for j in range(k):
            pipe.xadd(stream, {b"b": blocks[(start + done + j) % len(blocks)]}, maxlen=maxlen, approximate=True)
        pipe.execute()
        done += k
    return time.perf_counter() - t0


def raw_read(r: redis.Redis, stream: str, group: str, n: int, count: int, ack: bool = True) -> float:
    """XREADGROUP ``n`` entries ``count`` at a time and XACK each batch (or read with NOACK and
    acknowledge nothing); returns seconds."""
    t0 = time.perf_counter()
    got = 0
    while got < n:
        resp = r.xreadgroup(group, "raw", {stream: ">"}, count=count, block=100, noack=not ack)
        if not resp:
            raise RuntimeError("raw reader found the stream empty")
        entries = resp[0][1]
        if ack:
            r.xack(stream, group, *[entry_id for entry_id, _ in entries])
        got += len(entries)
    return time.perf_counter() - t0


def shard_ingest(shard: ReplayShard, n: int, read_ahead: bool = True) -> float:
    """Seconds for the shard to consume ``n`` more entries: with its ingest loop (``ingest``, what
    its background thread runs: reads ahead) or with its one-batch step ``ingest_once``."""
    t0 = time.perf_counter()
    if read_ahead:
        got = shard.ingest(max_entries=n)
    else:
        got = 0
        while got < n:
            read = shard.ingest_once(block_ms=100)
            if read == 0:
                break
            got += read
    if got < n:
        raise RuntimeError(f"shard found the stream empty after {got} of {n} entries")
    return time.perf_counter() - t0


def sample_loop(shard: ReplayShard, calls: int, batch: int, chunk: int = 200, seed: int = 1) -> tuple[list, list]:
    """Rates (transitions/s) of chunks of ``chunk`` x (sample + update_priorities of the same
    keys), and of chunks of sample alone; ``calls`` calls of each kind in all."""
    rng = np.random.default_rng(seed)
    new_prios = [np.abs(rng.normal(0, 1, batch)) for _ in range(64)]
    for i in range(20):  # warm-up
        s = shard.sample(batch)
        shard.update_priorities(s.keys, new_prios[i % 64])
    both, alone = [], []
    for _ in range(max(1, calls // chunk)):
        t0 = time.perf_counter()
        for i in range(chunk):
            s = shard.sample(batch)
            if s is None:
                raise RuntimeError("sample refused by the rate limiter")
            shard.update_priorities(s.keys, new_prios[i % 64])
        both.append(chunk * batch / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for _ in range(chunk):
            shard.sample(batch)
        alone.append(chunk * batch / (time.perf_counter() - t0))
    return both, alone


def rpc_sample_loop(url: str, capacity: int, calls: int, batch: int, chunk: int = 10) -> list:
    """Transitions/s sampled from an ``apexq replay-server`` subprocess (it rebuilds the stream's window)."""
    import subprocess

    from apexq.replay_server.rpc import RedisShardClient

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "apexq.cluster.cli",
            "replay-server",
            "--shard",
            "0",
            "--namespace",
            NAMESPACE,
            "--set",
            f"replay.capacity={capacity}",
            "--set",
            "replay.min_size_to_sample=1",
            "--set",
            "replay.samples_per_insert=1000",
            "--set",
            "replay.error_buffer=1e15",
            "--set",
            f"learner.batch_size={min(batch, capacity)}",
        ],
        cwd=root,
        env=dict(os.environ, APEXQ_REDIS_URL=url),  # the URL (with its password) never in argv
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        if "apexq replay-server: shard 0" not in line:
            raise RuntimeError(f"replay-server did not start: {line}{proc.stderr.read()[-2000:]}")
        client = RedisShardClient(url, NAMESPACE, 0, OBS_DIM)
        client.sample(4 * batch, timeout=5.0)
        rates = []
        for _ in range(max(1, calls // chunk)):
            t0 = time.perf_counter()
            for _ in range(chunk):
                res = client.sample(4 * batch, timeout=5.0)
                client.update_priorities(res.keys, np.abs(res.ret))
            rates.append(chunk * 4 * batch / (time.perf_counter() - t0))
        client.close()
        return rates
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (about a minute)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, for tests (seconds)")
    ap.add_argument("--block-size", type=int, default=256, help="transitions per block (actors' default 256)")
    ap.add_argument(
        "--read-count",
        type=int,
        default=ShardSpec.read_count,
        help="entries per XREADGROUP, for the shard and the raw reader alike",
    )
    ap.add_argument("--batch", type=int, default=512, help="sample batch size")
    args = ap.parse_args()
    mode = "smoke" if args.smoke else ("quick" if args.quick else "full")
    capacity, rounds, per_round, sample_calls = SIZES[mode]
    bs, count = args.block_size, args.read_count
    window = math.ceil(capacity / bs)  # entries of the shard's window: what the stream keeps

    server = RedisServer(find_server()).start()
    try:
        r = connect(server.url)
        admin = redis.Redis.from_url(server.admin_url)
        keys = Keys(NAMESPACE)
        stream = keys.stream(0)
        blocks = mountain_car_blocks(64, bs)
        mem0 = used_memory(admin)

        # 1. the window: XADD it, then a fresh shard (under tracemalloc) consumes it with its
        #    own ingest loop -- its ring is full afterwards, as in steady state
        fill_s = xadd_entries(r, stream, blocks, window, maxlen=window)
        spec = replace(
            shard_spec(load_config(), 0, {"obs_dim": OBS_DIM, "num_actions": NUM_ACTIONS}),
            capacity=capacity,
            samples_per_insert=1.0,
            min_size_to_sample=1,
            error_buffer=1e15,
            read_count=count,
        )
        tracemalloc.start()
        traced0 = tracemalloc.get_traced_memory()[0]
        shard = ReplayShard(spec, server.url, NAMESPACE, seed=0)
        shard.redis = connect(server.url)
        shard._rebuild()  # epoch + consumer group (what start() does, without the thread)
        first_fill_s = shard_ingest(shard, window, read_ahead=True)
        shard_peak = tracemalloc.get_traced_memory()[1] - traced0
        tracemalloc.stop()
        held = shard.stats()["size"]
        stream_len = int(admin.xlen(stream))  # (XLEN: not a client command)
        pending = int(r.xpending(stream, keys.group(0))["pending"])
        redis_bytes = used_memory(admin) - mem0
        redis_ratio = redis_bytes / (stream_len * bs * RAW_BYTES)
        shard_ratio = shard_peak / (held * RAW_BYTES)

        # 2. ingest rounds: XADD a round; raw read+ack, raw NOACK read and the shard consume it
        r.xgroup_create(stream, "raw", id="$")
        r.xgroup_create(stream, "raw_noack", id="$")
        xadd_rates, raw_rates, noack_rates, ingest_rates, once_rates = [], [], [], [], []
        per = per_round * bs
        for i in range(rounds):
            xadd_rates.append(per / xadd_entries(r, stream, blocks, per_round, maxlen=window, start=i * per_round))
            ahead = i % 2 == 0  # the shard's ingest loop on even rounds, its one-batch step on odd ones
            shard_rates = ingest_rates if ahead else once_rates
            steps = [
                lambda: raw_rates.append(per / raw_read(r, stream, "raw", per_round, count)),
                lambda: shard_rates.append(per / shard_ingest(shard, per_round, read_ahead=ahead)),
                lambda: noack_rates.append(per / raw_read(r, stream, "raw_noack", per_round, count, ack=False)),
            ]
            for k in range(3):  # rotate the order from round to round
                steps[(i // 2 + k) % 3]()
        st = shard.stats()
        assert st["rejected_total"] == 0 and st["size"] == capacity, st

        # 3. sampling on the full shard
        both_rates, alone_rates = sample_loop(shard, sample_calls, args.batch)

        # 4. the same through a standalone shard process (apexq replay-server) and Redis
        rpc_rates = rpc_sample_loop(server.url, capacity, max(20, sample_calls // 10), args.batch)
    finally:
        server.stop()

    med = statistics.median
    figures = {
        "ingest_tps": round(med(ingest_rates)),
        "raw_ingest_tps": round(med(raw_rates)),
        "ingest_vs_raw": round(med(ingest_rates) / med(raw_rates), 3),
        "ingest_once_tps": round(med(once_rates)),
        "raw_read_noack_tps": round(med(noack_rates)),
        "ingest_vs_raw_noack": round(med(ingest_rates) / med(noack_rates), 3),
        "raw_xadd_tps": round(med(xadd_rates)),
        "sample_tps": round(med(both_rates)),
        "sample_only_tps": round(med(alone_rates)),
        "rpc_sample_tps": round(med(rpc_rates)),
        "shard_memory_ratio": round(shard_ratio, 3),
        "redis_memory_ratio": round(redis_ratio, 3),
        "shard_peak_bytes": int(shard_peak),
        "redis_used_memory_bytes": int(redis_bytes),
        "transitions_in_shard": int(held),
        "transitions_in_stream": stream_len * bs,
        "pending_after_fill": pending,
        "first_fill_tps": round(window * bs / first_fill_s),
        "window_xadd_tps": round(window * bs / fill_s),
        "block_size": bs,
        "read_count": count,
        "sample_batch": args.batch,
        "capacity": capacity,
        "mode": mode,
    }
    targets = {
        "ingest_tps": {"target": ">= 2000000", "value": figures["ingest_tps"], "met": figures["ingest_tps"] >= 2e6},
        "ingest_vs_raw": {
            "target": ">= 0.5",
            "value": figures["ingest_vs_raw"],
            "met": figures["ingest_vs_raw"] >= 0.5,
        },
        "sample_tps": {"target": ">= 1000000", "value": figures["sample_tps"], "met": figures["sample_tps"] >= 1e6},
        "shard_memory_ratio": {
            "target": "<= 2",
            "value": figures["shard_memory_ratio"],
            "met": figures["shard_memory_ratio"] <= 2,
        },
        "redis_memory_ratio": {
            "target": "<= 2",
            "value": figures["redis_memory_ratio"],
            "met": figures["redis_memory_ratio"] <= 2,
        },
    }
    M = 1e6
    print(
        f"replay shard vs raw Redis  ({mode}: capacity {capacity:,}, blocks of {bs}, "
        f"read_count {count}, {rounds} ingest rounds of {per_round * bs:,} transitions)"
    )
    rows = [
        ("raw XADD (pipelined 64)", f"{figures['raw_xadd_tps'] / M:8.2f} M/s", ""),
        ("raw XREADGROUP + XACK", f"{figures['raw_ingest_tps'] / M:8.2f} M/s", "baseline"),
        (
            "raw XREADGROUP NOACK (no XACK)",
            f"{figures['raw_read_noack_tps'] / M:8.2f} M/s",
            f"info: shard is {figures['ingest_vs_raw_noack']:.0%} of it",
        ),
        (
            "shard ingest",
            f"{figures['ingest_tps'] / M:8.2f} M/s",
            f"{figures['ingest_vs_raw']:.0%} of raw (>= 50%), >= 2 M/s",
        ),
        (
            "shard ingest_once loop (no read-ahead)",
            f"{figures['ingest_once_tps'] / M:8.2f} M/s",
            f"info: {figures['ingest_once_tps'] / figures['raw_ingest_tps']:.0%} of raw",
        ),
        ("shard first fill (cold ring, traced)", f"{figures['first_fill_tps'] / M:8.2f} M/s", "info"),
        (f"sample({args.batch}) + update_priorities", f"{figures['sample_tps'] / M:8.2f} M/s", ">= 1 M/s"),
        (f"sample({args.batch}) alone", f"{figures['sample_only_tps'] / M:8.2f} M/s", "info"),
        (
            f"replay-server via Redis, 4x{args.batch} + priorities",
            f"{figures['rpc_sample_tps'] / M:8.2f} M/s",
            f"info: {figures['rpc_sample_tps'] / figures['sample_tps']:.0%} of in-process",
        ),
        (
            f"shard peak memory, {held:,} transitions",
            f"{shard_peak / 2**20:8.1f} MiB",
            f"{shard_ratio:.2f}x raw (<= 2)",
        ),
        (
            f"Redis used_memory, {stream_len * bs:,} in stream",
            f"{redis_bytes / 2**20:8.1f} MiB",
            f"{redis_ratio:.2f}x raw (<= 2)",
        ),
    ]
    for name, val, note in rows:
        print(f"  {name:42s} {val:>14s}   {note}")
    print(json.dumps({"benchmark": "replay", "figures": figures, "targets": targets}))


if __name__ == "__main__":
    main()
