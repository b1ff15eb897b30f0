from __future__ import annotations

from apexq.replay_server.shard import ReplayShard

from ..metrics import serve_component
from . import current_node_id, new_incarnation


class ShardService(ReplayShard):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.incarnation = new_incarnation()  # tells the driver that Ray restarted the process

    def stats(self) -> dict:
        return {**super().stats(), "incarnation": self.incarnation}

    def serve_metrics(self, host: str, port: int = 0) -> str:
        return serve_component("shard", self.spec.shard_id, self.stats, host, port)

    def node_id(self) -> str:
        return current_node_id()
