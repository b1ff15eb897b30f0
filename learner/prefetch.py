"""The prefetch pipeline: background threads keep minibatches ready while the device trains.

For shards in the learner's own process (single-process mode, the learner benchmark) the
pipeline runs inline instead, on the training thread: under CPython's GIL a second thread
doing CPU-bound sampling slows every torch op of the update by lock hand-offs (measured here:
a thread doing 0.1 ms of Python every 1.1 ms cost the update loop 13%), while the same work done
inline costs only itself. Remote shards (Ray actors) are sampled on a background thread,
which spends its time waiting on the network with the GIL released; on a CPU device the
training thread then turns each reply into minibatches itself (see ``prepare_on_get``).

Sampling across shards without bias: a batch of B items is split over shards by a
multinomial draw with probabilities ``total_k / sum(total)`` (each shard's priority mass,
as last reported). Within shard k an item is drawn with probability ``p_i / total_k``, so its
overall probability is ``p_i / sum(total)`` -- exactly proportional prioritized sampling over
the union of shards. Importance weights use that global probability and the global size.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch

from apexq.core.batch import TRANSITION_COLUMNS, SampleBatch
from apexq.core.interfaces import Shard

from .losses import importance_weights

log = logging.getLogger(__name__)
ROWS = ("keys", *TRANSITION_COLUMNS)  # the columns of a shard's sample that stay with each item
# The device tensors of a minibatch. A minibatch is a dict of these plus "keys" and "shard"
# (host arrays: where its priorities go); a dict, as the training loop reads it on every update.
UPDATE_COLUMNS = (*TRANSITION_COLUMNS, "weights")


def deal(a: np.ndarray, k: int) -> np.ndarray:
    """Rows of ``a`` dealt round-robin into ``k`` consecutive groups: row i goes to group i % k."""
    n = a.shape[0]
    return a.reshape(n // k, k, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)


def undeal(a: np.ndarray, k: int) -> np.ndarray:
    """The inverse of :func:`deal`."""
    n = a.shape[0]
    return a.reshape(k, n // k, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)


def example_minibatch(batch_size: int, obs_dim: int, device: torch.device) -> dict:
    """The :data:`UPDATE_COLUMNS` of a minibatch, shaped and typed as :meth:`PrefetchSampler.prepare`
    makes them (zeros, weights ones): what the learner captures its CUDA graph on."""
    B, f32 = batch_size, torch.float32
    return {
        "obs": torch.zeros(B, obs_dim, device=device, dtype=f32),
        "action": torch.zeros(B, dtype=torch.int64, device=device),
        "ret": torch.zeros(B, device=device, dtype=f32),
        "discount": torch.zeros(B, device=device, dtype=f32),
        "next_obs": torch.zeros(B, obs_dim, device=device, dtype=f32),
        "weights": torch.ones(B, device=device, dtype=f32),
    }


class PrefetchSampler:
    def __init__(
        self,
        shards: Sequence[Shard],
        batch_size: int,
        depth: int,
        device: torch.device,
        beta: Callable[[], float],
        rng: Optional[np.random.Generator] = None,
        timeout: float = 1.0,
        batches_per_request: int = 1,
        inline: bool = False,
    ):
        self.shards = list(shards)
        self.batch_size = batch_size
        # one request per shard brings this many minibatches: remote-call overhead is paid once
        self.per_request = max(1, int(batches_per_request))
        self.device = device
        self.beta = beta
        self.timeout = timeout
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.totals = np.ones(len(self.shards))
        self.sizes = np.zeros(len(self.shards), np.int64)
        # totals[k] was reported by shard k (else it is a placeholder), and when stats() last asked it
        self.known = np.zeros(len(self.shards), bool)
        self.asked = np.full(len(self.shards), -np.inf)
        # one queue item = the minibatches of one request (fewer hand-offs between the threads)
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, -(-depth // self.per_request)))
        self._ready: collections.deque = collections.deque()
        self.waits = 0
        self.sampled = 0
        self.shard_errors = 0
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max(1, len(self.shards)), thread_name_prefix="sample")
        self._thread = threading.Thread(target=self._loop, name="prefetch", daemon=True)
        self.error: Optional[BaseException] = None
        self.inline = inline
        # With remote shards the prefetch thread waits on the network; what it gets back is then
        # turned into minibatches by the training thread itself on a CPU device. Done on the
        # prefetch thread, those ~40 small numpy/torch calls per request each release and retake
        # the GIL, and every hand-off stalls the update: a distributed learner's training thread
        # waited 510-520 times a second, 340-370 with this. On CUDA the prefetch thread still
        # prepares them: pinning and the host-to-device copies then overlap the device's work.
        self.prepare_on_get = device.type != "cuda"

    def start(self) -> PrefetchSampler:
        if not self.inline:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            # a put blocked on the full queue returns at once instead of at its next 0.2 s timeout
            while True:
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    break
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def get(self, timeout: float = 1.0) -> Optional[dict]:
        if self.error is not None:
            raise RuntimeError("prefetch thread failed") from self.error
        if not self._ready and self.inline:
            deadline = time.monotonic() + timeout
            while not self._ready and not self._stop.is_set():
                batches = self.sample_once()
                if batches is not None:
                    self._ready.extend(batches)
                else:
                    self.waits += 1
                    if time.monotonic() >= deadline:
                        return None
            return self._ready.popleft() if self._ready else None
        if not self._ready:
            try:
                item = self.queue.get(timeout=timeout)
            except queue.Empty:
                return None
            self._ready.extend(self.prepare(item) if self.prepare_on_get else item)
        return self._ready.popleft()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                fetched = self.fetch()
                batches = fetched if fetched is None or self.prepare_on_get else self.prepare(fetched)
                if batches is None:
                    self.waits += 1
                    continue
                while not self._stop.is_set():
                    try:
                        self.queue.put(batches, timeout=0.2)
                        break
                    except queue.Full:
                        pass
        except BaseException as exc:  # surfaced to the training thread by get()
            self.error = exc

    def split(self, n: int) -> np.ndarray:
        k = len(self.shards)
        if k == 1:
            return np.array([n])
        self.refresh_masses()
        p = np.maximum(self.totals, 0)
        p = p / p.sum() if p.sum() > 0 else np.full(k, 1.0 / k)
        return self.rng.multinomial(n, p)

    def refresh_masses(self, every_s: float = 0.5) -> None:
        """Ask shards whose mass is unknown or zero for it (each at most every ``every_s``).

        Only a shard that is asked for items reports its mass back, so without this the first
        request split on placeholder shares (equal ones: a shard with a quarter of the mass got
        half the items, a bias the importance weights do not undo), and a shard reported empty
        got no share, hence no request, hence no new report: it was never sampled again.
        """
        now = time.monotonic()
        for i in np.flatnonzero((~self.known | (self.totals <= 0)) & (now - self.asked >= every_s)):
            self.asked[i] = now
            try:
                st = self.shards[i].stats()
                self.totals[i], self.sizes[i], self.known[i] = st["priority_total"], st["size"], True
            except Exception:  # not up yet: keep its share and ask again later
                pass

    def sample_once(self) -> Optional[list[dict]]:
        """``batches_per_request`` minibatches from one request per shard, or None if a shard held back."""
        fetched = self.fetch()
        return None if fetched is None else self.prepare(fetched)

    def fetch(self) -> Optional[dict]:
        """One request per shard: the shards' :class:`SampleBatch` replies and the mass and size they imply,
        or None."""
        B, k = self.batch_size, self.per_request
        counts = self.split(B * k)
        futures: dict[int, Optional[Future]]
        if len(self.shards) == 1:  # no thread hop for a single shard
            futures = {0: None}
        else:
            futures = {
                i: self._pool.submit(self.shards[i].sample, int(n), self.timeout) for i, n in enumerate(counts) if n > 0
            }
        parts: dict[int, SampleBatch] = {}
        for i, fut in futures.items():
            try:
                res = fut.result() if fut is not None else self.shards[0].sample(int(counts[0]), self.timeout)
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
                    self.totals[i], self.sizes[i], self.known[i] = st["priority_total"], st["size"], True
                except Exception:  # shard down: leave its share as it was
                    pass
                continue
            parts[i] = res
            self.totals[i], self.sizes[i], self.known[i] = res.total, res.size, True
        if len(parts) != len(futures):
            return None  # items already drawn from other shards are dropped; counted as a wait
        return {"parts": parts, "total_mass": float(self.totals.sum()), "size": int(self.sizes.sum())}

    def prepare(self, fetched: dict) -> list[dict]:
        """The ``batches_per_request`` minibatches of one fetched request, as tensors on the device."""
        B, k = self.batch_size, self.per_request
        parts, total_mass, size = fetched["parts"], fetched["total_mass"], fetched["size"]
        order = sorted(parts)
        if len(order) == 1:
            part = parts[order[0]]
            cat = {c: getattr(part, c) for c in ROWS}
            shard_of = np.full(len(part.keys), order[0], np.int32)
            gprob = part.prob * (part.total / total_mass)
            if k > 1:
                # A shard draws its n = k*B items stratified over its priority mass (one per
                # stratum), in slot order: cut in k consecutive pieces, minibatch j would hold only
                # the j-th k-th of the mass (a narrow stretch of the ring, i.e. of time). Dealt
                # round-robin instead, minibatch j gets draws j, j+k, j+2k, ...: one from every
                # k-th stratum, itself stratified over the whole mass. Each item's probability is
                # unchanged. (Learner.send_priorities undoes the deal, so priorities go back in
                # slot order, which the shard's sum-tree updates twice as fast as shuffled.)
                cat = {c: deal(a, k) for c, a in cat.items()}
                gprob = deal(gprob, k)
        else:
            cat = {c: np.concatenate([getattr(parts[i], c) for i in order]) for c in ROWS}
            shard_of = np.concatenate([np.full(len(parts[i].keys), i, np.int32) for i in order])
            # global probability of each item: p_i / sum_k total_k = prob_in_shard * total_k / sum
            scale = np.concatenate([np.full(len(parts[i].keys), parts[i].total) for i in order]) / total_mass
            gprob = np.concatenate([parts[i].prob for i in order]) * scale
            perm = self.rng.permutation(len(shard_of))  # mix shards inside every minibatch
            cat = {c: a[perm] for c, a in cat.items()}
            shard_of, gprob = shard_of[perm], gprob[perm]
        self.sampled += int(len(shard_of))
        # importance weights of all k minibatches at once, each normalised by its own maximum
        w = importance_weights(gprob.reshape(k, B), size, self.beta())
        pin = self.device.type == "cuda"

        def dev(a, dtype=None):
            # arrays that came through Ray are read-only views of its object store; torch
            # warns on those (it cannot promise not to write), so they are copied: a few KB
            a = np.ascontiguousarray(a) if a.flags.writeable else np.array(a, order="C")
            t = torch.from_numpy(a)
            if dtype is not None:
                t = t.to(dtype)
            if pin:
                t = t.pin_memory()
            return t.to(self.device, non_blocking=pin).view(k, B, *a.shape[1:]).unbind(0)

        cols = {c: dev(cat[c], torch.int64 if c == "action" else None) for c in TRANSITION_COLUMNS}
        cols["weights"] = dev(w.reshape(-1))
        keys = cat["keys"].reshape(k, B)
        shard_rows = shard_of.reshape(k, B)
        return [
            {**{name: col[j] for name, col in cols.items()}, "keys": keys[j], "shard": shard_rows[j]} for j in range(k)
        ]
