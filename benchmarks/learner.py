"""Learner throughput: the real update path fed by its prefetch pipeline vs a bare torch loop.

Runs with torch and numpy alone (an in-process replay shard, no Ray, no Redis server), so it
can run on a GPU machine as it is. Prints a table, then one JSON line:
{"benchmark": "learner", "figures": {...}, "targets": {...}}
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import threading
import time
from dataclasses import replace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from apexq.cluster.components import learner_settings, shard_spec  # noqa: E402
from apexq.cluster.config import load_config  # noqa: E402
from apexq.core.batch import SAMPLE_COLUMNS, SampleBatch  # noqa: E402
from apexq.learner.learner import Learner, LearnerSettings, resolve_device  # noqa: E402
from apexq.replay_server import rpc  # noqa: E402
from apexq.replay_server.codec import Block  # noqa: E402
from apexq.replay_server.shard import ReplayShard  # noqa: E402

SPEC = {"obs_dim": 2, "num_actions": 3, "obs_low": [-1.2, -0.07], "obs_high": [0.6, 0.07]}
DEFAULTS = load_config()  # the packaged default config: every setting a benchmark does not change


def settings(**changes) -> LearnerSettings:
    return replace(learner_settings(DEFAULTS), **changes)


def filled_shard(n: int, seed: int = 0) -> ReplayShard:
    spec = replace(
        shard_spec(DEFAULTS, 0, SPEC), capacity=n, min_size_to_sample=1, samples_per_insert=1.0, error_buffer=1e12
    )
    shard = ReplayShard(spec, redis_url="", namespace="bench", seed=seed)
    rng = np.random.default_rng(seed)
    obs = np.stack([rng.uniform(-1.2, 0.6, n), rng.uniform(-0.07, 0.07, n)], 1).astype(np.float32)
    shard.insert(
        Block(
            obs,
            rng.integers(0, 3, n).astype(np.int32),
            rng.normal(-3, 1, n).astype(np.float32),
            np.full(n, 0.99**3, np.float32),
            obs + 0.01,
            rng.uniform(0.1, 2, n).astype(np.float32),
        )
    )
    return shard


# -- a shard in its own process, as in the distributed layout ------------------------------------
# The learner then samples on its prefetch thread and sends priorities from its background thread
# while the training thread updates; the shard's sum-tree work runs on another core. The transport
# is a pipe instead of Ray, so that this benchmark still needs torch and numpy alone; the messages
# are those of replay_server.rpc (a JSON header and raw arrays, nothing pickled), each behind its
# 4-byte length.


def _write(f, msg: bytes) -> None:
    f.write(struct.pack("<I", len(msg)) + msg)
    f.flush()


def _read(f) -> bytes:
    head = f.read(4)
    if len(head) != 4:
        raise EOFError("shard process closed its pipe")
    return f.read(struct.unpack("<I", head)[0])


def serve_shard(capacity: int, seed: int) -> None:
    """The child's loop: requests on stdin, replies on stdout."""
    shard = filled_shard(capacity, seed)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sample_layout = rpc._sample_layout(SPEC["obs_dim"])
    while True:
        try:
            data = _read(inp)
        except EOFError:
            return
        head, _ = rpc.decode(data, header_only=True)
        if head["op"] == "sample":
            res = shard.sample(head["n"], 1.0)
            reply = {"n": len(res.keys), "total": res.total, "size": res.size}
            _write(
                out,
                rpc.encode(
                    reply,
                    tuple(np.asarray(getattr(res, c), dt) for c, (dt, _) in zip(SAMPLE_COLUMNS, sample_layout(reply))),
                ),
            )
        elif head["op"] == "priorities":
            _, (keys, pr) = rpc.decode(data, rpc._prio_layout)
            shard.update_priorities(keys, pr)
        elif head["op"] == "stats":
            _write(out, rpc.encode({"priority_total": shard.tree.total, "size": shard.size}))


