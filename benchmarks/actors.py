"""Actor throughput: the real acting loop on a native vector env vs a gymnasium single-env loop.

Figures (env steps per second, policy forward included everywhere, 1 torch thread each):

* ``actor_sps``     the real ``ApexActor`` loop (``run()``: batched Q-network forward, Ape-X
                    epsilons, MountainCarVectorEnv step, n-step accumulation, initial priorities
                    (two more forwards per block), block encoding) with ``--envs`` envs, in this
                    process; its writer encodes every block but does not send it, so Redis is out;
* ``gym_loop_sps``  ``gym.make("MountainCar-v0")`` stepped one observation at a time, acting
                    epsilon-greedily with the same network (one forward per step), same process;
* ``speedup``       actor_sps / gym_loop_sps (target >= 20);
* ``sps_1_actor`` / ``sps_2_actors``  the end-to-end data path: 1 or 2 real ``ApexActor``
                    processes (spawned) appending blocks to a real private Redis server, while a
                    real ``ReplayShard`` in this process consumes the stream (decode, validate,
                    insert, acknowledge); the aggregate env steps/s from the first step of the
                    first actor to the end of the last one, backpressure included.

Prints a table, then one JSON line: {"benchmark": "actors", "figures": {...}, "targets": {...}}
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
from dataclasses import replace

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ENV_ID = "MountainCar-v0"
SIZES = {  # seconds per in-process measurement, seconds per multi-process run, env counts swept
    "full": (10.0, 20.0, (32, 256, 1024)),
    "quick": (4.0, 8.0, (32, 256, 1024)),
    "smoke": (0.5, 1.5, ()),
}


class EncodingWriter:
    """Stands in for the Redis stream writer: encodes every block (wire cost) and counts it."""

    def __init__(self):
        from apexq.replay_server.codec import encode_block

        self._encode = encode_block
        self.blocks = self.transitions = self.bytes = self.backpressure_waits = 0

    def append(self, block, stop=lambda: False) -> None:
        self.bytes += len(self._encode(block))
        self.blocks += 1
        self.transitions += len(block)


class NoWeights:
    """Stands in for the weights client: the initial random network, never updated."""

    version = 0
    lag = 0

    def wait_first(self, timeout: float):
        return None

    def poll(self):
        return None

    def close(self) -> None:
        pass


def spec_and_settings(num_envs: int, actor_id: int = 0, num_actors: int = 1, **kw):
    """Actor ``actor_id``'s settings as a run with the default config and these counts (seed 1) makes them."""
    from apexq.actors.envs import env_spec
    from apexq.cluster.components import actor_settings
    from apexq.cluster.config import load_config

    spec = env_spec(ENV_ID)
    cfg = load_config(
        overrides=[f"env.id={ENV_ID}", "seed=1", f"actors.num={num_actors}", f"actors.envs_per_actor={num_envs}"]
    )
    return spec, replace(actor_settings(cfg, actor_id), **kw)


def run_for(actor, seconds: float) -> tuple[int, float]:
    """Run ``actor.run()`` for about ``seconds``; (env steps, seconds from its first step to the end)."""
    import threading

    timer = threading.Timer(seconds, actor.stop)
    steps0 = actor.env_steps
    timer.start()
    actor.first_step_at = None
    actor._stop.clear()
    actor.run()
    end = time.time()
    timer.cancel()
    return actor.env_steps - steps0, end - actor.first_step_at


def acting_core_sps(num_envs: int, seconds: float) -> tuple[float, dict]:
    """Env steps/s of the real ApexActor loop without Redis (see module docstring)."""
    from apexq.actors.actor import ApexActor

    spec, s = spec_and_settings(num_envs)
    writer = EncodingWriter()
    actor = ApexActor(s, None, "bench", spec, writer=writer, weights=NoWeights())
    run_for(actor, min(1.0, seconds / 4))  # warm-up (torch, allocations)
    b0, t0 = writer.blocks, writer.transitions
    steps, dt = run_for(actor, seconds)
    return steps / dt, {"blocks": writer.blocks - b0, "transitions": writer.transitions - t0}


