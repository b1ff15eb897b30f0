"""A real Prometheus scrapes a real `apexq train` run with the shipped deploy/prometheus/prometheus.yml.

The run's driver is found through its stdout line, Prometheus discovers every component through
the driver's /targets (keeping their `component` and `run` labels), and its query API must show
env steps and learner updates moving and data for every Grafana panel query; every metric the
dashboard queries must be exported by the run's endpoints. Nothing the run or Prometheus started
may outlive them.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from apexq.cluster.metrics import METRICS

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "apexq.json"
# Gauges that have no sample until something happens that a short run does not reach.
CONDITIONAL = {"apexq_time_to_solve_seconds": "set only once an evaluation reaches train.stop_at_return"}
# Exported by standalone shards (apexq replay-server) only, which this run does not start.
STANDALONE_ONLY = {"apexq_replay_rpc_requests_total", "apexq_replay_rpc_rejected_total"}
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"


def processes() -> dict:
    """pid -> (ppid, session id, command) of every live (not zombie) process on the machine."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,sid=,stat=,args="], capture_output=True, text=True).stdout
    procs = {}
    for line in out.splitlines():
        pid, ppid, sid, stat, *cmd = line.split(None, 4)
        if not stat.startswith("Z"):
            procs[int(pid)] = (int(ppid), int(sid), " ".join(cmd))
    return procs


def spawned_by(leaders) -> set:
    """Processes in the sessions of ``leaders`` (Ray keeps the driver's) or their direct children
    (the driver's Redis starts a session of its own)."""
    return {pid for pid, (ppid, sid, _) in processes().items() if sid in leaders or ppid in leaders}


