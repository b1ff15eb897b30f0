"""The learner: n-step Double DQN updates fed by the prefetch pipeline.

A plain class (no Ray import). Priorities go back to the shards and weights go out to Redis
on a background executor, off the training path.
"""

from __future__ import annotations

import collections
import copy
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Optional

import numpy as np
import torch

from apexq.core import weights_store
from apexq.core.connection import connect
from apexq.core.interfaces import Shard

from . import checkpoint as ckpt
from .artifacts import Outbox
from .cuda_graph import UpdateGraph
from .export import BackgroundExporter, read_policy_files
from .losses import beta_at, double_dqn_targets, new_priorities, td_loss
from .network import build_network
from .optim import FlatAdam
from .prefetch import PrefetchSampler, example_minibatch, undeal
from .settings import LearnerSettings

log = logging.getLogger(__name__)

GIL_SWITCH_INTERVAL_S = 5e-4  # in learner processes with remote shards (see Learner.__init__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("learner.device: cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


class Learner:
    def __init__(
        self,
        settings: LearnerSettings,
        spec: dict,
        shards: Sequence[Shard],
        redis_url: Optional[str] = None,
        namespace: str = "default",
        checkpoint_path: Optional[str] = None,
        resume: Optional[dict] = None,
        config: Optional[dict] = None,
    ):
        self.s = settings
        torch.set_num_threads(settings.torch_threads)
        torch.manual_seed(settings.seed)
        self.device = resolve_device(settings.device)
        self.spec = spec
        self.config = config or {}
        self.online = build_network(spec, settings.hidden_sizes, settings.dueling).to(self.device)
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        # before torch.compile sees the parameters: the optimizer re-homes them into one buffer
        self.opt = FlatAdam(self.online.parameters(), settings.lr)
        self._online_fwd, self._target_fwd = self._compiled(settings)
        self.shards = list(shards)
        self.updates = 0
        self.weights_version = 0
        self.extra: dict = {}
        # the prefetch sampler's generator lives here so that checkpoints carry its state
        self.sample_rng = np.random.default_rng([settings.seed, 7])
        # with a path, checkpoints are written there; without one, they go to the outbox (see save_checkpoint)
        self.checkpoint_path = checkpoint_path
        self.outbox = Outbox()
        if resume is not None:
            self.load_state(resume)
        self.redis = connect(redis_url) if redis_url else None
        self.keys = weights_store.WeightsKeys(namespace)
        if self.redis is not None:
            # a restarted or resumed learner must publish versions newer than what actors already hold
            try:
                self.weights_version = max(self.weights_version, weights_store.published_version(self.redis, self.keys))
            except Exception as exc:
                log.warning("could not read the published weights version: %s", exc)
        self.best_policy: Optional[dict] = None  # the weights with the best greedy evaluation
        if resume is not None and resume.get("best_policy"):
            self.best_policy = resume["best_policy"]
        self._bg = ThreadPoolExecutor(1, thread_name_prefix="learner-bg")
        self._exporter = BackgroundExporter(spec, settings.hidden_sizes, settings.dueling)
        self._stop = threading.Event()
        # loss, mean |TD| and mean Q of the taken actions, every 10th update: kept on the device
        # and read to the host only when asked (see metrics), so that training never waits for it
        self._metric_values: Optional[torch.Tensor] = None
        # On CUDA, what leaves the device (a request's priorities, published weights) is copied
        # into pinned host memory without waiting; the copy's event says when it may be read, so
        # the training thread never synchronises with the device (benchmarks/learner.py
        # --sync-host-copies measures the other way: a blocking copy per request).
        self.async_host_copies = self.device.type == "cuda"
        self._copied: collections.deque = collections.deque()  # (event or None, priorities, buffer)
        self.priority_errors = 0
        self.first_update_at: Optional[float] = None  # wall clock (time.time()) of this process's first update
        self.checkpoint_error: Optional[str] = None
        self._prio_buf: list = []
        self.sampler: Optional[PrefetchSampler] = None
        # shards living in this process are sampled and updated on the training thread (see prefetch.py)
        self.local_shards = all(sh.in_process for sh in self.shards)
        # Priorities go to the shards from the training thread itself when no shard makes it wait
        # (in-process shards, Ray proxies whose call returns at once): a helper thread would cost
        # more in GIL hand-offs than the call. A distributed learner's training thread waited
        # 460-520 times a second with this hand-off and the prefetch thread's, 190-220 without.
        # Shards reached through a Redis round trip still get priorities from the background thread.
        self.inline_priorities = all(sh.in_process or sh.nonblocking_priorities for sh in self.shards)
        if not self.local_shards:
            # The prefetch and priority threads hold the GIL for Ray calls while the training
            # thread is inside torch without it; at CPython's default 5 ms switch interval the
            # training thread then waits up to 5 ms to get it back. At 0.5 ms a default run on
            # this 2-core machine went from 143-166 to 169-199 updates/s (same run, same settings).
            sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self._last_ckpt = time.monotonic()
        self.publish()

    def _compiled(self, s: LearnerSettings):
        """Forward functions for the update: eager or torch.compile'd; whether to capture the whole
        update as a CUDA graph (``self._graphs``, see cuda_graph.py; the graph is recorded at the
        first update, on its minibatch's shapes).

        Parameters stay owned by the plain modules, so checkpoints and published weights are the
        same whichever mode runs.
        """
        self._graphs = bool(s.cuda_graphs)
        self._graph: Optional[UpdateGraph] = None
        if self._graphs and self.device.type != "cuda":
            log.debug("learner.cuda_graphs: no CUDA device; the update runs eagerly on %s", self.device)
            self._graphs = False
        if self._graphs:
            self.opt.enable_graph_step()
        if not s.compile:
            return self.online, self.target
        log.info("compiling the Q-network forward with torch.compile")
        return torch.compile(self.online), torch.compile(self.target)

    # -- state -----------------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "format": "apexq-checkpoint-v1",
            "online": self.online.state_dict(),
            "target": self.target.state_dict(),
            "optimizer": self.opt.state_dict(),
            "updates": self.updates,
            "weights_version": self.weights_version,
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": self.sample_rng.bit_generator.state,
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "settings": asdict(self.s),
            "spec": self.spec,
            "config": self.config,
            "extra": dict(self.extra),
            **({"best_policy": self.best_policy} if self.best_policy else {}),
        }

    def load_state(self, state: dict) -> None:
        self.online.load_state_dict(state["online"])
        self.target.load_state_dict(state["target"])
        self.opt.load_state_dict(state["optimizer"])
        self.updates = int(state["updates"])
        self.weights_version = int(state["weights_version"])
        self.extra = dict(state.get("extra", {}))
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        if state.get("numpy_rng"):
            self.sample_rng.bit_generator.state = state["numpy_rng"]
        if state.get("cuda_rng") and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def restore(self, data: bytes, where: str = "checkpoint.pt") -> None:
        """Continue from a checkpoint's bytes (a resumed run; a learner process Ray restarted).

        The driver reads them from its run directory and hands them over, so this works on any
        node. Read with ``weights_only=True``. Published versions keep rising: actors only take
        a version newer than the one they hold.
        """
        state = ckpt.loads(data, where)
        before = self.weights_version
        self.load_state(state)
        if state.get("best_policy"):
            self.best_policy = state["best_policy"]
        published = 0
        if self.redis is not None:
            try:
                published = weights_store.published_version(self.redis, self.keys)
            except Exception as exc:
                log.warning("could not read the published weights version: %s", exc)
        self.weights_version = max(self.weights_version, before, published)
        log.warning("learner restored from %s at update %d", where, self.updates)
        self.publish()

    def save_checkpoint(
        self, extra: Optional[dict] = None, wait: bool = True, export_wait_s: float = 300.0
    ) -> Optional[str]:
        """Checkpoint, and export the greedy policy (``policy.pt2`` and its siblings, see export.py).

        With a ``checkpoint_path`` both are written there (the checkpoint atomically). Without one,
        as in a run, whose directory may be on another node, nothing is written where the run's
        files live: the checkpoint's bytes go to :attr:`outbox` now, the policy files' once the
        export (into a private folder of this process) is done; the driver takes them from there.
        The export runs in a helper process (see :class:`BackgroundExporter`); ``wait`` returns
        once it is done or after ``export_wait_s`` (the periodic checkpoints of :meth:`run` do not wait):
        the checkpoint is written before the export, so a slow export costs the policy files only.
        Returns the checkpoint's path (``"outbox"`` without one), or None (recording
        ``checkpoint_error``) when it could not be written.
        """
        if extra:
            self.extra.update(extra)
        self._last_ckpt = time.monotonic()
        if self.checkpoint_path:
            try:
                ckpt.save_atomic(self.state(), self.checkpoint_path)
            except OSError as exc:  # disk full, folder gone: the previous checkpoint is still whole
                self.checkpoint_error = (
                    f"{os.path.dirname(self.checkpoint_path)}: {exc.strerror or exc} while "
                    f"writing {os.path.basename(self.checkpoint_path)}"
                )
                log.error("checkpoint failed: %s", self.checkpoint_error)
                return None
            where, then = self.checkpoint_path, None
            path = os.path.join(os.path.dirname(self.checkpoint_path), "policy.pt2")
        else:
            self.outbox.put({"checkpoint.pt": ckpt.dumps(self.state())})
            folder = tempfile.mkdtemp(prefix="apexq-policy-")  # removed once read: nothing stays on this node
            where, path = "outbox", os.path.join(folder, "policy.pt2")

            def then(out: str) -> None:
                try:
                    self.outbox.put(read_policy_files(out))
                finally:
                    shutil.rmtree(folder, ignore_errors=True)

        self.checkpoint_error = None
        best = self.best_policy or {}
        info = {
            "env_id": self.config.get("env", {}).get("id"),
            "eval_return": best.get("eval_return"),
            "weights_version": best.get("weights_version", self.weights_version),
        }
        done = self._exporter.submit(self.policy_network().state_dict(), path, info, then, waited_on=wait)
        if wait:
            try:
                done.result(timeout=export_wait_s)
            except Exception as exc:  # the checkpoint itself is written; the policy file is a convenience
                log.warning("policy export to %s failed: %s", path, exc)
        return where

    def artifacts(self, token: str = "", version: int = 0) -> tuple[str, int, dict]:
        """(token, version, name -> bytes): the files newer than ``version`` (see learner/artifacts.py)."""
        return self.outbox.since(token, version)

    def checkpoint_if_due(self, extra: Optional[dict] = None) -> None:
        """The periodic checkpoint: every ``checkpoint_every_s``, without waiting for the policy export."""
        if time.monotonic() - self._last_ckpt >= self.s.checkpoint_every_s:
            self.save_checkpoint(extra, wait=False)

    def set_best_policy(self, weights_version: int, eval_return: float, state: dict) -> None:
        """Keep these weights (numpy arrays or tensors, as evaluated) as the run's policy.

        Called by whoever evaluates when an evaluation beats every earlier one. ``policy.pt2``
        is exported from them from then on (the latest weights until the first evaluation), as
        Stable-Baselines3's EvalCallback keeps a best model: DQN's greedy policy can drop
        between evaluations, and the policy a run hands over should be one that was judged.
        """
        # numpy arrays that came through Ray are read-only: np.array copies them (torch warns otherwise)
        tensors = {
            k: v.detach().to("cpu", torch.float32).clone()
            if isinstance(v, torch.Tensor)
            else torch.from_numpy(np.array(v, dtype=np.float32))
            for k, v in state.items()
        }
        self.best_policy = {
            "weights_version": int(weights_version),
            "eval_return": float(eval_return),
            "state": tensors,
        }

    def policy_network(self) -> torch.nn.Module:
        """The network ``policy.pt2`` is exported from: the best evaluated weights, else the online net."""
        if not self.best_policy:
            return self.online
        net = build_network(self.spec, self.s.hidden_sizes, self.s.dueling)
        net.load_state_dict(self.best_policy["state"])
        return net

    def set_extra(self, extra: dict) -> None:
        self.extra.update(extra)

    # -- weights ---------------------------------------------------------------------------

    def publish(self) -> None:
        """Start a new weights version; send it to Redis off the training path (if there is one)."""
        self.weights_version += 1
        if self.redis is None:
            return
        state = self.online.state_dict()
        copied: Optional[torch.cuda.Event] = None
        if self.async_host_copies:
            snapshot = {k: v.detach().to("cpu", non_blocking=True) for k, v in state.items()}
            copied = torch.cuda.Event()
            copied.record()
        else:
            snapshot = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        version = self.weights_version

        def send():
            if version != self.weights_version:
                # a newer version is queued behind this one: actors only take the newest, so this
                # send would be wasted (and with Redis down, each failing send waits out its retries)
                return
            try:
                if copied is not None:
                    copied.synchronize()  # on the background thread: the training thread goes on
                weights_store.publish(self.redis, self.keys, snapshot, version)
            except Exception as exc:  # Redis restarting; the next publish catches up
                log.warning("publishing weights v%d failed: %s", version, exc)

        self._bg.submit(send)

    # -- training --------------------------------------------------------------------------

    def beta(self) -> float:
        return beta_at(self.updates, self.s.beta_start, self.s.beta_anneal_updates)

    def step(self, batch: dict) -> dict:
        """One update on a prepared batch (tensors on the device). Returns the new |TD| priorities."""
        if self._graphs and self._graph is None:
            self._capture(batch)  # on failure, _graphs turns False
        graph = self._graph
        if self._graphs and graph is not None:
            loss, extra = graph.replay(batch) if graph.fits(batch) else self._update(batch)
            self.opt.steps += 1  # graph_step() counts on the device only
        else:
            loss, extra = self._update(batch)
        self.updates += 1
        if self.first_update_at is None:
            self.first_update_at = time.time()
        if self.s.target_tau > 0:  # Polyak averaging every update
            with torch.no_grad():
                torch._foreach_lerp_(list(self.target.parameters()), list(self.online.parameters()), self.s.target_tau)
        elif self.updates % self.s.target_update_period == 0:
            self.target.load_state_dict(self.online.state_dict())
        return {**extra, "loss": loss}

    def _update(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Forward, targets, loss, backward, clipping, Adam: device work alone, so that a CUDA
        graph can hold it. Returns ``(loss, {"td", "q_taken"})``."""
        B = batch["obs"].shape[0]
        q_all = self._online_fwd(torch.cat([batch["obs"], batch["next_obs"]]))
        q, q_next_online = q_all[:B], q_all[B:].detach()
        with torch.no_grad():
            q_next_target = self._target_fwd(batch["next_obs"])
            targets = double_dqn_targets(batch["ret"], batch["discount"], q_next_online, q_next_target)
        loss, extra = td_loss(q, batch["action"], targets, batch["weights"])
        self.opt.zero_grad()
        loss.backward()
        if self.s.grad_clip > 0:
            self.opt.clip_grad_norm_(self.s.grad_clip)
        if self._graphs:
            self.opt.graph_step()
        else:
            self.opt.step()
        return loss.detach(), extra

    def _example_batch(self) -> dict:
        """A minibatch of the sampler's shapes and dtypes (its values do not matter to a capture)."""
        return example_minibatch(self.s.batch_size, int(self.spec["obs_dim"]), self.device)

    def _capture(self, batch: dict) -> None:
        try:
            self._graph = UpdateGraph(self._update, self.opt, batch)
            log.info("learner: the update is captured as a CUDA graph (batch %d)", batch["obs"].shape[0])
        except Exception as exc:  # an op this torch cannot capture: train without the graph
            log.warning(
                "learner.cuda_graphs: capturing the update failed (%s: %s); the learner runs without CUDA graphs",
                type(exc).__name__,
                exc,
            )
            self._graph = None
            self._graphs = False

    def send_priorities(self, keys: np.ndarray, shard_of: np.ndarray, td: torch.Tensor) -> None:
        """Queue new priorities; they leave in one call per shard every ``batches_per_request`` updates.

        Each minibatch's priorities ``|td|`` (:func:`new_priorities` with eps 0: the shard adds its
        own) are a new tensor, so a CUDA graph's next replay, which overwrites ``td``, cannot change
        them. They stay on the device until the request is complete: one concatenation and one copy
        to the host per request rather than per update. On CUDA that copy does not block; the
        request is sent by a later call (or :meth:`flush_priorities`) once it has landed.
        """
        self._prio_buf.append((keys, shard_of, new_priorities(td, 0.0)))
        if len(self._prio_buf) >= self.s.batches_per_request:
            buf, self._prio_buf = self._prio_buf, []
            pr = torch.cat([b[2] for b in buf])
            copied: Optional[torch.cuda.Event] = None
            if self.async_host_copies:
                host = pr.to("cpu", non_blocking=True)  # into pinned memory
                copied = torch.cuda.Event()
                copied.record()
            else:
                host = pr.cpu()
            self._copied.append((copied, host, buf))
        self._send_copied()

    def flush_priorities(self) -> None:
        """Send every complete request's priorities now, waiting for their copies to the host."""
        self._send_copied(wait=True)

    def _send_copied(self, wait: bool = False) -> None:
        """Send the requests whose priorities are on the host, oldest first."""
        while self._copied:
            copied, host, buf = self._copied[0]
            if copied is not None and not wait and not copied.query():
                return
            if copied is not None:
                copied.synchronize()
            self._copied.popleft()
            self._send_request(host.numpy(), buf)

    def _send_request(self, request_pr: np.ndarray, buf: list) -> None:
        """One request's priorities to their shards (inline, or from the background thread)."""

        def send():
            keys, pr = np.concatenate([b[0] for b in buf]), request_pr
            shard_of = np.concatenate([b[1] for b in buf])
            if len(self.shards) == 1 and len({len(b[0]) for b in buf}) == 1:
                # these minibatches were most likely one request, dealt round-robin by the sampler:
                # undealt, the keys are back in slot order (if not, the shard just sorts them)
                keys, pr = undeal(keys, len(buf)), undeal(pr, len(buf))
            for i in range(1) if len(self.shards) == 1 else np.unique(shard_of):
                m = slice(None) if len(self.shards) == 1 else shard_of == i
                try:
                    self.shards[int(i)].update_priorities(keys[m], pr[m])
                except Exception as exc:
                    self.priority_errors += 1
                    log.debug("priority update to shard %d failed: %s", i, exc)

        if self.inline_priorities:
            send()
        else:
            self._bg.submit(send)

    def run(self, max_updates: Optional[int] = None) -> dict:
        """Train until :meth:`stop` (or ``max_updates``); writes a checkpoint at the end."""
        if self._graphs and self._graph is None:
            # before the prefetch thread starts: while a graph is captured, no other thread of
            # the process may allocate device or pinned memory (CUDA refuses such calls then)
            self._capture(self._example_batch())
        self.sampler = PrefetchSampler(
            self.shards,
            self.s.batch_size,
            self.s.prefetch,
            self.device,
            self.beta,
            rng=self.sample_rng,
            batches_per_request=self.s.batches_per_request,
            inline=self.local_shards,
        ).start()
        try:
            while not self._stop.is_set():
                batch = self.sampler.get(timeout=0.5)
                if batch is None:
                    self._send_copied()  # a request copied during the last updates goes out while waiting
                    continue
                self.train_step(batch)
                if max_updates is not None and self.updates >= max_updates:
                    break
        finally:
            self.sampler.stop()
        return self.finish()

    def train_step(self, batch: dict) -> None:
        """One update and what follows it: priorities back, metrics, publishing, the periodic checkpoint.

        The whole of training is this, whoever drives it: :meth:`run` on its own thread, or the
        single-process run's loop through :meth:`train_ready`.
        """
        extra = self.step(batch)
        self.send_priorities(batch["keys"], batch["shard"], extra["td"])
        if self.updates % 10 == 0:  # a new tensor: a CUDA graph's next replay leaves it as it is
            self._metric_values = torch.stack([extra["loss"], extra["td"].abs().mean(), extra["q_taken"].mean()])
        if self.updates % self.s.publish_every == 0:
            self.publish()
        self.checkpoint_if_due()

    def train_ready(self) -> int:
        """Train on every batch the in-process shards allow now, on this thread; how many updates.

        For a loop that steps actors and learner in turn (single-process mode): the sampler is
        made once, reads the shards inline and never waits (the rate limiter says when to stop).
        """
        if self.sampler is None:
            self.sampler = PrefetchSampler(
                self.shards, self.s.batch_size, 1, self.device, self.beta, rng=self.sample_rng, timeout=0.0
            )
        n = 0
        while (got := self.sampler.sample_once()) is not None:
            for batch in got:
                self.train_step(batch)
                n += 1
        return n

    def finish(self) -> dict:
        """The last weights out (and every queued send done); this process's stats."""
        self.flush_priorities()
        self.publish()
        self._bg.submit(lambda: None).result(timeout=30)
        return self.stats()

    def stop(self) -> None:
        self._stop.set()

    def ping(self) -> bool:
        return True

    @property
    def metrics(self) -> dict[str, Optional[float]]:
        """Loss, mean |TD| and mean Q of the taken actions at the last 10th update (None before it).

        Read from the device here, when asked (the driver asks once per tick), not at each update.
        """
        values = self._metric_values
        if values is None:
            return {"loss": None, "td_abs": None, "q_mean": None}
        loss, td_abs, q_mean = values.to("cpu").tolist()
        return {"loss": loss, "td_abs": td_abs, "q_mean": q_mean}

    def stats(self) -> dict:
        sp = self.sampler
        return {
            "updates": self.updates,
            "weights_version": self.weights_version,
            "transitions_sampled": sp.sampled if sp else 0,
            "sample_waits": sp.waits if sp else 0,
            "beta": self.beta(),
            "device": str(self.device),
            "cuda_graph": self._graph is not None,
            "priority_errors": self.priority_errors,
            "checkpoint_error": self.checkpoint_error,
            "first_update_at": self.first_update_at,
            "artifacts": list(self.outbox.mark()),
            "best_eval_return": self.best_policy["eval_return"] if self.best_policy else None,
            "best_weights_version": self.best_policy["weights_version"] if self.best_policy else None,
            **self.metrics,
        }
