from __future__ import annotations

from typing import Optional

from ..metrics import serve_component
from . import current_node_id


class LearnerService:
    """The learner as a Ray actor: a thin shell that builds ``learner.learner.Learner`` in its own process.

    Not a subclass, so that the driver, which needs this class to create the actor, never
    imports torch: that import takes ~2.8 s here, and it used to delay the creation of every
    component of a run (the learner's own process imports torch anyway).
    """

    def __init__(self, *args, **kwargs):
        from apexq.learner.learner import Learner

        self.impl = Learner(*args, **kwargs)
        self.started = False  # whether this process has begun training (after any restore)

    def run(self, max_updates: Optional[int] = None, restore: Optional[bytes] = None) -> dict:
        """Train; a process's first ``run`` starts from ``restore``, the bytes of the run's checkpoint.

        The driver sends them from its run directory when resuming and again whenever Ray
        restarted this actor (a new process on any node). A later ``run`` of the same process
        (its earlier one raised) ignores them: its own state is newer.
        """
        if not self.started:
            if restore is not None:
                self.impl.restore(restore, "the run's checkpoint.pt")
            self.started = True
        return self.impl.run(max_updates)

    def stats(self) -> dict:
        # "started": False until a restore is done, so the driver never takes a restarted process's
        # fresh counters (updates 0) for the run's
        return {**self.impl.stats(), "started": self.started}

    def stop(self) -> None:
        self.impl.stop()

    def ping(self) -> bool:
        return True

    def save_checkpoint(self, extra: Optional[dict] = None, export_wait_s: float = 300.0) -> Optional[str]:
        """None from a process that has not started (restarted by Ray, not yet restored): its fresh
        network must not replace the run's checkpoint."""
        return self.impl.save_checkpoint(extra, export_wait_s=export_wait_s) if self.started else None

    def artifacts(self, token: str = "", version: int = 0) -> tuple[str, int, dict]:
        return self.impl.artifacts(token, version)

    def set_best_policy(self, weights_version: int, eval_return: float, state: dict) -> None:
        self.impl.set_best_policy(weights_version, eval_return, state)

    def set_extra(self, extra: dict) -> None:
        self.impl.set_extra(extra)

    def serve_metrics(self, host: str, port: int = 0) -> str:
        return serve_component("learner", 0, self.impl.stats, host, port)

    def node_id(self) -> str:
        return current_node_id()
