"""Redis key names of one run's replay. A namespace (the run id) lets several runs share a server.

The weights' keys are in :mod:`apexq.core.weights_store`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    namespace: str

    def stream(self, shard: int) -> str:
        return f"apexq:{self.namespace}:shard:{shard}:stream"

    def group(self, shard: int) -> str:
        return "shard"

    def epoch(self, shard: int) -> str:
        return f"apexq:{self.namespace}:shard:{shard}:epoch"

    def appended(self, shard: int) -> str:
        """Hash actor_id -> transitions acknowledged by Redis (XADD returned)."""
        return f"apexq:{self.namespace}:shard:{shard}:appended"

    def counts(self, shard: int) -> str:
        """Hash of the shard's durable counters: ingested transitions, rejected entries."""
        return f"apexq:{self.namespace}:shard:{shard}:counts"

    def rpc(self, shard: int) -> str:
        """List of sample/stats requests to a standalone shard (``apexq replay-server``)."""
        return f"apexq:{self.namespace}:shard:{shard}:rpc"

    def prio(self, shard: int) -> str:
        """List of priority updates to a standalone shard."""
        return f"apexq:{self.namespace}:shard:{shard}:prio"

    def reply(self, shard: int, client: str) -> str:
        """A requester's own list of replies from a standalone shard."""
        return f"apexq:{self.namespace}:shard:{shard}:reply:{client}"