def wait_gone(pids, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        alive = {pid: cmd for pid, (_, _, cmd) in processes().items() if pid in pids}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def dashboard_exprs() -> list:
    """The dashboard's panel queries, with the `run` variable set to every run and Grafana's
    $__rate_interval to what it is for this test's 2 s scrapes (at least four of them)."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        t["expr"].replace("$run", ".*").replace("$__rate_interval", "20s")
        for p in dashboard["panels"]
        for t in p.get("targets", [])
    ]


def dashboard_metrics() -> set:
    return {n for e in dashboard_exprs() for n in re.findall(r"\bapexq_[A-Za-z0-9_:]+", e)}


def exported(text: str) -> dict:
    """Metric name as METRICS spells it (counters with _total) -> number of samples."""
    out = {}
    for fam in text_string_to_metric_families(text):
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        out[name] = out.get(name, 0) + sum(1 for s in fam.samples if s.name == name)
    return out


class Proc:
    """A subprocess in its own session whose output is collected by a thread."""

    def __init__(self, args, **kw):
        self.p = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw
        )
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def stop(self, grace: float, sig=signal.SIGTERM) -> None:
        """Send ``sig`` and wait; SIGKILL the process group if it lingers."""
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(10)
        self._t.join(5)


def test_dashboard_metric_parsing_helpers():
    text = (
        "# HELP apexq_learner_updates Gradient updates.\n# TYPE apexq_learner_updates counter\n"
        "apexq_learner_updates_total 12.0\n# HELP apexq_eval_return Eval.\n# TYPE apexq_eval_return gauge\n"
    )
    assert exported(text) == {"apexq_learner_updates_total": 1, "apexq_eval_return": 0}
    assert dashboard_metrics() <= set(METRICS) and len(dashboard_metrics()) > 10


@pytest.mark.slow
def test_prometheus_scrapes_a_real_run_with_the_shipped_config(tmp_path):
    from needs import require_tool

    prometheus = require_tool("prometheus", "Debian/Ubuntu: apt-get install prometheus")
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    run_dir = tmp_path / "run"
    run = Proc(
        [
            sys.executable,
            "-m",
            "apexq.cluster.cli",
            "train",
            "--run-dir",
            str(run_dir),
            "--set",
            "train.max_seconds=45",
            "--set",
            "metrics.port=0",
            "--set",
            "eval.episodes=20",
            "--set",
            "replay.min_size_to_sample=500",
        ],
        cwd=ROOT,
        env=env,
    )
    prom = None
    ours = set()
    try:
        # 1. the driver's address, from its stdout line
        deadline = time.monotonic() + 120
        addr = None
        while addr is None and time.monotonic() < deadline and run.p.poll() is None:
            m = re.search(r"apexq: metrics at http://([^/\s]+)/metrics", run.output())
            if m:
                addr = m.group(1)
            else:
                time.sleep(0.2)
        assert addr, "no metrics line from the run:\n" + run.output()[-3000:]

        # 2. a real Prometheus with the shipped config, pointed at this driver
        config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
        (job,) = config["scrape_configs"]
        (sd,) = job["http_sd_configs"]
        sd["url"] = f"http://{addr}/targets"
        sd["refresh_interval"] = "2s"
        job["scrape_interval"] = "2s"
        job["scrape_timeout"] = "2s"
        config["rule_files"] = [str(ALERTS)]  # the shipped alerts, loaded and evaluated for real
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        api = f"http://127.0.0.1:{port}/api/v1"
        prom = Proc(
            [
                prometheus,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ]
        )

        def query(expr):
            try:
                body = json.loads(http_get(f"{api}/query?" + urllib.parse.urlencode({"query": expr})))
            except urllib.error.HTTPError as exc:  # 400/422: Prometheus refused the query itself
                raise AssertionError(f"{expr}: {exc.read().decode(errors='replace')}") from None
            assert body["status"] == "success", body
            return [float(r["value"][1]) for r in body["data"]["result"]]

        wanted = dashboard_metrics() - STANDALONE_ONLY
        # every panel query must show data, except those on metrics that stay empty in a short run
        panel_exprs = [e for e in dashboard_exprs() if not any(n in e for n in set(CONDITIONAL) | STANDALONE_ONLY)]
        no_data = panel_exprs
        checks = {
            "env steps/s": "sum(rate(apexq_actor_env_steps_total[20s]))",
            "updates/s": "rate(apexq_learner_updates_total[20s])",
        }
        seen: dict = {}
        samples: dict = {}
        targets_ok = False
        run_id = run_dir.name
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(2)
            ours |= spawned_by({run.p.pid, prom.p.pid})
            assert prom.p.poll() is None, "prometheus exited:\n" + prom.output()[-3000:]
            try:
                for label, expr in checks.items():
                    values = query(expr)
                    if values and max(values) > 0:
                        seen[label] = max(values)
                # Prometheus found every component and kept the driver's labels
                active = json.loads(http_get(f"{api}/targets"))["data"]["activeTargets"]
                kinds = {t["labels"].get("component") for t in active if t["health"] == "up"}
                targets_ok = kinds >= {"driver", "shard", "learner", "actor"} and all(
                    t["labels"].get("run") == run_id for t in active
                )
                # every dashboard panel has data in Prometheus
                no_data = [e for e in panel_exprs if not query(e)]
                # and, directly, every endpoint the driver lists
                samples = {}
                for group in json.loads(http_get(f"http://{addr}/targets")):
                    for target in group["targets"]:
                        for name, n in exported(http_get(f"http://{target}/metrics").decode()).items():
                            samples[name] = samples.get(name, 0) + n
            except (OSError, ValueError):  # Prometheus still starting, or a component restarting
                continue
            missing = {n for n in wanted if not samples.get(n) and n not in CONDITIONAL}
            if len(seen) == len(checks) and targets_ok and not missing and not no_data:
                break
        for label in checks:
            assert seen.get(label, 0) > 0, f"Prometheus never saw {label} > 0; run output:\n" + run.output()[-3000:]
        assert targets_ok, "Prometheus did not discover driver, shard, learner and actors with their run label"
        assert not no_data, f"dashboard queries without data in Prometheus: {no_data}"
        # the shipped alerting rules loaded and evaluate without error against the real series
        deadline, health = time.monotonic() + 30, {}
        while time.monotonic() < deadline and set(health.values()) != {"ok"}:
            groups = json.loads(http_get(f"{api}/rules"))["data"]["groups"]
            health = {r["name"]: r["health"] for g in groups for r in g["rules"]}
            time.sleep(1)
        assert len(health) == len(yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]), health
        assert set(health.values()) == {"ok"}, health
        not_exported = sorted(wanted - set(samples))
        assert not not_exported, f"dashboard metrics the run does not export: {not_exported}"
        no_sample = sorted(n for n in wanted if not samples.get(n) and n not in CONDITIONAL)
        assert not no_sample, f"dashboard metrics without a sample during the run: {no_sample}"
        # the run ends by itself (train.max_seconds) and stops everything it started
        run.p.wait(timeout=120)
        assert run.p.returncode == 0, run.output()[-3000:]
    finally:
        # A graceful stop first; only what is left after it counts as leaked. Ctrl-C (SIGINT)
        # rather than SIGTERM: the run's SIGTERM handler is replaced by Ray's during ray.init.
        run.stop(grace=60, sig=signal.SIGINT)
        if prom is not None:
            prom.stop(grace=10)
        ours |= spawned_by({run.p.pid} | ({prom.p.pid} if prom else set()))
        leftover = wait_gone(ours, timeout=20)
        for pid in leftover:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert run.p.returncode is not None and prom is not None and prom.p.returncode is not None
    assert "Traceback" not in run.output(), run.output()[-3000:]
    assert len(ours) > 3, "the run's processes were never seen"
    assert not leftover, f"processes outlived the run and Prometheus: {leftover}"
