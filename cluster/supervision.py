"""Supervision of the run's Ray components: restarts, heartbeats, and counters that survive restarts.

Ray recreates a component's process when it dies (``max_restarts=-1``); the supervisor then
submits its ``run`` again, counts the restart toward ``supervision.max_restarts`` (giving up
past it), kills components that stop answering, and keeps each component's counters
never-decreasing across its processes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Optional, TextIO

from .config import Config
from .driver import Snapshot
from .ray_components import Member, Members

log = logging.getLogger("apexq")

# the counters each kind reports that the driver sums into never-decreasing totals
CARRIED_COUNTERS = {"actor": ("env_steps", "episodes"), "shard": ("inserted", "sampled", "rejected_total")}


class SupervisorGaveUp(RuntimeError):
    pass


class Supervisor:
    """``checkpoint`` returns the bytes a restarted learner continues from; ``restarted(m)`` is
    called after a component's run was resubmitted (its metrics endpoint is new)."""

    def __init__(
        self,
        cfg: Config,
        members: Members,
        out: TextIO,
        checkpoint: Callable[[], Optional[bytes]],
        restarted: Callable[[Member], None],
    ):
        self.cfg, self.m, self.out = cfg, members, out
        self.checkpoint, self.restarted = checkpoint, restarted
        self.redis = Member("redis", 0, None)  # the run's own Redis (restarted by Platform.watch_redis)
        self.dead_actor_stats: list[dict] = []  # last stats of actor processes that died (accounting)
        self.stopping = False

    def supervise(self) -> None:
        """Restart the ``run`` of any component whose process died (Ray recreated the actor)."""
        import ray

        members = self.m.supervised
        refs = [m.run_ref for m in members]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for m in members:
            if m.run_ref not in ready:
                continue
            try:
                ray.get(m.run_ref)
                reason = "returned"
            except ray.exceptions.RayActorError as exc:
                reason = f"process died ({type(exc).__name__})"
            except Exception as exc:  # the component raised
                reason = f"raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if self.stopping:
                continue
            counted = not self.same_death(m, reason)
            if not counted:
                log.info("%s %d: Ray is still restarting it; resubmitting its run", m.kind, m.index)
            else:
                # its new process gets a whole heartbeat timeout to come up (a learner restarting
                # slower than the timeout counted from its old process's last answer was killed as hung)
                m.last_seen = max(m.last_seen, time.monotonic())
                self.note_restart(m, reason)
                m.restarts += 1
                log.warning("%s %d %s; restarting it (restart #%d)", m.kind, m.index, reason, m.restarts)
                print(f"apexq: {m.kind} {m.index} {reason}; restarting (#{m.restarts})", file=self.out, flush=True)
            # a learner Ray restarted is a new process, perhaps on another node: it continues from
            # the run's latest checkpoint, which lives here (a process that only raised ignores it)
            restore = (None, self.checkpoint()) if m is self.m.learner else ()
            m.run_ref = m.handle.run.remote(*restore)
            self.restarted(m)
            if counted:
                m.same_death_until = time.monotonic() + 10.0

    @staticmethod
    def same_death(m: Member, reason: str) -> bool:
        """Whether ``m``'s run failed only because Ray was still bringing back the process whose death was counted.

        The run resubmitted at once can reach the dead process and fail with ActorUnavailableError
        seconds later (here 2-4 s), even after the new process answered other calls: one SIGKILLed
        learner counted two restarts (toward supervision.max_restarts and in
        apexq_component_restarts_total). Only once per counted death and within 10 s of the
        resubmission, so a crash loop is still counted.
        """
        if "ActorUnavailableError" in reason and time.monotonic() < m.same_death_until:
            m.same_death_until = 0.0
            return True
        return False

    def note_restart(self, m: Member, reason: str) -> None:
        """Count a restart; past ``supervision.max_restarts`` within ``window_s``, give up (SupervisorGaveUp)."""
        sup = self.cfg.supervision
        now = time.monotonic()
        m.restart_times = [t for t in m.restart_times if now - t <= sup.window_s] + [now]
        recent = sum(
            len([t for t in x.restart_times if now - t <= sup.window_s]) for x in [*self.m.supervised, self.redis]
        )
        if recent > sup.max_restarts:
            raise SupervisorGaveUp(
                f"{recent} component restarts within {sup.window_s:.0f}s "
                f"(supervision.max_restarts={sup.max_restarts}); last: {m.kind} {m.index} {reason}"
            )

    def redis_restarted(self, reason: str) -> int:
        """Count a restart of the run's own Redis; its number."""
        self.redis.restarts += 1
        self.note_restart(self.redis, reason)
        return self.redis.restarts

    def check_heartbeats(self) -> None:
        """Kill components that stopped answering; Ray recreates them and supervise() restarts their run."""
        import ray

        limit = self.cfg.supervision.heartbeat_timeout_s
        now = time.monotonic()
        for m in self.m.supervised:
            if now - m.last_seen > limit:
                log.warning(
                    "%s %d has not answered for %.0fs; killing it for a restart", m.kind, m.index, now - m.last_seen
                )
                print(
                    f"apexq: {m.kind} {m.index} hung (no heartbeat for {now - m.last_seen:.0f}s); restarting",
                    file=self.out,
                    flush=True,
                )
                try:
                    ray.kill(m.handle, no_restart=False)
                except Exception:
                    pass
                # the new process gets a whole timeout of its own to come up before it can be called
                # hung (from the kill, a restart slower than the timeout was killed again)
                m.last_seen = now + limit

    def gather_stats(self, timeout: float = 5.0) -> None:
        import ray

        members = self.m.supervised
        refs = {id(m): m.handle.stats.remote() for m in members}
        for m in self.m.external_shards:  # asked while the Ray components answer
            try:
                m.last_stats = m.handle.stats(timeout=min(timeout, 3.0))
                m.last_seen = time.monotonic()
            except Exception as exc:
                log.warning("standalone replay shard %d did not answer stats: %s", m.index, exc)
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
        ready_set = set(ready)
        for m in members:
            ref = refs[id(m)]
            if ref in ready_set:
                try:
                    st = ray.get(ref)
                except Exception:
                    continue
                m.last_seen = time.monotonic()
                if st.get("started") is False:  # a learner process not yet resumed: its counters are not the run's
                    continue
                self.fold_if_restarted(m, st)
                m.last_stats = st

    def fold_if_restarted(self, m: Member, new: dict) -> None:
        """A new process behind ``m`` (Ray restarted it): carry the old one's counters forward.

        Without this, the run's env steps went backwards after an actor restart. The old
        process's last stats also feed the accounting (what it had acknowledged, held in memory).
        """
        old = m.last_stats
        if not old or old.get("incarnation") == new.get("incarnation"):
            return
        for key in CARRIED_COUNTERS.get(m.kind, ()):
            m.carried[key] = m.carried.get(key, 0) + old.get(key, 0)
        if m.kind == "actor":
            self.dead_actor_stats.append(dict(old))

    def restarts_by_kind(self) -> dict:
        restarts: dict = {"actor": 0, "shard": 0, "learner": 0, "redis": self.redis.restarts}
        for m in self.m.supervised:
            restarts[m.kind] += m.restarts
        return restarts

    def snapshot(self) -> Snapshot:
        """The members' latest stats, with counters carried over restarts (after :meth:`gather_stats`)."""
        shards = self.m.shards + self.m.external_shards
        totals = {
            "env_steps": sum(m.total("env_steps") for m in self.m.actors),
            "episodes": sum(m.total("episodes") for m in self.m.actors),
            "inserted": sum(m.total("inserted") for m in shards),
            "rejected_total": sum(m.total("rejected_total") for m in shards),
        }
        return Snapshot(
            [m.last_stats for m in self.m.actors],
            [m.last_stats for m in shards],
            self.m.learner.last_stats,
            totals,
            sum(self.restarts_by_kind().values()),
        )
