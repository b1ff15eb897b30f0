"""Transition accounting, read from Redis: appended = ingested + pending, per shard.

* ``appended`` -- transitions whose XADD Redis acknowledged (the actor's HINCRBY runs in the same
  MULTI as its XADD, so both survive or vanish together, even across a Redis restart);
* ``ingested`` -- transitions a shard inserted and acknowledged (its XACK and HINCRBY share a MULTI);
* ``pending`` -- transitions in stream entries no shard has acknowledged yet (not yet delivered,
  or delivered to a shard that died before acknowledging: those are re-read when it restarts).
Rejected entries (malformed or forged) were never counted as appended by an actor; they are
reported beside the balance.
"""

from __future__ import annotations

from .codec import HEADER, HEADER_SIZE, MAGIC
from .keys import Keys


def _count(payload) -> int:
    if not isinstance(payload, (bytes, bytearray)) or len(payload) < HEADER_SIZE:
        return 0
    magic, _v, _d, _dim, count, *_ = HEADER.unpack_from(payload, 0)
    return int(count) if magic == MAGIC else 0


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def pending_transitions(client, stream: str, group: str) -> int:
    """Transitions in entries the group has not acknowledged (undelivered + pending)."""
    if not client.exists(stream):
        return 0
    last = "0-0"
    for g in client.xinfo_groups(stream):
        if _s(g["name"]) == group:
            last = _s(g["last-delivered-id"])
    total = 0
    start = "(" + last
    while True:
        entries = client.xrange(stream, min=start, max="+", count=1000)
        if not entries:
            break
        total += sum(_count(f.get(b"b")) for _id, f in entries)
        start = "(" + _s(entries[-1][0])
    start = "-"
    while True:
        pend = client.xpending_range(stream, group, min=start, max="+", count=1000)
        if not pend:
            break
        for p in pend:
            got = client.xrange(stream, min=p["message_id"], max=p["message_id"])
            if got:
                total += _count(got[0][1].get(b"b"))
        start = "(" + _s(pend[-1]["message_id"])
    return total


def reconcile(client, namespace: str, shard: int) -> dict:
    keys = Keys(namespace)
    appended_by_actor = {int(_s(k)): int(v) for k, v in client.hgetall(keys.appended(shard)).items()}
    counts = {_s(k): int(v) for k, v in client.hgetall(keys.counts(shard)).items()}
    appended = sum(appended_by_actor.values())
    ingested = counts.get("ingested", 0)
    pending = pending_transitions(client, keys.stream(shard), keys.group(shard))
    return {
        "shard": shard,
        "appended": appended,
        "ingested": ingested,
        "pending": pending,
        "rejected_entries": counts.get("rejected_entries", 0),
        "appended_by_actor": appended_by_actor,
        "balanced": appended == ingested + pending,
    }
