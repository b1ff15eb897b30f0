from __future__ import annotations

from apexq.actors.actor import ApexActor

from ..metrics import serve_component
from . import current_node_id, new_incarnation


class ActorService(ApexActor):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.incarnation = new_incarnation()  # tells the driver that Ray restarted the process

    def stats(self) -> dict:
        return {**super().stats(), "incarnation": self.incarnation}

    def serve_metrics(self, host: str, port: int = 0) -> str:
        return serve_component("actor", self.s.actor_id, self.stats, host, port)

    def node_id(self) -> str:
        return current_node_id()
