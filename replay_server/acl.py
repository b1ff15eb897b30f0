"""What the components' Redis user may run: exactly the commands apexq sends, on apexq's keys only.

A deny-list (``+@all -flushall ...``) always leaves something out: EVAL of a looping script
froze a server for every client, and FUNCTION LOAD, CLIENT PAUSE/KILL, SWAPDB, KEYS and
BGREWRITEAOF stayed open. So the client user starts from ``-@all`` and gets back the commands
below and nothing else. The list is the union of what the code calls (actors, shards, the
learner, the driver's accounting and backlog reads, the standalone shard's request/reply lists)
and what redis-py sends on connect. ``tests/integration/test_acl.py`` records every command the
real components send with MONITOR and fails when one is missing here, and checks with
``ACL DRYRUN`` that each listed one is allowed and the dangerous ones are not.

Keys: every key apexq uses starts with ``apexq:`` (``replay_server/keys.py``), so the user may
touch nothing else on a shared server. The rule does not narrow it to one run's namespace:
the embedded server serves one run only, and a shared server's operator who wants that can
replace ``~apexq:*`` by ``~apexq:<namespace>:*``. No Pub/Sub channels are used.
"""

from __future__ import annotations

CLIENT_COMMANDS: tuple[str, ...] = (
    # redis-py's connection handshake (CLIENT SETINFO: library name and version; HELLO only for a
    # URL asking for protocol=3, SELECT only for one naming a database other than 0), the
    # start-up check and the health check
    "auth",
    "hello",
    "client|setinfo",
    "select",
    "ping",
    # transactions: an actor's XADD with its appended counter, a shard's XACK with its ingest
    # counters, the learner's weights with their version
    "multi",
    "exec",
    # the replay streams: actors append, shards consume and rebuild, the driver reconciles
    "xadd",
    "xreadgroup",
    "xack",
    "xgroup|create",
    "xinfo|groups",
    "xrange",
    "xpending",
    # counters: a shard's epoch, appended/ingested hashes, the driver's accounting
    "incrby",
    "hincrby",
    "hgetall",
    "exists",  # (redis-py's incr() sends INCRBY)
    # versioned weights
    "get",
    "set",
    # a standalone shard's request and reply lists (replay_server/rpc.py)
    "rpush",
    "blpop",
    "ltrim",
    "pexpire",
)

KEY_PATTERN = "apexq:*"

# The user every component connects as (``redis://apexq:PASSWORD@...``).
CLIENT_USER = "apexq"

# Redis replays its append-only file as the ``default`` user, and checks the commands inside each
# MULTI/EXEC it replays against that user's rights: an XREADGROUP is logged as XCLAIMs and an
# XGROUP SETID in a MULTI, so a restricted ``default`` silently dropped every consumer-group
# update on restart (the group's deliveries and pending list rolled back, entries were ingested a
# second time and the accounting no longer balanced). So ``default`` keeps every right but is
# switched off (no connection can log in as it), and the components get a user of their own.
DEFAULT_USER_LINE = "user default off resetpass ~* &* +@all"

# Refused to the client user; the tests check each one (the list plus the admin commands).
DANGEROUS: tuple[tuple[str, ...], ...] = (
    ("eval", "return 1", "0"),
    ("function", "load", "#!lua name=x\nredis.register_function('f', function() end)"),
    ("restore-asking", "apexq:k", "0", "x"),
    ("client", "pause", "1000"),
    ("client", "kill", "id", "1"),
    ("swapdb", "0", "1"),
    ("keys", "*"),
    ("bgrewriteaof",),
    ("flushall",),
    ("flushdb",),
    ("config", "get", "*"),
    ("debug", "sleep", "0"),
    ("shutdown", "nosave"),
    ("script", "kill"),
    ("monitor",),
    ("acl", "list"),
    ("module", "list"),
    ("replicaof", "no", "one"),
    ("save",),
)


def acl_rule() -> str:
    """The permissions of the components' user, as ``ACL SETUSER`` and a redis.conf ``user`` line take them."""
    return f"resetkeys ~{KEY_PATTERN} resetchannels -@all " + " ".join(f"+{c}" for c in CLIENT_COMMANDS)


def server_users(password: str, admin_password: str) -> list[str]:
    """The redis.conf ``user`` lines of a server apexq runs: default (off), the client user, admin."""
    return [
        DEFAULT_USER_LINE,
        f"user {CLIENT_USER} reset on >{password} {acl_rule()}",
        f"user admin reset on >{admin_password} ~* &* +@all",
    ]


def setuser_command(user: str = CLIENT_USER, password: str = "PASSWORD") -> str:
    """The command that creates (or resets) the user on a Redis you run yourself (Redis 6.2+ / Valkey)."""
    return f"ACL SETUSER {user} reset on >{password} {acl_rule()}"


if __name__ == "__main__":  # python -m apexq.replay_server.acl: the ACL SETUSER line to paste
    print(setuser_command())