class ShardProcess:
    """What the learner sees of a shard served by another process (``in_process`` False)."""

    in_process = False
    nonblocking_priorities = False  # update_priorities writes to the child's pipe

    def __init__(self, capacity: int, seed: int = 0):
        import subprocess

        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve-shard", str(capacity), str(seed)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._lock = threading.Lock()
        self._layout = rpc._sample_layout(SPEC["obs_dim"])
        self.stats()  # waits until the child has filled its shard

    def sample(self, n: int, timeout: float = 1.0) -> SampleBatch:
        with self._lock:
            _write(self.proc.stdin, rpc.encode({"op": "sample", "n": int(n)}))
            head, arrays = rpc.decode(_read(self.proc.stdout), self._layout)  # read-only arrays, as Ray's
        return SampleBatch(*arrays, total=head["total"], size=head["size"], shard=0)

    def update_priorities(self, keys, priorities) -> None:
        keys = np.asarray(keys, "<i8")
        with self._lock:
            _write(
                self.proc.stdin,
                rpc.encode({"op": "priorities", "n": int(keys.size)}, (keys, np.asarray(priorities, "<f4"))),
            )

    def stats(self) -> dict:
        with self._lock:
            _write(self.proc.stdin, rpc.encode({"op": "stats"}))
            return rpc.decode(_read(self.proc.stdout), header_only=True)[0]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


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
            self.batches.append(
                {
                    "obs": obs,
                    "next_obs": obs + 0.01,
                    "action": torch.randint(0, 3, (batch_size,), generator=g).to(device),
                    "ret": torch.randn(batch_size, generator=g).to(device),
                    "discount": torch.full((batch_size,), 0.97).to(device),
                    "weights": torch.rand(batch_size, generator=g).to(device),
                }
            )
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

    def __init__(
        self,
        batch_size: int,
        device: str,
        shard,
        threads: int = 1,
        batches_per_request: int = 8,
        sync_host_copies: bool = False,
        **modes,
    ):
        s = settings(
            batch_size=batch_size,
            device=device,
            publish_every=10**9,
            checkpoint_every_s=1e9,
            torch_threads=threads,
            batches_per_request=batches_per_request,
            **modes,
        )
        self.learner = Learner(s, SPEC, [shard])
        if sync_host_copies:  # a blocking copy of each request's priorities to the host, as before
            self.learner.async_host_copies = False
        self.run(20)  # warm-up

    def run(self, updates: int) -> float:
        lr = self.learner
        lr._stop.clear()
        t0 = time.perf_counter()
        lr.run(max_updates=lr.updates + updates)
        if lr.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def measure(
    batch_size: int,
    updates: int,
    rounds: int,
    device: torch.device,
    shards: dict,
    threads: int = 1,
    batches_per_request: int = 8,
    sync_host_copies: bool = False,
    **modes,
) -> dict:
    """Interleave rounds of the bare loop and the learner fed by each shard layout (this machine's
    speed drifts); medians of the rounds: {layout: (learner upd/s, bare upd/s, ratio)}. ``modes``
    (learner.compile, learner.cuda_graphs) apply to both."""
    bare = BareLoop(
        batch_size, device, settings(batch_size=batch_size, device=str(device), torch_threads=threads, **modes)
    )
    reals = {
        name: RealLearner(batch_size, str(device), shard, threads, batches_per_request, sync_host_copies, **modes)
        for name, shard in shards.items()
    }
    per = max(1, updates // rounds)
    rates: dict = {name: ([], [], []) for name in reals}
    for i in range(rounds):
        for name, real in reals.items():
            b = per / bare.run(per)
            r = per / real.run(per)
            rates[name][0].append(r)
            rates[name][1].append(b)
            rates[name][2].append(r / b)
            # progress on stderr (the JSON line stays the last line of stdout)
            print(
                f"batch {batch_size}, round {i + 1}/{rounds}, {name}: learner {r:.0f} upd/s, bare {b:.0f} upd/s",
                file=sys.stderr,
                flush=True,
            )
    return {name: tuple(float(np.median(x)) for x in rs) for name, rs in rates.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny run for tests")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--batches-per-request",
        type=int,
        default=DEFAULTS.learner.batches_per_request,
        help="learner.batches_per_request: minibatches per sampling request (default: the config's default)",
    )
    ap.add_argument("--compile", action="store_true", help="learner.compile for the learner and the bare loop")
    ap.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="learner.cuda_graphs false for the learner and the bare loop (on CUDA: eager updates)",
    )
    ap.add_argument(
        "--sync-host-copies",
        action="store_true",
        help="on CUDA, the learner waits for each request's priorities to reach the host (the default does not)",
    )
    ap.add_argument("--serve-shard", nargs=2, type=int, metavar=("CAPACITY", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_shard:
        serve_shard(*args.serve_shard)
        return
    torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except RuntimeError as exc:
        sys.exit(f"benchmarks/learner.py: {exc}")
    updates = 60 if args.smoke else (2000 if args.quick else 6000)
    rounds = 2 if args.smoke else 10
    capacity = 20_000 if args.smoke else 200_000
    remote = ShardProcess(capacity)
    # in_process: the shard lives in the learner's process and the pipeline runs on the training
    # thread (single-process mode); own_process: the distributed layout, the shard on its own core
    shards = {"in_process": filled_shard(capacity), "own_process": remote}
    modes = {
        "compile": args.compile,
        "cuda_graphs": device.type == "cuda" and DEFAULTS.learner.cuda_graphs and not args.no_cuda_graphs,
    }
    figures: dict = {
        "device": str(device),
        "torch_threads": args.threads,
        "batches_per_request": args.batches_per_request,
        "async_host_copies": device.type == "cuda" and not args.sync_host_copies,
        **modes,
    }
    if device.type == "cuda":
        figures["device_name"] = torch.cuda.get_device_name(device)
        figures["torch"] = torch.__version__
    rows = []
    try:
        for bs in (128, 512):
            for layout, (real, bare, eff) in measure(
                bs,
                updates,
                rounds,
                device,
                shards,
                args.threads,
                args.batches_per_request,
                args.sync_host_copies,
                **modes,
            ).items():
                rows.append((layout, bs, real, bare, eff))
                sfx = "" if layout == "in_process" else "_shard_process"
                figures[f"updates_per_s_b{bs}{sfx}"] = round(real, 1)
                figures[f"bare_updates_per_s_b{bs}{sfx}"] = round(bare, 1)
                figures[f"efficiency_b{bs}{sfx}"] = round(eff, 3)
    finally:
        remote.close()
    figures["rounds"] = rounds
    print(
        f"{'shard':<22} {'batch':>6} {'learner upd/s':>14} {'bare upd/s':>11} {'efficiency':>10}   device={device}, "
        f"{args.batches_per_request} minibatches per request, medians of {rounds} interleaved rounds"
    )
    for layout, bs, real, bare, eff in rows:
        where = "in learner's process" if layout == "in_process" else "in its own process"
        print(f"{where:<22} {bs:>6} {real:>14.1f} {bare:>11.1f} {eff:>10.1%}")
    figures["batch_size"] = 512
    figures["updates_per_s"] = figures["updates_per_s_b512"]
    figures["bare_updates_per_s"] = figures["bare_updates_per_s_b512"]
    figures["efficiency"] = figures["efficiency_b512"]
    targets = {}
    for sfx, what in (
        ("", "shard in the learner's process (single-process layout)"),
        ("_shard_process", "shard in its own process (distributed layout)"),
    ):
        eff_min = min(figures[f"efficiency_b128{sfx}"], figures[f"efficiency_b512{sfx}"])
        targets[f"efficiency{sfx}"] = {
            "target": f">= 0.90 at batch 128 and 512, {what}",
            "value": eff_min,
            "met": eff_min >= 0.9,
        }
    print(json.dumps({"benchmark": "learner", "figures": figures, "targets": targets}))


if __name__ == "__main__":
    main()
