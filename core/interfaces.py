"""The contracts between the parts: a replay shard as the learner sees it, and an actor's block sink
and weights source.

Each has several implementations, swapped by the composition root (cluster/) for a distributed
run, the single-process run or a benchmark. They are structural (``typing.Protocol``): an
implementation does not inherit from these but defines every member itself, capability flags
included, and tests/unit/test_layout.py checks each implementation against its protocol, so one
that lacks a member fails there rather than in the middle of a run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional, Protocol

import numpy as np

from .batch import SampleBatch


class Shard(Protocol):
    """A replay shard as the learner calls it: the shard itself (``ReplayShard``, in the learner's
    process), a shard in another Ray process (``RayShardProxy``) or a standalone shard reached
    through Redis (``RedisShardClient``)."""

    in_process: bool
    """The shard lives in the caller's process: sampling it is CPU work and never a wait, so the
    learner samples it on its training thread (see learner/prefetch.py)."""

    nonblocking_priorities: bool
    """``update_priorities`` hands the update off and returns at once (no round trip), so the
    training thread may call it itself; otherwise the learner calls it from a helper thread."""

    def sample(self, n: int, timeout: float = 1.0) -> Optional[SampleBatch]:
        """``n`` items, or None when the shard's rate limiter held them back for ``timeout`` s."""

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> Optional[int]:
        """New priorities (|TD|) of items by key; keys of items no longer there are ignored.
        Returns how many applied where the shard knows at once."""

    def stats(self) -> dict:
        """The shard's counters; the learner reads ``priority_total`` and ``size``."""


class BlockSink(Protocol):
    """Where an actor's blocks go: a shard's Redis stream (``StreamWriter``), straight into a shard
    in the single-process run (``DirectWriter``), or a benchmark's ``EncodingWriter``."""

    blocks: int
    transitions: int
    backpressure_waits: int  # times append waited for the shard to catch up

    def append(self, block: Any, stop: Callable[[], bool] = ...) -> None:
        """Take one ``replay_server.codec.Block``; return once it is accepted. ``stop`` ends a wait
        for room early."""


class WeightsSource(Protocol):
    """Where an actor gets the learner's weights: Redis, fetched on a helper thread
    (``WeightsClient``), the learner's own network in the single-process run (``DirectWeights``),
    or none at all in a benchmark (``NoWeights``). Weights are ``(version, name -> array)``."""

    version: int
    """The version the actor acts with; the actor sets it when it loads one (-1 before the first)."""

    @property
    def lag(self) -> int:
        """How many versions the newest one this source has seen is ahead of :attr:`version`."""

    def wait_first(self, timeout: float) -> Optional[tuple[int, dict]]:
        """Any published weights, waiting up to ``timeout`` s for the first; None if there are none."""

    def poll(self) -> Optional[tuple[int, dict]]:
        """Weights newer than :attr:`version` if they have arrived, else None; never waits."""

    def close(self) -> None:
        """Stop fetching."""