def gym_loop_sps(seconds: float, epsilon: float = 0.1) -> float:
    """gymnasium's MountainCar-v0, one env, acting with the same network one observation at a time."""
    import gymnasium as gym
    import torch

    from apexq.learner.network import build_network

    spec, s = spec_and_settings(1)
    torch.set_num_threads(1)
    net = build_network(spec, s.hidden_sizes, s.dueling).eval()
    env = gym.make(ENV_ID)
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=0)
    steps = 0
    t0 = deadline = 0.0
    for rep in range(-1, 1 << 30):  # rep -1: warm-up (first torch calls are slow)
        if rep == 0:
            steps = 0
            t0 = time.perf_counter()
            deadline = t0 + seconds
        for _ in range(200):
            with torch.inference_mode():
                q = net(torch.from_numpy(obs).unsqueeze(0))
            action = int(q.argmax(dim=1)[0])
            if rng.random() < epsilon:
                action = int(rng.integers(0, spec["num_actions"]))
            obs, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                obs, _ = env.reset()
        steps += 200
        now = time.perf_counter()
        if rep >= 0 and now >= deadline:
            break
    env.close()
    return steps / (now - t0)


# -- multi-process: real actors -> Redis -> a real shard -------------------------------------


def _actor_process(
    actor_id: int,
    num_actors: int,
    num_envs: int,
    url: str,
    namespace: str,
    maxlen: int,
    seconds: float,
    ready,
    go,
    results,
) -> None:
    from apexq.actors.actor import ApexActor

    spec, s = spec_and_settings(num_envs, actor_id, num_actors, stream_maxlen=maxlen)
    actor = ApexActor(s, url, namespace, spec)
    ready.put(actor_id)
    go.wait()
    steps, dt = run_for(actor, seconds)
    st = actor.stats()
    results.put(
        {
            "actor_id": actor_id,
            "steps": steps,
            "first_step_at": actor.first_step_at,
            "end": actor.first_step_at + dt,
            "transitions_appended": st["transitions_appended"],
            "backpressure_waits": st["backpressure_waits"],
        }
    )


