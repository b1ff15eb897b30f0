"""The client user's allow-list (replay_server/acl.py) against a real server: every listed command is
allowed, the dangerous ones are refused, and the real components send nothing outside the list."""

import threading
import time

import numpy as np
import pytest
import redis

from apexq.replay_server.acl import CLIENT_COMMANDS, CLIENT_USER, DANGEROUS, acl_rule

NS = "acl"
# the arguments each listed command is checked with (keys under apexq:, as the code uses them)
K = f"apexq:{NS}:shard:0"
SAMPLE_ARGS = {
    "auth": ("apexq", "x"),
    "hello": ("2",),
    "client|setinfo": ("LIB-NAME", "redis-py"),
    "select": ("0",),
    "ping": (),
    "multi": (),
    "exec": (),
    "xadd": (f"{K}:stream", "MAXLEN", "~", "10", "*", "b", "x"),
    "xreadgroup": ("GROUP", "shard", "c", "COUNT", "1", "BLOCK", "10", "STREAMS", f"{K}:stream", ">"),
    "xack": (f"{K}:stream", "shard", "0-1"),
    "xgroup|create": (f"{K}:stream", "shard", "0", "MKSTREAM"),
    "xinfo|groups": (f"{K}:stream",),
    "xrange": (f"{K}:stream", "-", "+", "COUNT", "1"),
    "xpending": (f"{K}:stream", "shard", "-", "+", "10"),
    "incrby": (f"{K}:epoch", "1"),
    "hincrby": (f"{K}:counts", "ingested", "1"),
    "hgetall": (f"{K}:counts",),
    "exists": (f"{K}:stream",),
    "get": (f"apexq:{NS}:weights",),
    "set": (f"apexq:{NS}:weights_version", "1"),
    "rpush": (f"{K}:rpc", "m"),
    "blpop": (f"{K}:reply:x", "1"),
    "ltrim": (f"{K}:prio", "-1000", "-1"),
    "pexpire": (f"{K}:reply:x", "5000"),
}


def argv(name, args=()):
    return [*name.split("|"), *args]


@pytest.fixture
def admin(redis_server):
    client = redis.Redis.from_url(redis_server.admin_url)
    yield client
    client.close()


def test_every_listed_command_is_allowed_and_nothing_else(redis_server, admin):
    assert set(SAMPLE_ARGS) == set(CLIENT_COMMANDS)
    for name in CLIENT_COMMANDS:
        assert admin.execute_command("ACL", "DRYRUN", CLIENT_USER, *argv(name, SAMPLE_ARGS[name])) == b"OK", name
    # only apexq's keys
    denied = admin.execute_command("ACL", "DRYRUN", CLIENT_USER, "GET", "someone-else:key")
    assert b"no permissions to access the 'someone-else:key' key" in denied
    for cmd in DANGEROUS:
        out = admin.execute_command("ACL", "DRYRUN", CLIENT_USER, *cmd)
        assert b"has no permissions to run" in out, (cmd, out)


@pytest.mark.parametrize("cmd", DANGEROUS, ids=lambda c: " ".join(c[:2])[:24])
def test_the_client_user_gets_noperm_for_dangerous_commands(redis_server, cmd):
    client = redis.Redis.from_url(redis_server.url)
    try:
        # (DEBUG is also switched off for every connection by enable-debug-command, checked first)
        error = redis.ResponseError if cmd[0] == "debug" else redis.exceptions.NoPermissionError
        with pytest.raises(error, match="no permissions|DEBUG command not allowed"):
            client.execute_command(*cmd)
        assert client.ping()  # the connection (and the server) still serve
    finally:
        client.close()


