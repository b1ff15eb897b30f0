"""The components as run by the composition root: the plain classes plus a metrics endpoint."""
from __future__ import annotations

from actors.actor import ApexActor
from learner.learner import Learner
from replay_server.shard import ReplayShard

from .metrics import serve_component


class ShardService(ReplayShard):
    def serve_metrics(self, host: str = "127.0.0.1", port: int = 0) -> str:
        return serve_component("shard", self.spec.shard_id, self.stats, host, port)


class ActorService(ApexActor):
    def serve_metrics(self, host: str = "127.0.0.1", port: int = 0) -> str:
        return serve_component("actor", self.s.actor_id, self.stats, host, port)


class LearnerService(Learner):
    def serve_metrics(self, host: str = "127.0.0.1", port: int = 0) -> str:
        return serve_component("learner", 0, self.stats, host, port)
