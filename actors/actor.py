"""The acting loop: a vector of envs, Ape-X epsilons, n-step blocks appended to replay.

A plain class (no Ray import); the composition root runs it as a Ray actor or in-process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Optional

import numpy as np
from threadpoolctl import threadpool_limits

from apexq.core.interfaces import BlockSink, WeightsSource
from apexq.replay_server.client import StreamWriter
from apexq.replay_server.codec import Block

from .envs import final_observations, make_vector_env
from .exploration import TemporallyExtendedEpsilonGreedy, apex_epsilons
from .nstep import NStepAccumulator
from .policy import NumpyQPolicy, initial_priorities
from .weights_client import WeightsClient

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ActorSettings:
    """One actor's settings; cluster/components.py builds them from the config, whose default file
    (configs/mountaincar.yaml) is the only place their defaults live, so none has one here."""

    actor_id: int
    env_id: str
    num_envs: int
    env_offset: int  # global index of this actor's first env (for the epsilon schedule)
    total_envs: int  # envs across all actors
    shard: int
    epsilon_base: float
    epsilon_alpha: float
    explore_mu: float
    explore_max_duration: int
    n_step: int
    gamma: float
    block_size: int
    weights_update_period: int
    max_backlog_blocks: int
    stream_maxlen: int  # entries the shard's stream keeps (components.stream_maxlen)
    seed: int
    hidden_sizes: list
    dueling: bool


class ApexActor:
    def __init__(
        self,
        settings: ActorSettings,
        redis_url: Optional[str],
        namespace: str,
        spec: dict,
        writer: Optional[BlockSink] = None,
        weights: Optional[WeightsSource] = None,
    ):
        """``writer``/``weights`` replace the Redis stream writer and weights client (single-process mode)."""
        self.s = settings
        self.spec = spec
        # one BLAS thread: the forward is a few small matmuls, and OpenBLAS's extra threads per
        # actor process competed with the learner for the cores (2 actors ran 0.32x of 1 here)
        threadpool_limits(limits=1, user_api="blas")  # process-wide, for this process's lifetime
        self.env = make_vector_env(settings.env_id, settings.num_envs)
        # numpy forward pass (no torch in actor processes); random weights until the first publish
        self.policy = NumpyQPolicy(
            spec,
            settings.hidden_sizes,
            settings.dueling,
            rng=np.random.default_rng([settings.seed, 2, settings.actor_id]),
        )
        eps_all = apex_epsilons(settings.total_envs, settings.epsilon_base, settings.epsilon_alpha)
        self.epsilons = eps_all[settings.env_offset : settings.env_offset + settings.num_envs]
        self.rng = np.random.default_rng([settings.seed, 1, settings.actor_id])
        self.explore = TemporallyExtendedEpsilonGreedy(
            self.epsilons, spec["num_actions"], self.rng, settings.explore_mu, settings.explore_max_duration
        )
        self.nstep = NStepAccumulator(settings.num_envs, spec["obs_dim"], settings.n_step, settings.gamma)
        if writer is None or weights is None:
            assert redis_url is not None, "an actor without a writer and weights source needs redis_url"
            writer = writer or StreamWriter(
                redis_url,
                namespace,
                settings.shard,
                settings.actor_id,
                settings.stream_maxlen,
                settings.max_backlog_blocks,
            )
            weights = weights or WeightsClient(redis_url, namespace)
        self.writer: BlockSink = writer
        self.weights: WeightsSource = weights
        self._stop = threading.Event()
        self._pending: list[dict] = []
        self._pending_n = 0
        self.env_steps = 0
        self.episodes = 0
        self.returns: deque = deque(maxlen=100)
        self.block_seq = 0
        self.started = time.time()
        self.first_step_at: Optional[float] = None

    # -- control ---------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def ping(self) -> bool:
        return True

    def stats(self) -> dict:
        r = list(self.returns)
        return {
            "actor_id": self.s.actor_id,
            "env_steps": self.env_steps,
            "episodes": self.episodes,
            "returns": r,
            "mean_return": float(np.mean(r)) if r else None,
            "weights_version": self.weights.version,
            "weights_lag": self.weights.lag,
            "blocks_appended": self.writer.blocks,
            "transitions_appended": self.writer.transitions,
            "backpressure_waits": self.writer.backpressure_waits,
            "epsilon_min": float(self.epsilons.min()),
            "epsilon_max": float(self.epsilons.max()),
            "first_step_at": self.first_step_at,
            "in_flight": self._pending_n,
        }

    # -- loop ------------------------------------------------------------------------------

    def run(self, max_env_steps: Optional[int] = None) -> dict:
        """Act until :meth:`stop` (or ``max_env_steps`` of this actor); flushes what it holds at the end."""
        self.begin()
        while not self._stop.is_set():
            self.step()
            if max_env_steps is not None and self.env_steps >= max_env_steps:
                break
        self.flush()
        self.weights.close()
        return self.stats()

    def begin(self) -> None:
        """Take whatever weights are there and reset the envs: the actor can :meth:`step` from here.

        It acts at once, with the initial weights if the learner has not published yet; newer
        versions arrive through the non-blocking poll of each step.
        """
        got = self.weights.wait_first(timeout=0.0)
        if got is not None:
            self._load(*got)
        self.reset()

    def reset(self) -> None:
        s = self.s
        self._obs, _ = self.env.reset(seed=s.seed * 1_000_003 + s.env_offset)
        self._ep_ret = np.zeros(s.num_envs)
        self._steps = 0

    def step(self) -> None:
        """One step of every env: act, record n-step transitions, append full blocks, poll weights."""
        s = self.s
        obs = self._obs
        E = s.num_envs
        actions = self.explore.select(self.policy.greedy(obs))
        next_obs, rew, term, trunc, infos = self.env.step(actions)
        if self.first_step_at is None:
            self.first_step_at = time.time()
        final = final_observations(next_obs, infos)
        out = self.nstep.add(obs, actions, rew, term, trunc, final)
        if out["action"].size:
            self._pending.append(out)
            self._pending_n += out["action"].size
            if self._pending_n >= s.block_size:
                self._flush(s.block_size)
        self._ep_ret += rew
        done = term | trunc
        if done.any():
            self.explore.end_episodes(done)
            for i in np.flatnonzero(done):
                self.returns.append(float(self._ep_ret[i]))
                self.episodes += 1
            self._ep_ret[done] = 0.0
        self._obs = next_obs
        self._steps += 1
        self.env_steps += E
        if self._steps % s.weights_update_period == 0:
            got = self.weights.poll()
            if got is not None:
                self._load(*got)

    def flush(self) -> None:
        """Append whatever is pending, even a partial block."""
        if self._pending_n:
            self._flush(1)

    def _load(self, version: int, state: dict) -> None:
        self.policy.load_state(state)
        self.weights.version = version

    def _flush(self, min_size: int) -> None:
        cols = {k: np.concatenate([p[k] for p in self._pending]) for k in self._pending[0]}
        self._pending, self._pending_n = [], 0
        total = cols["action"].size
        start = 0
        bs = self.s.block_size
        while total - start >= min_size and start < total:
            end = min(total, start + bs)
            if end - start < min_size:
                break
            sl = slice(start, end)
            obs = np.ascontiguousarray(cols["obs"][sl], np.float32)
            nxt = np.ascontiguousarray(cols["next_obs"][sl], np.float32)
            act = cols["action"][sl].astype(np.int32)
            ret = cols["ret"][sl].astype(np.float32)
            disc = cols["discount"][sl].astype(np.float32)
            prio = initial_priorities(self.policy, obs, act, ret, disc, nxt)
            block = Block(
                obs,
                act,
                ret,
                disc,
                nxt,
                prio,
                actor_id=self.s.actor_id,
                weights_version=max(0, self.weights.version),
                block_seq=self.block_seq,
            )
            self.writer.append(block, stop=lambda: False)
            self.block_seq += 1
            start = end
        if start < total:  # keep the remainder for the next block
            rest = {k: v[start:] for k, v in cols.items()}
            self._pending = [rest]
            self._pending_n = total - start
