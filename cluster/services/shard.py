from __future__ import annotations

from replay_server.shard import ReplayShard

from ..metrics import serve_component
from . import current_node_id


class ShardService(ReplayShard):
    def serve_metrics(self, host: str = "127.0.0.1", port: int = 0) -> str:
        return serve_component("shard", self.spec.shard_id, self.stats, host, port)

    def node_id(self) -> str:
        return current_node_id()
