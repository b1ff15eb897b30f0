"""Prometheus metrics: one ``apexq_`` prefix, read from each component's ``stats()``.

Each component process serves its own registry (custom collectors over the plain class's
counters, so counters stay monotonic and nothing is double-booked); the driver serves its own
metrics and an HTTP service-discovery document listing every endpoint (``/targets``), and also
writes the same list as a file_sd file into the run directory.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# name -> (type, help, labels). The single source of truth; the README table is generated from it.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # actors
    "apexq_actor_env_steps_total": ("counter", "Environment steps taken by the actor (all its envs).", ("actor",)),
    "apexq_actor_episodes_total": ("counter", "Episodes finished by the actor.", ("actor",)),
    "apexq_actor_episode_return_mean": (
        "gauge",
        "Mean undiscounted return of the actor's last 100 episodes.",
        ("actor",),
    ),
    "apexq_actor_epsilon_min": ("gauge", "Smallest Ape-X epsilon among the actor's envs.", ("actor",)),
    "apexq_actor_epsilon_max": ("gauge", "Largest Ape-X epsilon among the actor's envs.", ("actor",)),
    "apexq_actor_weights_version": ("gauge", "Weights version the actor acts with.", ("actor",)),
    "apexq_actor_weights_lag": ("gauge", "Versions between the newest published weights and the actor's.", ("actor",)),
    "apexq_actor_transitions_appended_total": (
        "counter",
        "Transitions the actor appended to Redis (acknowledged).",
        ("actor",),
    ),
    "apexq_actor_backpressure_waits_total": (
        "counter",
        "Times the actor waited because its shard's stream backlog was full.",
        ("actor",),
    ),
    # replay shards
    "apexq_replay_inserted_total": ("counter", "Transitions inserted into the shard from its stream.", ("shard",)),
    "apexq_replay_sampled_total": ("counter", "Transitions sampled from the shard.", ("shard",)),
    "apexq_replay_evicted_total": ("counter", "Transitions overwritten in the shard's ring.", ("shard",)),
    "apexq_replay_rebuilt_total": (
        "counter",
        "Transitions restored from Redis when the shard (re)started.",
        ("shard",),
    ),
    "apexq_replay_size": ("gauge", "Transitions held by the shard.", ("shard",)),
    "apexq_replay_capacity": ("gauge", "Capacity of the shard's ring.", ("shard",)),
    "apexq_replay_rejected_total": ("counter", "Stream entries rejected by the shard, by reason.", ("shard", "reason")),
    "apexq_replay_rate_limiter_waits_total": (
        "counter",
        "Rate-limiter waits (side=insert: the shard held back ingest; side=sample: a sample waited).",
        ("shard", "side"),
    ),
    "apexq_replay_priority_updates_total": ("counter", "Priority updates applied.", ("shard",)),
    "apexq_replay_stale_priority_updates_total": (
        "counter",
        "Priority updates ignored because the item was evicted.",
        ("shard",),
    ),
    "apexq_replay_rpc_requests_total": (
        "counter",
        "Sample and stats requests served by a standalone shard (apexq replay-server).",
        ("shard",),
    ),
    "apexq_replay_rpc_rejected_total": (
        "counter",
        "Malformed or forged requests a standalone shard dropped, by reason.",
        ("shard", "reason"),
    ),
    # learner
    "apexq_learner_updates_total": ("counter", "Gradient updates done by the learner.", ()),
    "apexq_learner_transitions_sampled_total": ("counter", "Transitions the learner trained on.", ()),
    "apexq_learner_sample_waits_total": (
        "counter",
        "Minibatches the learner could not get at once (rate limiter or empty replay).",
        (),
    ),
    "apexq_learner_loss": ("gauge", "Importance-weighted Huber loss of a recent minibatch.", ()),
    "apexq_learner_td_error_abs_mean": ("gauge", "Mean |TD error| of a recent minibatch.", ()),
    "apexq_learner_q_mean": ("gauge", "Mean Q(s, a) of a recent minibatch.", ()),
    "apexq_learner_beta": ("gauge", "Current importance-sampling exponent beta.", ()),
    "apexq_learner_weights_version": ("gauge", "Newest weights version published by the learner.", ()),
    # driver
    "apexq_eval_return": ("gauge", "Mean return of the latest greedy evaluation.", ()),
    "apexq_eval_last_timestamp_seconds": (
        "gauge",
        "Unix time the latest greedy evaluation finished "
        "(the launch time before the first; absent with eval.every_seconds 0).",
        (),
    ),
    "apexq_time_to_solve_seconds": (
        "gauge",
        "Seconds from launch to the first evaluation reaching train.stop_at_return"
        " that eval.confirm_episodes other episodes confirmed.",
        (),
    ),
    "apexq_component_restarts_total": ("counter", "Components restarted by the supervisor, by kind.", ("kind",)),
    "apexq_env_steps_total": (
        "counter",
        "Environment steps across all actors (driver's view, survives actor restarts).",
        (),
    ),
}


def _family(name: str):
    typ, help_, labels = METRICS[name]
    base = name[:-6] if typ == "counter" and name.endswith("_total") else name
    cls = CounterMetricFamily if typ == "counter" else GaugeMetricFamily
    return cls(base, help_, labels=list(labels))


class StatsCollector:
    """Turns ``stats()`` of a component into metric families on every scrape."""

    def __init__(self, kind: str, index: int, stats: Callable[[], dict]):
        self.kind, self.index, self.stats = kind, str(index), stats

    def describe(self):
        return []

    def collect(self):
        try:
            s = self.stats()
        except Exception:
            return
        yield from getattr(self, "_" + self.kind)(s)

    def _emit(self, name, value, *labels):
        f = _family(name)
        if value is not None:
            f.add_metric(list(labels), float(value))
        return f

    def _actor(self, s):
        i = self.index
        yield self._emit("apexq_actor_env_steps_total", s["env_steps"], i)
        yield self._emit("apexq_actor_episodes_total", s["episodes"], i)
        yield self._emit("apexq_actor_episode_return_mean", s.get("mean_return"), i)
        yield self._emit("apexq_actor_epsilon_min", s["epsilon_min"], i)
        yield self._emit("apexq_actor_epsilon_max", s["epsilon_max"], i)
        yield self._emit("apexq_actor_weights_version", s["weights_version"], i)
        yield self._emit("apexq_actor_weights_lag", s["weights_lag"], i)
        yield self._emit("apexq_actor_transitions_appended_total", s["transitions_appended"], i)
        yield self._emit("apexq_actor_backpressure_waits_total", s["backpressure_waits"], i)

    def _shard(self, s):
        i = self.index
        yield self._emit("apexq_replay_inserted_total", s["inserted"], i)
        yield self._emit("apexq_replay_sampled_total", s["sampled"], i)
        yield self._emit("apexq_replay_evicted_total", s["evicted"], i)
        yield self._emit("apexq_replay_rebuilt_total", s["rebuilt"], i)
        yield self._emit("apexq_replay_size", s["size"], i)
        yield self._emit("apexq_replay_capacity", s["capacity"], i)
        f = _family("apexq_replay_rejected_total")
        from apexq.replay_server.codec import REASONS  # noqa: F811

        for reason in REASONS:
            f.add_metric([i, reason], float(s["rejected"].get(reason, 0)))
        yield f
        f = _family("apexq_replay_rate_limiter_waits_total")
        f.add_metric([i, "insert"], float(s["insert_waits"]))
        f.add_metric([i, "sample"], float(s["sample_waits"]))
        yield f
        yield self._emit("apexq_replay_priority_updates_total", s["priority_updates"], i)
        yield self._emit("apexq_replay_stale_priority_updates_total", s["priority_updates_stale"], i)
        if "rpc_requests" in s:  # standalone shards only
            yield self._emit("apexq_replay_rpc_requests_total", s["rpc_requests"], i)
            f = _family("apexq_replay_rpc_rejected_total")
            for reason, n in s.get("rpc_rejected", {}).items():
                f.add_metric([i, reason], float(n))
            yield f

    def _learner(self, s):
        yield self._emit("apexq_learner_updates_total", s["updates"])
        yield self._emit("apexq_learner_transitions_sampled_total", s["transitions_sampled"])
        yield self._emit("apexq_learner_sample_waits_total", s["sample_waits"])
        yield self._emit("apexq_learner_loss", s.get("loss"))
        yield self._emit("apexq_learner_td_error_abs_mean", s.get("td_abs"))
        yield self._emit("apexq_learner_q_mean", s.get("q_mean"))
        yield self._emit("apexq_learner_beta", s.get("beta"))
        yield self._emit("apexq_learner_weights_version", s["weights_version"])

    def _driver(self, s):
        yield self._emit("apexq_eval_return", s.get("eval_return"))
        yield self._emit("apexq_eval_last_timestamp_seconds", s.get("eval_last_time"))
        yield self._emit("apexq_time_to_solve_seconds", s.get("time_to_solve_s"))
        f = _family("apexq_component_restarts_total")
        for kind, n in s.get("restarts", {}).items():
            f.add_metric([kind], float(n))
        yield f
        yield self._emit("apexq_env_steps_total", s.get("env_steps", 0))


def node_address(host: str) -> str:
    """The address others should scrape: the bind host, or this node's IP when bound to all interfaces."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return socket.gethostbyname(socket.gethostname())


