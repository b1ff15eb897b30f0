"""The prefetch pipeline: background threads keep minibatches ready while the device trains.

Sampling across shards without bias: a batch of B items is split over shards by a
multinomial draw with probabilities ``total_k / sum(total)`` (each shard's priority mass,
as last reported). Within shard k an item is drawn with probability ``p_i / total_k``, so its
overall probability is ``p_i / sum(total)`` -- exactly proportional prioritized sampling over
the union of shards. Importance weights use that global probability and the global size.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .losses import importance_weights

log = logging.getLogger(__name__)


class PrefetchSampler:
    def __init__(self, shards: Sequence, batch_size: int, depth: int, device: torch.device,
                 beta: Callable[[], float], seed: int = 0, timeout: float = 1.0, batches_per_request: int = 1):
        self.shards = list(shards)
        self.batch_size = batch_size
        # one request per shard brings this many minibatches: remote-call overhead is paid once
        self.per_request = max(1, int(batches_per_request))
        self.device = device
        self.beta = beta
        self.timeout = timeout
        self.rng = np.random.default_rng([seed, 7])
        self.totals = np.ones(len(self.shards))
        self.sizes = np.zeros(len(self.shards), np.int64)
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.waits = 0
        self.sampled = 0
        self.shard_errors = 0
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max(1, len(self.shards)), thread_name_prefix="sample")
        self._thread = threading.Thread(target=self._loop, name="prefetch", daemon=True)
        self.error: Optional[BaseException] = None

    def start(self) -> "PrefetchSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def get(self, timeout: float = 1.0) -> Optional[dict]:
        if self.error is not None:
            raise RuntimeError("prefetch thread failed") from self.error
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                batches = self.sample_once()
                if batches is None:
                    self.waits += 1
                    continue
                for batch in batches:
                    while not self._stop.is_set():
                        try:
                            self.queue.put(batch, timeout=0.2)
                            break
                        except queue.Full:
                            pass
        except BaseException as exc:  # surfaced to the training thread by get()
            self.error = exc

    def split(self, n: int) -> np.ndarray:
        k = len(self.shards)
        if k == 1:
            return np.array([n])
        p = np.maximum(self.totals, 0)
        p = p / p.sum() if p.sum() > 0 else np.full(k, 1.0 / k)
        return self.rng.multinomial(n, p)

    def sample_once(self) -> Optional[list[dict]]:
        """``batches_per_request`` minibatches from one request per shard, or None if a shard held back."""
        B, k = self.batch_size, self.per_request
        counts = self.split(B * k)
        futures = {i: self._pool.submit(self.shards[i].sample, int(n), self.timeout)
                   for i, n in enumerate(counts) if n > 0}
        parts = {}
        for i, fut in futures.items():
            try:
                res = fut.result()
            except Exception as exc:  # the shard is restarting: wait for it rather than fail the learner
                self.shard_errors += 1
                log.warning("sampling from shard %d failed (%s); retrying", i, type(exc).__name__)
                time.sleep(0.5)
                res = None
            if res is None:
                # this shard is rate limited / not ready: refresh its mass from stats so the
                # split adapts, and retry the whole batch later
                try:
                    st = self.shards[i].stats()
                    self.totals[i], self.sizes[i] = st["priority_total"], st["size"]
                except Exception:  # shard down: leave its share as it was
                    pass
                continue
            parts[i] = res
            self.totals[i], self.sizes[i] = res["total"], res["size"]
        if len(parts) != len(futures):
            return None  # items already drawn from other shards are dropped; counted as a wait
        total_mass = float(self.totals.sum())
        size = int(self.sizes.sum())
        order = sorted(parts)
        cat = {key: np.concatenate([parts[i][key] for i in order]) for key in
               ("keys", "obs", "action", "ret", "discount", "next_obs", "prob")}
        shard_of = np.concatenate([np.full(len(parts[i]["keys"]), i, np.int32) for i in order])
        # global probability of each item: p_i / sum_k total_k = prob_in_shard * total_k / sum
        scale = np.concatenate([np.full(len(parts[i]["keys"]), parts[i]["total"]) for i in order]) / total_mass
        gprob = torch.from_numpy(cat["prob"] * scale)
        beta = self.beta()
        if len(order) > 1:  # mix shards inside every minibatch
            perm = self.rng.permutation(len(shard_of))
            cat = {key: v[perm] for key, v in cat.items()}
            shard_of, gprob = shard_of[perm], gprob[perm]
        self.sampled += int(len(shard_of))
        pin = self.device.type == "cuda"

        def dev(a, dtype=None):
            t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
            if dtype is not None:
                t = t.to(dtype)
            if pin:
                t = t.pin_memory()
            return t.to(self.device, non_blocking=pin)

        out = []
        for j in range(k):
            sl = slice(j * B, (j + 1) * B)
            weights = importance_weights(gprob[sl], size, beta).float()
            out.append({"obs": dev(cat["obs"][sl]), "action": dev(cat["action"][sl], torch.int64),
                        "ret": dev(cat["ret"][sl]), "discount": dev(cat["discount"][sl]),
                        "next_obs": dev(cat["next_obs"][sl]), "weights": dev(weights),
                        "keys": cat["keys"][sl], "shard": shard_of[sl]})
        return out