def actors_to_shard_sps(num_actors: int, num_envs: int, seconds: float, server, namespace: str) -> dict:
    from apexq.cluster.components import shard_spec
    from apexq.cluster.config import load_config
    from apexq.core import weights_store
    from apexq.core.connection import connect
    from apexq.learner.network import build_network
    from apexq.replay_server.shard import ReplayShard

    spec, s = spec_and_settings(num_envs)
    capacity = 1_000_000
    maxlen = math.ceil(capacity / s.block_size) + s.max_backlog_blocks + 16
    r = connect(server.url)
    net = build_network(spec, s.hidden_sizes, s.dueling)
    weights_store.publish(r, weights_store.WeightsKeys(namespace), net.state_dict(), 1)  # so actors start at once
    shard = ReplayShard(
        replace(
            shard_spec(load_config(), 0, spec),
            capacity=capacity,
            samples_per_insert=1.0,
            min_size_to_sample=1,
            error_buffer=1e15,
        ),
        server.url,
        namespace,
        seed=0,
    )
    shard.start()
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(
            target=_actor_process,
            daemon=True,
            args=(i, num_actors, num_envs, server.url, namespace, maxlen, seconds, ready, go, results),
        )
        for i in range(num_actors)
    ]
    try:
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=120)
        go.set()
        out = [results.get(timeout=seconds + 120) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        # let the shard drain what was appended, then compare
        appended = sum(o["transitions_appended"] for o in out)
        deadline = time.monotonic() + 30
        while shard.stats()["inserted"] < appended and time.monotonic() < deadline:
            time.sleep(0.05)
        st = shard.stats()
    finally:
        shard.stop()
        for p in procs:
            if p.is_alive():
                p.kill()
    start = min(o["first_step_at"] for o in out)
    end = max(o["end"] for o in out)
    steps = sum(o["steps"] for o in out)
    return {
        "sps": steps / (end - start),
        "steps": steps,
        "seconds": end - start,
        "per_actor_sps": [round(o["steps"] / (o["end"] - o["first_step_at"])) for o in out],
        "appended": appended,
        "shard_inserted": st["inserted"],
        "shard_rejected": st["rejected_total"],
        "backpressure_waits": sum(o["backpressure_waits"] for o in out),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter runs (about a minute)")
    ap.add_argument("--smoke", action="store_true", help="tiny runs, for tests (seconds)")
    ap.add_argument("--envs", type=int, default=256, help="envs per actor for the headline figures")
    args = ap.parse_args()
    mode = "smoke" if args.smoke else ("quick" if args.quick else "full")
    core_s, proc_s, sweep = SIZES[mode]

    from apexq.cluster.redis_server import RedisServer, find_server

    actor_sps, core_info = acting_core_sps(args.envs, core_s)
    gym_sps = gym_loop_sps(core_s)
    by_envs = {}
    for e in sweep:
        by_envs[e] = actor_sps if e == args.envs else acting_core_sps(e, core_s / 2)[0]
    server = RedisServer(find_server()).start()
    try:
        one = actors_to_shard_sps(1, args.envs, proc_s, server, "bench1")
        two = actors_to_shard_sps(2, args.envs, proc_s, server, "bench2")
    finally:
        server.stop()

    speedup = actor_sps / gym_sps
    figures = {
        "actor_sps": round(actor_sps),
        "gym_loop_sps": round(gym_sps),
        "speedup": round(speedup, 1),
        "sps_1_actor": round(one["sps"]),
        "sps_2_actors": round(two["sps"]),
        "scaling_2_vs_1": round(two["sps"] / one["sps"], 2),
        "envs_per_actor": args.envs,
        "actor_sps_by_envs": {str(k): round(v) for k, v in by_envs.items()},
        "actor_blocks_encoded": core_info["blocks"],
        "sps_1_actor_detail": {k: v for k, v in one.items() if k != "sps"},
        "sps_2_actors_detail": {k: v for k, v in two.items() if k != "sps"},
        "sps_actors_method": "real ApexActor processes (spawn) -> private Redis stream -> real ReplayShard "
        "consuming in the benchmark process; machine has %d CPUs" % os.cpu_count(),
        "mode": mode,
    }
    targets = {"speedup": {"target": ">= 20", "value": figures["speedup"], "met": speedup >= 20}}
    k = 1e3
    print(f"actor throughput ({mode}; {args.envs} envs per actor, 1 torch thread, policy forward included)")
    rows = [
        ("ApexActor loop, vector env, no Redis", f"{actor_sps / k:9.1f} k steps/s", ""),
        ("gymnasium single-env loop, same net", f"{gym_sps / k:9.1f} k steps/s", "baseline"),
        ("speedup", f"{speedup:9.1f} x", ">= 20x"),
    ]
    rows += [
        (f"  ApexActor loop, {e} envs", f"{v / k:9.1f} k steps/s", "") for e, v in by_envs.items() if e != args.envs
    ]
    rows += [
        (
            "1 actor process -> Redis -> shard",
            f"{one['sps'] / k:9.1f} k steps/s",
            f"{one['appended']:,} transitions, all inserted: {one['shard_inserted'] >= one['appended']}",
        ),
        (
            "2 actor processes -> Redis -> shard",
            f"{two['sps'] / k:9.1f} k steps/s",
            f"{two['sps'] / one['sps']:.2f}x of 1 actor on {os.cpu_count()} CPUs",
        ),
    ]
    for name, val, note in rows:
        print(f"  {name:40s} {val:>20s}   {note}")
    print(json.dumps({"benchmark": "actors", "figures": figures, "targets": targets}))


if __name__ == "__main__":
    main()