class Monitor:
    """Every command the server runs, recorded by the admin user with MONITOR (name, lower case,
    with the subcommand for container commands such as XINFO GROUPS)."""

    CONTAINERS = {"client", "xinfo", "xgroup", "config", "acl", "function", "script", "object", "memory"}

    def __init__(self, url):
        self.names: set = set()
        self.conn = redis.Redis.from_url(url).monitor()
        self.conn.__enter__()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            try:
                cmd = self.conn.next_command()["command"]
            except redis.TimeoutError:  # nothing sent for a while (a slow import): keep listening
                continue
            except redis.RedisError:  # the test failed and stopped the server
                return
            if cmd == "ECHO apexq-monitor-end":
                return
            parts = cmd.split()
            name = parts[0].lower()
            if name in self.CONTAINERS and len(parts) > 1:
                name += "|" + parts[1].lower()
            self.names.add(name)

    def stop(self, admin):
        admin.echo("apexq-monitor-end")
        self.thread.join(10)
        self.conn.__exit__(None, None, None)
        return self.names


def drive_components(url):
    """The real code paths that talk to Redis: the start-up check, an actor's loop (appends, weights fetches,
    backpressure),
    a shard (rebuild, ingest, acknowledge), the learner's weights publish, a standalone shard's
    request/reply lists, a shard restarted with entries delivered but not acknowledged, and the
    driver's accounting and backlog reads."""
    import torch
    from default_components import actor_settings, shard_spec

    from apexq.actors.actor import ApexActor
    from apexq.actors.envs import env_spec
    from apexq.core import weights_store
    from apexq.core.connection import check, connect
    from apexq.learner.network import build_network
    from apexq.replay_server.accounting import reconcile
    from apexq.replay_server.keys import Keys
    from apexq.replay_server.rpc import RedisShardClient, ShardRpcServer
    from apexq.replay_server.shard import ReplayShard

    spec = env_spec("MountainCar-v0")
    keys, weights_keys = Keys(NS), weights_store.WeightsKeys(NS)
    check(url)  # the driver's and replay-server's start-up check (PING)
    learner_redis = connect(url)
    torch.manual_seed(0)
    weights_store.publish(learner_redis, weights_keys, build_network(spec, [16], False).state_dict(), 1)
    one_shard = shard_spec(capacity=4000, min_size_to_sample=64, samples_per_insert=1.0, error_buffer=1e9)
    shard = ReplayShard(one_shard, url, NS, seed=0)
    shard.start()
    server = ShardRpcServer(shard, url, NS, max_items=4096).start()
    settings = actor_settings(
        num_envs=8,
        total_envs=8,
        block_size=64,
        weights_update_period=5,
        max_backlog_blocks=4,
        stream_maxlen=200,
        hidden_sizes=[16],
    )
    actor = ApexActor(settings, url, NS, spec)
    actor.run(max_env_steps=2000)
    actor.flush()
    client = RedisShardClient(url, NS, 0, spec["obs_dim"])
    deadline = time.monotonic() + 20
    while client.stats()["inserted"] < actor.stats()["transitions_appended"] and time.monotonic() < deadline:
        time.sleep(0.05)
    got = client.sample(32, timeout=5.0)
    client.update_priorities(got.keys, np.full(len(got.keys), 2.0, np.float32))
    weights_store.publish(learner_redis, weights_keys, build_network(spec, [16], False).state_dict(), 2)
    assert weights_store.fetch_if_newer(connect(url), weights_keys, 1, as_numpy=True)[0] == 2
    server.stop()
    shard.stop()
    # one entry delivered to a consumer that dies before acknowledging: a restarted shard re-reads it
    actor.writer.append(actor_block(spec))
    redis.Redis.from_url(url).xreadgroup(keys.group(0), "dead", {keys.stream(0): ">"}, count=1)
    fresh = ReplayShard(one_shard, url, NS, seed=0)
    fresh.start()
    acct = reconcile(connect(url), NS, 0)
    backlog = actor.writer.backlog()
    fresh.stop()
    client.close()
    return actor.stats(), acct, backlog, shard.stats(), fresh.stats()