def serve_component(kind: str, index: int, stats: Callable[[], dict], host: str, port: int = 0) -> str:
    """Start a /metrics endpoint for one component in this process on ``host`` (metrics.host); returns
    ``addr:port``. Port 0, a free one, is what components use: only the driver's port is configured."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(kind, index, stats))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return f"{node_address(host)}:{server.server_port}"


class DriverEndpoint:
    """The driver's HTTP server: ``/metrics`` (its own) and ``/targets`` (Prometheus HTTP SD)."""

    def __init__(self, stats: Callable[[], dict], host: str, port: int, run_id: str = ""):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatsCollector("driver", 0, stats))
        self.targets: dict[str, dict] = {}
        self.run_id = run_id
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.startswith("/metrics"):
                    body, ctype = generate_latest(outer.registry), "text/plain; version=0.0.4"
                elif self.path.startswith("/targets"):
                    body, ctype = json.dumps(outer.sd_document()).encode(), "application/json"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        try:
            self.server = ThreadingHTTPServer((host, port), Handler)
        except OSError:
            if port == 0:
                raise
            self.server = ThreadingHTTPServer((host, 0), Handler)  # configured port busy: take a free one
        self.address = f"{node_address(host)}:{self.server.server_port}"
        self.targets["driver"] = {"address": self.address, "kind": "driver", "index": "0"}
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    def set_target(self, name: str, address: Optional[str], kind: str, index: int) -> None:
        if address:
            self.targets[name] = {"address": address, "kind": kind, "index": str(index)}

    def sd_document(self) -> list[dict]:
        groups: dict[str, list[str]] = {}
        for t in self.targets.values():
            groups.setdefault(t["kind"], []).append(t["address"])
        return [
            {"targets": sorted(addrs), "labels": {"component": kind, "run": self.run_id}}
            for kind, addrs in sorted(groups.items())
        ]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
