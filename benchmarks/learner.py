"""Learner throughput: the real update path fed by its prefetch pipeline vs a bare torch loop.

Runs with torch and numpy alone (an in-process replay shard, no Ray, no Redis server), so it
can run on a GPU machine as it is. Prints a table, then one JSON line:
{"benchmark": "learner", "figures": {...}, "targets": {...}}
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from learner.learner import Learner, LearnerSettings, resolve_device  # noqa: E402
from replay_server.codec import Block  # noqa: E402
from replay_server.shard import ReplayShard, ShardSpec  # noqa: E402

SPEC = {"obs_dim": 2, "num_actions": 3, "obs_low": [-1.2, -0.07], "obs_high": [0.6, 0.07]}


def filled_shard(n: int, seed: int = 0) -> ReplayShard:
    shard = ReplayShard(ShardSpec(0, n, 2, 3, min_size_to_sample=1, samples_per_insert=1.0, error_buffer=1e12),
                        redis_url="", namespace="bench", seed=seed)
    rng = np.random.default_rng(seed)
    obs = np.stack([rng.uniform(-1.2, 0.6, n), rng.uniform(-0.07, 0.07, n)], 1).astype(np.float32)
    shard.insert(Block(obs, rng.integers(0, 3, n).astype(np.int32), rng.normal(-3, 1, n).astype(np.float32),
                       np.full(n, 0.99 ** 3, np.float32), obs + 0.01, rng.uniform(0.1, 2, n).astype(np.float32)))
    return shard


class BareLoop:
    """The learner's own update (``Learner.step``: forward, backward, clipping, Adam, target sync)
    on pre-made batches already on the device -- no sampling, no importance weights, no priorities."""

    def __init__(self, batch_size: int, device: torch.device, settings: LearnerSettings):
        self.learner = Learner(settings, SPEC, [])
        self.device = self.learner.device
        g = torch.Generator().manual_seed(0)
        self.batches = []
        for _ in range(16):
            obs = torch.rand(batch_size, 2, generator=g).to(device)
            self.batches.append({
                "obs": obs, "next_obs": obs + 0.01, "action": torch.randint(0, 3, (batch_size,), generator=g).to(device),
                "ret": torch.randn(batch_size, generator=g).to(device),
                "discount": torch.full((batch_size,), 0.97).to(device), "weights": torch.rand(batch_size, generator=g).to(device)})
        self.run(20)

    def run(self, updates: int) -> float:
        """Seconds for ``updates`` updates."""
        t0 = time.perf_counter()
        for i in range(updates):
            self.learner.step(self.batches[i % 16])
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


class RealLearner:
    """The learner's own run loop: prefetch pipeline, update, priorities sent back to the shard."""

    def __init__(self, batch_size: int, device: str, shard: ReplayShard, threads: int = 1):
        s = LearnerSettings(batch_size=batch_size, device=device, publish_every=10**9, checkpoint_every_s=1e9,
                            torch_threads=threads)
        self.learner = Learner(s, SPEC, [shard])
        self.run(20)  # warm-up

    def run(self, updates: int) -> float:
        lr = self.learner
        lr._stop.clear()
        t0 = time.perf_counter()
        lr.run(max_updates=lr.updates + updates)
        if lr.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def measure(batch_size: int, updates: int, rounds: int, device: torch.device, shard: ReplayShard,
            threads: int = 1) -> tuple:
    """Interleave rounds of the two loops (this machine's speed drifts); medians of the rounds."""
    bare = BareLoop(batch_size, device, LearnerSettings(batch_size=batch_size, device=str(device),
                                                                torch_threads=threads))
    real = RealLearner(batch_size, str(device), shard, threads)
    per = max(1, updates // rounds)
    bare_rates, real_rates, ratios = [], [], []
    for _ in range(rounds):
        b = per / bare.run(per)
        r = per / real.run(per)
        bare_rates.append(b)
        real_rates.append(r)
        ratios.append(r / b)
    return float(np.median(real_rates)), float(np.median(bare_rates)), float(np.median(ratios))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny run for tests")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    updates = 60 if args.smoke else (2000 if args.quick else 6000)
    rounds = 2 if args.smoke else 10
    if device.type == "cuda":
        updates *= 4
    shard = filled_shard(20_000 if args.smoke else 200_000)
    figures: dict = {"device": str(device), "torch_threads": args.threads}
    rows = []
    for bs in (128, 512):
        real, bare, eff = measure(bs, updates, rounds, device, shard, args.threads)
        rows.append((bs, real, bare, eff))
        figures[f"updates_per_s_b{bs}"] = round(real, 1)
        figures[f"bare_updates_per_s_b{bs}"] = round(bare, 1)
        figures[f"efficiency_b{bs}"] = round(eff, 3)
    figures["rounds"] = rounds
    print(f"{'batch':>6} {'learner upd/s':>14} {'bare upd/s':>11} {'efficiency':>10}   device={device}, "
          f"medians of {rounds} interleaved rounds")
    for bs, real, bare, eff in rows:
        print(f"{bs:>6} {real:>14.1f} {bare:>11.1f} {eff:>10.1%}")
    figures["batch_size"] = 512
    figures["updates_per_s"] = figures["updates_per_s_b512"]
    figures["bare_updates_per_s"] = figures["bare_updates_per_s_b512"]
    figures["efficiency"] = figures["efficiency_b512"]
    eff_min = min(figures["efficiency_b128"], figures["efficiency_b512"])
    targets = {"efficiency": {"target": ">= 0.90 at batch 128 and 512", "value": eff_min, "met": eff_min >= 0.9}}
    print(json.dumps({"benchmark": "learner", "figures": figures, "targets": targets}))


if __name__ == "__main__":
    main()