def actor_block(spec):
    from apexq.replay_server.codec import Block

    n, d = 4, spec["obs_dim"]
    obs = np.zeros((n, d), np.float32)
    return Block(
        obs=obs,
        action=np.zeros(n, np.int32),
        ret=np.zeros(n, np.float32),
        discount=np.ones(n, np.float32),
        next_obs=obs,
        priority=np.ones(n, np.float32),
        block_seq=999,
    )


def test_the_components_send_only_listed_commands(redis_server, admin):
    """Completeness: with the client user opened up (so a command missing from the list runs and is
    recorded instead of being refused), MONITOR records what the real components send."""
    admin.execute_command("ACL", "SETUSER", CLIENT_USER, "+@all", "allkeys")
    monitor = Monitor(redis_server.admin_url)
    drive_components(redis_server.url)
    sent = monitor.stop(admin)
    assert sent, "MONITOR recorded nothing"
    unlisted = sorted(sent - set(CLIENT_COMMANDS))
    assert not unlisted, f"components send commands the client ACL refuses: {unlisted}"
    # and the list holds nothing they do not send, but for redis-py's handshake commands that MONITOR
    # does not show (AUTH) or that only some URLs cause (HELLO for protocol=3, SELECT for a database > 0)
    assert set(CLIENT_COMMANDS) - sent <= {"auth", "hello", "select"}, sorted(set(CLIENT_COMMANDS) - sent)


def test_the_components_work_under_the_acl_and_are_never_refused(redis_server, admin):
    """The same code paths as the restricted user: no command refused (the server's ACL LOG records
    every refusal), and the data went where it should."""
    (line,) = [u.decode() for u in admin.execute_command("ACL", "LIST") if u.startswith(b"user apexq ")]
    assert line.endswith(" " + acl_rule().replace("resetkeys ", "")), line  # the server runs the listed rule
    admin.execute_command("ACL", "LOG", "RESET")
    actor, acct, backlog, shard, fresh = drive_components(redis_server.url)
    refusals = admin.execute_command("ACL", "LOG")
    assert refusals == [], refusals
    appended = actor["transitions_appended"]  # the actor's loop, then one block of 4 after the shard stopped
    assert appended >= 1500 and shard["inserted"] == appended - 4
    assert acct["balanced"] and acct["appended"] == appended
    assert fresh["size"] == appended and backlog == 0


def test_a_restart_replays_the_consumer_groups_under_the_acl(tmp_path):
    """Redis replays its AOF as the `default` user and checks each command of a replayed MULTI
    against that user's rights; XREADGROUP is logged as XCLAIMs + XGROUP SETID in a MULTI. With the
    client rule on `default` the replay dropped them: the group's deliveries and pending list rolled
    back on restart, a shard ingested those entries again and the run's accounting broke."""
    from apexq.cluster.redis_server import RedisServer, find_server

    server = RedisServer(find_server(), data_dir=str(tmp_path), appendfsync="always").start()
    try:
        c = redis.Redis.from_url(server.url)
        stream = f"apexq:{NS}:shard:0:stream"
        c.xgroup_create(stream, "shard", id="0", mkstream=True)
        ids = [c.xadd(stream, {"b": b"x"}) for _ in range(10)]
        c.xreadgroup("shard", "c", {stream: ">"}, count=6)
        c.xack(stream, "shard", *ids[:2])
        before = c.xinfo_groups(stream)[0]
        assert (before["pending"], before["last-delivered-id"]) == (4, ids[5])
        c.close()
        server.kill()
        server.restart()
        c = redis.Redis.from_url(server.url)
        after = c.xinfo_groups(stream)[0]
        assert (after["pending"], after["last-delivered-id"]) == (4, ids[5]), after
        # the next delivery is the 7th entry, not one that was delivered before the restart
        ((_, entries),) = c.xreadgroup("shard", "c", {stream: ">"}, count=1)
        assert entries[0][0] == ids[6]
        c.close()
        admin = redis.Redis.from_url(server.admin_url)
        assert admin.acl_log() == []
        admin.close()
    finally:
        server.stop()
