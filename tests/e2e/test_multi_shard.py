"""Two replay shards in two Redis servers, and every component discovered through the driver.

One real ``apexq train`` run, as a user starts it: 2 actors, ``replay.shards: 2`` with
``replay.redis_urls`` naming two Redis servers the test started, ``metrics.host: 0.0.0.0`` and a
``metrics.port`` the test keeps busy. It checks what the README promises of each:

- each shard's stream lives in its own Redis (keys read there with the admin user), both shards
  fill and are sampled (each shard's own /metrics), and the run trains and balances its accounting;
- the driver falls back from the busy port and says so; ``/targets`` lists every component at the
  node's address (never 0.0.0.0) with the labels ``component`` and ``run``, every target answers
  ``/metrics``, and ``prometheus_targets.json`` holds the same list.
"""

import json
import re
import signal
import socket
import urllib.request

import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families
from test_redis_faults import ROOT, Run, records, wait

from apexq.cluster.redis_server import RedisServer, find_server
from apexq.replay_server.keys import Keys

NAMESPACE = "twoshards"
EXPECTED = {"driver": 1, "shard": 2, "learner": 1, "actor": 2}  # targets per component


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read()


def scrape(address: str) -> dict:
    """metric sample name -> {labels as a sorted tuple: value} of one /metrics endpoint."""
    out: dict = {}
    for fam in text_string_to_metric_families(get(f"http://{address}/metrics").decode()):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def other_interface() -> "str | None":
    """A non-loopback IPv4 address of this machine (the one its default route uses), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # UDP: picks a route, sends nothing
        except OSError:
            return None
        ip = s.getsockname()[0]
    return None if ip.startswith("127.") else ip


def shard_values(metrics: dict, name: str) -> dict:
    """shard label -> value of one per-shard metric."""
    return {dict(k)["shard"]: v for k, v in metrics.get(name, {}).items()}


@pytest.mark.slow
def test_two_shards_in_two_redis_servers_train_and_every_component_is_discovered(tmp_path, redis_server):
    import ray

    node_ip = ray.util.get_node_ip_address()  # what the other nodes of a cluster would reach
    other = RedisServer(find_server()).start()
    busy = socket.socket()
    busy.bind(("0.0.0.0", 0))
    busy.listen()
    port = busy.getsockname()[1]
    # the URLs carry passwords: a config file, never the command line
    cfg = yaml.safe_load((ROOT / "configs" / "mountaincar.yaml").read_text())
    cfg["replay"]["redis_urls"] = [redis_server.url, other.url]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    run = Run(
        run_dir,
        "--config",
        str(tmp_path / "config.yaml"),
        "--set",
        "replay.shards=2",
        "--set",
        "actors.num=2",
        "--set",
        f"replay.namespace={NAMESPACE}",
        "--set",
        "metrics.host=0.0.0.0",
        "--set",
        f"metrics.port={port}",
        "--set",
        "train.max_seconds=300",
        "--set",
        "train.progress_every_s=1",
        "--set",
        "eval.every_seconds=0",
        "--set",
        "replay.min_size_to_sample=500",
    )
    try:
        line = wait(
            lambda: next((l for l in run.lines if l.startswith("apexq: metrics at http://")), None),
            150,
            "the driver's metrics line",
            run,
        )
        addr = re.match(r"apexq: metrics at http://([^/\s]+)/metrics", line).group(1)
        host, served = addr.rsplit(":", 1)
        # the busy port: another one, and a line saying so
        assert int(served) != port and run.saw(f"metrics.port {port} is busy"), "\n".join(run.lines[-20:])
        assert host == node_ip, (host, node_ip)
        # bound to every interface: loopback and another one both answer
        for ip in ("127.0.0.1", other_interface() or "127.0.0.1"):
            assert "apexq_env_steps_total" in scrape(f"{ip}:{served}"), ip

        def full_sd():
            doc = json.loads(get(f"http://{addr}/targets"))
            return doc if {g["labels"]["component"]: len(g["targets"]) for g in doc} == EXPECTED else None

        doc = wait(full_sd, 120, "every component in /targets", run)
        for g in doc:
            assert g["labels"] == {"component": g["labels"]["component"], "run": run_dir.name}, g
            assert all(t.rsplit(":", 1)[0] == node_ip for t in g["targets"]), g
        targets = {g["labels"]["component"]: g["targets"] for g in doc}
        # file_sd: the same list as /targets (rewritten whenever a target is added)
        wait(
            lambda: json.loads((run_dir / "prometheus_targets.json").read_text()) == doc,
            10,
            "prometheus_targets.json to equal /targets",
            run,
        )

        # every target answers /metrics, with its own component's series; both shards fill and are sampled
        def trained():
            shards = [scrape(t) for t in targets["shard"]]
            size = {k: v for m in shards for k, v in shard_values(m, "apexq_replay_size").items()}
            sampled = {k: v for m in shards for k, v in shard_values(m, "apexq_replay_sampled_total").items()}
            updates = scrape(targets["learner"][0])["apexq_learner_updates_total"][()]
            ok = set(size) == {"0", "1"} and min(size.values()) > 0 and min(sampled.values()) > 0 and updates > 0
            return (size, sampled, updates) if ok else None

        size, sampled, updates = wait(trained, 150, "both shards to fill and be sampled, and learner updates", run)
        for t in targets["actor"]:
            assert scrape(t)["apexq_actor_env_steps_total"]
        assert scrape(targets["driver"][0])["apexq_env_steps_total"]

        # each shard's stream in its own Redis, and only there
        keys = Keys(NAMESPACE)
        a, b = (redis.Redis.from_url(s.admin_url) for s in (redis_server, other))
        assert a.xlen(keys.stream(0)) > 0 and not a.exists(keys.stream(1))
        assert b.xlen(keys.stream(1)) > 0 and not b.exists(keys.stream(0))
        a.close()
        b.close()
        run.proc.send_signal(signal.SIGTERM)
        rc = run.finish(120)
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
        busy.close()
        other.stop()
    out = "\n".join(run.lines)
    assert rc == 0, out[-3000:]
    assert records(run_dir)[-1]["updates"] > 0
    acct = json.loads((run_dir / "accounting.json").read_text())
    assert acct["balanced"] and len(acct["shards"]) == 2, acct
    assert all(s["appended"] > 0 and s["ingested"] > 0 for s in acct["shards"]), acct
    print(f"per shard: size {size}, sampled {sampled}; learner updates {updates:.0f}")
