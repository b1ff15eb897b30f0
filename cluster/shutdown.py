"""Stopping a distributed run in order, and its accounting.

Actors stop first and flush what they hold; the shards ingest the last blocks; the learner
stops and takes the final checkpoint (with the best evaluated policy); then the shards stop.
The accounting reconciles, per shard, what Redis counted appended against what shards
ingested and what is still pending, and compares it with what actors saw acknowledged.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from .config import Config
from .driver import CARRIED
from .run_dir import RunDir, RunDirError

if TYPE_CHECKING:
    from .driver import Driver
    from .launch import RayBackend

log = logging.getLogger("apexq")
# how long the learner gives the final policy export; it writes the checkpoint before the export,
# and answers after this at the latest, so a slow export costs the policy files, not the checkpoint
FINAL_EXPORT_WAIT_S = 60.0


def shutdown_components(backend: RayBackend, driver: Driver) -> dict:
    """Stop every component in order, take the final checkpoint, write the final record; the summary."""
    import ray

    m, sup, run_dir, out = backend.members, backend.supervisor, backend.run_dir, driver.out
    summary: dict = {}
    if m is None or sup is None:  # start-up failed before the components ran
        return summary
    sup.stopping = True
    redis_url = backend.platform.redis_url
    assert redis_url is not None  # the components ran: Redis was there
    redis_down = backend.platform.redis_down()
    for a in m.actors:
        a.handle.stop.remote()
    # an actor flushes what it holds before it stops; with Redis down it cannot, and would keep the
    # stop waiting in its append's retries (its last stats are the driver's already)
    ray.wait([a.run_ref for a in m.actors], num_returns=len(m.actors), timeout=0 if redis_down else 10)
    deadline = time.monotonic() + (0 if redis_down else 5)
    while time.monotonic() < deadline:  # let the shards ingest the last blocks
        if backlog(backend.cfg, backend.namespace, redis_url) == 0:
            break
        time.sleep(0.1)
    sup.gather_stats()
    rec = driver.record(sup.snapshot(), driver.last_record)
    m.learner.handle.stop.remote()
    try:
        ray.get(m.learner.run_ref, timeout=30)
    except Exception as exc:
        log.warning("learner did not stop cleanly: %s", exc)
    extra = {k: rec[k] for k in CARRIED}
    driver.give_best_policy(backend, wait=True)  # the final checkpoint's policy files come from it
    why = "the learner did not answer"
    try:
        made = ray.get(
            m.learner.handle.save_checkpoint.remote(extra, FINAL_EXPORT_WAIT_S), timeout=FINAL_EXPORT_WAIT_S + 60
        )
        if made is None:
            why = "the learner was restarted and had not resumed; the last checkpoint is kept"
        elif backend.sync_files(force=True):
            summary["checkpoint"] = str(run_dir.checkpoint)
    except RunDirError as exc:
        why = str(exc)
    except Exception as exc:
        log.error("final checkpoint failed: %s", exc)
    sup.gather_stats()
    if "checkpoint" not in summary:
        print(f"apexq: final checkpoint failed: {why}", file=out, flush=True)
    rec = driver.record(sup.snapshot(), None)
    for s in m.shards:
        s.handle.stop.remote()
    ray.wait([s.run_ref for s in m.shards], num_returns=len(m.shards), timeout=10)
    try:
        run_dir.write_state(extra)
        run_dir.append_metrics({**rec, "final": True})
    except RunDirError as exc:
        print(f"apexq: could not write the final record: {exc}", file=out, flush=True)
    summary["record"] = rec
    if redis_down:  # its counters are out of reach: say so rather than wait on retries
        summary["accounting"] = {"reconciled": False, "why": "Redis unreachable at the end of the run"}
    else:
        summary["accounting"] = accounting(
            backend.cfg,
            run_dir,
            backend.namespace,
            redis_url,
            [a.last_stats for a in m.actors] + sup.dead_actor_stats,
            sup.dead_actor_stats,
            out,
        )
    return summary


def accounting(
    cfg: Config,
    run_dir: RunDir,
    namespace: str,
    redis_url: str,
    actor_stats: list[dict],
    dead_actor_stats: list[dict],
    out,
) -> dict:
    """Reconcile appended = ingested + pending from Redis; compare with what actors saw acknowledged.

    ``actor_stats``: the last stats of every actor process, the dead ones' included.
    """
    from apexq.core.connection import connect
    from apexq.replay_server.accounting import reconcile

    from .components import shard_redis_url

    shards = []
    for k in range(cfg.replay.shards):
        try:
            c = connect(shard_redis_url(cfg, k, redis_url))
            shards.append(reconcile(c, namespace, k))
            c.close()
        except Exception as exc:
            log.warning("accounting for shard %d failed: %s", k, exc)
    redis_by_actor: dict = {}
    for sh in shards:
        for a, n in sh["appended_by_actor"].items():
            redis_by_actor[a] = redis_by_actor.get(a, 0) + n
    local: dict = {}
    for st in actor_stats:
        if st:
            local[st["actor_id"]] = local.get(st["actor_id"], 0) + st.get("transitions_appended", 0)
    lost_in_redis = sum(max(0, n - redis_by_actor.get(a, 0)) for a, n in local.items())
    acct = {
        "appended": sum(s["appended"] for s in shards),
        "ingested": sum(s["ingested"] for s in shards),
        "pending": sum(s["pending"] for s in shards),
        "rejected_entries": sum(s["rejected_entries"] for s in shards),
        "reconciled": len(shards) == cfg.replay.shards,
        "balanced": all(s["balanced"] for s in shards) and len(shards) == cfg.replay.shards,
        "lost_in_redis": lost_in_redis,
        "in_flight_lost": sum(st.get("in_flight", 0) for st in dead_actor_stats),
        "actor_restarts": len(dead_actor_stats),
        "shards": shards,
    }
    try:
        run_dir.write_json("accounting.json", acct)
    except RunDirError as exc:
        print(f"apexq: could not write accounting.json: {exc}", file=out, flush=True)
    return acct


def backlog(cfg: Config, namespace: str, redis_url: str) -> int:
    """Stream entries not yet ingested by any shard (lag + pending over every shard's group)."""
    from apexq.core.connection import connect
    from apexq.replay_server.keys import Keys

    from .components import shard_redis_url

    keys = Keys(namespace)
    total = 0
    for k in range(cfg.replay.shards):
        try:
            c = connect(shard_redis_url(cfg, k, redis_url))
            for g in c.xinfo_groups(keys.stream(k)):
                total += int(g.get("lag") or 0) + int(g.get("pending") or 0)
            c.close()
        except Exception:
            return 0
    return total
