from __future__ import annotations

from learner.learner import Learner

from ..metrics import serve_component
from . import current_node_id


class LearnerService(Learner):
    def serve_metrics(self, host: str = "127.0.0.1", port: int = 0) -> str:
        return serve_component("learner", 0, self.stats, host, port)

    def node_id(self) -> str:
        return current_node_id()
