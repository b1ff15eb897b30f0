"""The deploy/ tree and configs/cluster.yaml: they parse, Prometheus accepts its config, the
dashboard only queries metrics apexq exports, and the pieces agree with each other."""

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import yaml
from promql_checks import promtool

from apexq.cluster.config import load_config
from apexq.cluster.metrics import METRICS
from apexq.replay_server.acl import acl_rule

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "apexq.json"
DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
METRIC_NAME = re.compile(r"\bapexq_[A-Za-z0-9_:]+")


def deploy_files(*suffixes):
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in suffixes)


def load_yaml(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# -- (a) everything parses ------------------------------------------------------------------------


def test_deploy_tree_has_the_expected_files():
    for rel in (
        "prometheus/prometheus.yml",
        "prometheus/prometheus-compose.yml",
        "grafana/provisioning/datasources/prometheus.yml",
        "grafana/provisioning/dashboards/apexq.yml",
        "grafana/dashboards/apexq.json",
        "docker-compose.yml",
        "Dockerfile",
        "ray/cluster.yaml",
        "k8s/rayjob.yaml",
        "k8s/redis.yaml",
    ):
        assert (DEPLOY / rel).is_file(), rel


@pytest.mark.parametrize("path", deploy_files(".yml", ".yaml"), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path):
    docs = load_yaml(path)
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected one or more mappings"


@pytest.mark.parametrize("path", deploy_files(".json"), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_json_parses(path):
    assert isinstance(json.loads(path.read_text()), dict)


# -- (b) Prometheus --------------------------------------------------------------------------------


def promtool_check(path):
    r = subprocess.run([promtool(), "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus-compose.yml"])
def test_promtool_accepts_the_config(name):
    promtool_check(PROMETHEUS / name)


def commented_file_sd(text):
    """The commented-out `file_sd_configs:` block of a Prometheus config, uncommented."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "# file_sd_configs:")
    indent = lines[start].index("#")
    block = []
    for line in lines[start:]:
        if not line.startswith(" " * indent + "#") or line.strip() == "#":
            break
        block.append(line[indent + 2 :])
    return yaml.safe_load("\n".join(block))["file_sd_configs"]


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus-compose.yml"])
def test_promtool_accepts_the_commented_file_sd_alternative(name, tmp_path):
    """The file_sd block users are told to uncomment must be valid too (Prometheus refuses a `*`
    anywhere but in the last path component, e.g. runs/*/prometheus_targets.json)."""
    config = yaml.safe_load((PROMETHEUS / name).read_text())
    job = config["scrape_configs"][0]
    job.pop("http_sd_configs")
    job["file_sd_configs"] = commented_file_sd((PROMETHEUS / name).read_text())
    assert job["file_sd_configs"][0]["files"]
    config["rule_files"] = [str(PROMETHEUS / f) for f in config["rule_files"]]  # relative to the config
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    promtool_check(path)


def test_prometheus_discovers_targets_from_the_driver_and_keeps_their_labels():
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    (sd,) = job["http_sd_configs"]
    assert sd["url"] == f"http://127.0.0.1:{load_config().metrics.port}/targets"
    assert sd["refresh_interval"] == "5s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    # nothing may drop or overwrite the `component` and `run` labels the driver attaches
    for rule in job.get("relabel_configs", []) + job.get("metric_relabel_configs", []):
        assert rule.get("target_label") not in ("component", "run")
        assert rule.get("action", "replace") not in ("labeldrop", "labelkeep", "drop", "keep"), rule


def test_compose_variant_rewrites_loopback_targets_to_the_docker_host():
    config = yaml.safe_load((PROMETHEUS / "prometheus-compose.yml").read_text())
    (job,) = config["scrape_configs"]
    (sd,) = job["http_sd_configs"]
    assert sd["url"] == f"http://host.docker.internal:{load_config().metrics.port}/targets"
    (rule,) = job["relabel_configs"]
    assert rule["source_labels"] == ["__address__"] and rule["target_label"] == "__address__"

    def rewrite(addr):  # Prometheus anchors the regex and expands ${1} in the replacement
        m = re.fullmatch(rule["regex"], addr)
        return rule["replacement"].replace("${1}", m.group(1)) if m else addr

    assert rewrite("127.0.0.1:9400") == "host.docker.internal:9400"
    assert rewrite("localhost:45123") == "host.docker.internal:45123"
    assert rewrite("10.0.3.7:45123") == "10.0.3.7:45123"


# -- (c) Grafana: the dashboard queries only what apexq exports -----------------------------------


def dashboard_queries(dashboard):
    """Every PromQL string of a dashboard: panel targets and templating queries."""
    out = []
    for panel in dashboard["panels"]:
        for sub in [panel] + panel.get("panels", []):
            out += [t["expr"] for t in sub.get("targets", [])]
    for var in dashboard.get("templating", {}).get("list", []):
        q = var.get("query")
        out.append(q.get("query", "") if isinstance(q, dict) else (q or ""))
        out.append(var.get("definition", ""))
    return [q for q in out if q]


def metric_names(queries):
    return {name for q in queries for name in METRIC_NAME.findall(q)}


def test_metric_name_extraction_catches_unknown_names():
    names = metric_names(
        [
            'sum(rate(apexq_actor_env_steps_total{run=~"$run"}[30s]))',
            "apexq_learner_loss_bucket / on() apexq_learner_beta",
        ]
    )
    assert names == {"apexq_actor_env_steps_total", "apexq_learner_loss_bucket", "apexq_learner_beta"}
    assert names - set(METRICS) == {"apexq_learner_loss_bucket"}


def test_every_metric_the_dashboard_queries_is_exported():
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    assert len(queries) >= 20
    used = metric_names(queries)
    assert used, "no apexq_ metric found in the dashboard's queries"
    unknown = sorted(used - set(METRICS))
    assert not unknown, f"dashboard queries metrics apexq does not export: {unknown}"


def test_dashboard_panels_cover_the_promised_views():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert {p["type"] for p in panels} <= {"timeseries", "stat"}
    assert 35 <= dashboard["schemaVersion"] <= 42 and dashboard["uid"]
    exprs = " ".join(dashboard_queries(dashboard))
    assert re.search(r"sum by \(run\) \(rate\(apexq_actor_env_steps_total(\{[^}]*\})?\[\$__rate_interval\]\)\)", exprs)
    assert re.search(r"sum by \(run, actor\) \(rate\(apexq_actor_env_steps_total", exprs)
    for name in (
        "apexq_actor_episode_return_mean",
        "apexq_eval_return",
        "apexq_replay_size",
        "apexq_replay_inserted_total",
        "apexq_replay_sampled_total",
        "apexq_replay_rejected_total",
        "apexq_learner_updates_total",
        "apexq_learner_loss",
        "apexq_learner_td_error_abs_mean",
        "apexq_learner_q_mean",
        "apexq_learner_beta",
        "apexq_learner_weights_version",
        "apexq_actor_weights_lag",
        "apexq_replay_rate_limiter_waits_total",
        "apexq_component_restarts_total",
        "apexq_time_to_solve_seconds",
        "apexq_replay_rpc_requests_total",
        "apexq_replay_rpc_rejected_total",
        "apexq_eval_last_timestamp_seconds",
    ):
        assert name in exprs, f"no panel shows {name}"
    assert "sum by (run, reason) (rate(apexq_replay_rejected_total" in exprs
    assert "sum by (run, reason) (rate(apexq_replay_rpc_rejected_total" in exprs
    # a `run` variable, used by every panel query
    assert any(v["name"] == "run" for v in dashboard["templating"]["list"])
    for p in panels:
        for t in p["targets"]:
            assert 'run=~"$run"' in t["expr"], (p["title"], t["expr"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))


def test_dashboard_uses_the_provisioned_datasource():
    """Provisioned, the dashboard's data-source variable starts on the provisioned data source:
    Grafana keeps a variable's saved option when its value or its text (the data source's name)
    matches one, and the value ${DS_PROMETHEUS} is only filled in by the import dialog."""
    (ds,) = yaml.safe_load(DATASOURCE.read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["isDefault"]
    dashboard = json.loads(DASHBOARD.read_text())
    (var,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert var["name"] == "datasource" and var["query"] == "prometheus"
    assert var["current"]["text"] == ds["name"]
    refs = [p["datasource"] for p in dashboard["panels"]]
    refs += [t["datasource"] for p in dashboard["panels"] for t in p["targets"]]
    refs += [v["datasource"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert refs and all(r == {"type": "prometheus", "uid": "${datasource}"} for r in refs)


def test_readme_metrics_table_matches_METRICS():
    readme = (ROOT / "README.md").read_text()
    assert "\n## Metrics\n" in readme
    section = readme.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    listed = {}
    for line in section.splitlines():
        m = re.match(r"\| `(apexq_[A-Za-z0-9_:]+)` \| (\w+) \|", line)
        if m:
            listed[m.group(1)] = m.group(2)
    missing = sorted(set(METRICS) - set(listed))
    assert not missing, f"README's metrics table lacks {missing}; run scripts/metrics_table.py"
    assert not sorted(set(listed) - set(METRICS)), "README lists metrics that METRICS does not have"
    assert all(listed[n] == METRICS[n][0] for n in METRICS)
    spec = importlib.util.spec_from_file_location("metrics_table", ROOT / "scripts" / "metrics_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.table() in section, "README's metrics table is stale; paste the output of scripts/metrics_table.py"


# -- docker-compose, Dockerfile, Ray launcher, KubeRay ----------------------------------------------


def compose():
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_compose_publishes_ports_on_loopback_only():
    services = compose()["services"]
    assert {"redis", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
        assert svc.get("network_mode") != "host", name


def test_compose_redis_is_durable_and_password_protected():
    svc = compose()["services"]["redis"]
    assert svc["command"][:2] == ["sh", "-c"]
    script = svc["command"][2].replace("$$", "$")  # compose's escape for the container's shell
    assert "appendonly yes" in script and "appendfsync everysec" in script
    assert acl_user_rule(script, "$REDIS_PASSWORD") == acl_rule()
    assert re.fullmatch(r"\$\{APEXQ_REDIS_PASSWORD:\?[^}]+\}", svc["environment"]["REDIS_PASSWORD"])
    assert str(svc["user"]).split(":")[0] != "0"


def test_compose_mounts_exist_and_wire_grafana_to_prometheus():
    services = compose()["services"]
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name} mounts missing {src}"
    prom = services["prometheus"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in prom["volumes"]}
    assert mounted["/etc/prometheus/prometheus.yml"] == "./prometheus/prometheus-compose.yml"
    assert "host.docker.internal:host-gateway" in prom["extra_hosts"]
    graf = services["grafana"]
    env = graf["environment"]
    assert env["APEXQ_PROMETHEUS_URL"] == "http://prometheus:9090"
    gmounts = {v.split(":")[1]: v.split(":")[0] for v in graf["volumes"]}
    assert gmounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    assert gmounts[env["APEXQ_GRAFANA_DASHBOARDS"]] == "./grafana/dashboards"
    # the provisioning files read exactly those variables
    assert "${APEXQ_PROMETHEUS_URL}" in DATASOURCE.read_text()
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/apexq.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "${APEXQ_GRAFANA_DASHBOARDS}"


def test_dockerfile_builds_the_apexq_image_from_existing_paths():
    lines = [
        line.strip()
        for line in (DEPLOY / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert lines[0] == "FROM python:3.11-slim"
    assert 'ENTRYPOINT ["apexq"]' in lines
    for line in lines:
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    assert any(re.search(r"pip install .*-e \.", line) for line in lines)
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in ("core", "cluster", "actors", "replay_server", "learner", "configs", "pyproject.toml", "README.md"):
        assert needed not in ignored


def test_ray_cluster_launcher_config_is_valid_and_installs_apexq_everywhere():
    cfg = yaml.safe_load((DEPLOY / "ray" / "cluster.yaml").read_text())
    import ray

    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    assert schema_path.is_file(), f"Ray's launcher schema is missing ({schema_path}): the config cannot be checked"
    import jsonschema  # in the test extra

    jsonschema.validate(cfg, json.loads(schema_path.read_text()))
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [n for n, t in types.items() if t.get("resources", {}).get("GPU") == 1]
    cpu = [n for n, t in types.items() if n != cfg["head_node_type"] and not t.get("resources", {}).get("GPU")]
    assert gpu and cpu
    # what the launcher runs on each node type (a type's own list replaces the shared one)
    shared = cfg.get("setup_commands", []) + cfg.get("worker_setup_commands", [])
    for name, t in types.items():
        if name == cfg["head_node_type"]:
            cmds = cfg.get("setup_commands", []) + cfg.get("head_setup_commands", [])
        else:
            cmds = t.get("worker_setup_commands", shared)
        assert any(re.search(r"pip install .*apexq", c) for c in cmds), f"{name} never installs apexq"
        assert any("ray[default]" in c for c in cmds), f"{name} never installs ray"
    text = (DEPLOY / "ray" / "cluster.yaml").read_text()
    assert "ray up deploy/ray/cluster.yaml" in text
    assert "ray job submit --working-dir . -- apexq train --address auto --config configs/cluster.yaml" in text
    # the driver gets the cluster Redis's URL from the environment `ray start` passes on, after start_redis.sh
    starts = cfg["head_start_ray_commands"]
    (ray_start,) = [c for c in starts if "ray start --head" in c]
    assert 'APEXQ_REDIS_URL="$(cat ~/apexq-redis/url)"' in ray_start
    assert starts.index("bash ~/apexq/deploy/ray/start_redis.sh") < starts.index(ray_start)
    assert "--redis-url" not in re.sub(r"--redis-url-file", "", text)


def test_ray_head_starts_a_reachable_password_protected_redis(tmp_path):
    """deploy/ray/start_redis.sh, as the head runs it: private address, password, AOF, URL file."""
    cfg = yaml.safe_load((DEPLOY / "ray" / "cluster.yaml").read_text())
    assert "bash ~/apexq/deploy/ray/start_redis.sh" in cfg["head_start_ray_commands"]
    from needs import require_tool

    require_tool("openssl", "apt-get install openssl")
    require_tool("hostname", "apt-get install hostname")
    env = {
        "HOME": str(tmp_path),
        "PATH": "/usr/bin:/bin",
        "APEXQ_REDIS_DIR": str(tmp_path / "redis"),
        "APEXQ_REDIS_PORT": str(free_tcp_port()),
        "APEXQ_PYTHON": sys.executable,
    }
    script = str(DEPLOY / "ray" / "start_redis.sh")
    pidfile = tmp_path / "redis" / "redis.pid"
    try:
        r = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        pid = int(pidfile.read_text())
        url = (tmp_path / "redis" / "url").read_text().strip()
        m = re.fullmatch(r"redis://apexq:([0-9a-f]{48})@([\d.]+):\d+/0", url)
        password, host = m.groups()
        assert host != "127.0.0.1"
        client = redis.Redis.from_url(url)
        assert client.ping()
        with pytest.raises(redis.exceptions.NoPermissionError):  # the client ACL of replay_server/acl.py
            client.flushall()
        client.close()
        admin_pw = (tmp_path / "redis" / "admin_password").read_text().strip()
        admin = redis.Redis(host=host, port=int(env["APEXQ_REDIS_PORT"]), username="admin", password=admin_pw)
        assert admin.info("persistence")["aof_enabled"] == 1
        assert acl_list_rule(admin) == acl_rule()
        admin.close()
        assert (tmp_path / "redis" / "url").stat().st_mode & 0o077 == 0
        for f in ("redis.conf", "redis.log"):  # the users came on the server's stdin
            data = (tmp_path / "redis" / f).read_bytes()
            assert password.encode() not in data and admin_pw.encode() not in data, f
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(url.replace(password, "0" * 48)).ping()
        # a second start leaves the running server alone
        again = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "already running" in again.stdout
        assert int(pidfile.read_text()) == pid
    finally:
        if pidfile.exists():
            stop_pid(int(pidfile.read_text()))


def stop_pid(pid, grace=10.0):
    """SIGTERM a process this test started (not a child of it), SIGKILL it if it lingers."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"pid {pid} ignored SIGTERM for {grace} s")


def free_tcp_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def k8s_objects():
    objs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        objs += load_yaml(path)
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def test_kuberay_rayjob_runs_apexq_against_the_redis_service():
    objs = k8s_objects()
    job = next(o for (kind, _), o in objs.items() if kind == "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    entry = job["spec"]["entrypoint"]
    assert entry.startswith("apexq train --address auto")
    assert "--redis-url" not in entry and "$(" not in entry  # Ray records the entrypoint
    assert not re.search(r"&&|;|\|", entry), "KubeRay pastes the entrypoint into a shell line"
    # the driver runs on the head: APEXQ_REDIS_URL there, built by Kubernetes from the Secret
    cluster = job["spec"]["rayClusterSpec"]
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in head["env"]}
    m = re.fullmatch(r"redis://apexq:\$\((\w+)\)@([\w-]+):(\d+)/0", env["APEXQ_REDIS_URL"]["value"])
    assert m, env["APEXQ_REDIS_URL"]
    ref = env[m.group(1)]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in objs[("Secret", ref["name"])]["stringData"]
    svc = objs[("Service", m.group(2))]
    assert int(m.group(3)) in [p["port"] for p in svc["spec"]["ports"]]
    assert list(env).index(m.group(1)) < list(env).index("APEXQ_REDIS_URL")  # $(VAR) needs VAR defined first
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    groups = cluster["workerGroupSpecs"]

    def gpu(group):
        return group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")

    assert [g for g in groups if gpu(g) == 1] and [g for g in groups if not gpu(g)]
    # every value in rayStartParams must be a string for KubeRay
    for spec in [cluster["headGroupSpec"]] + groups:
        assert all(isinstance(v, str) for v in spec["rayStartParams"].values())
    # the config the entrypoint names ships in the image
    cfg = re.search(r"--config /app/(\S+)", entry).group(1)
    assert (ROOT / cfg).is_file()


def test_kubernetes_redis_has_aof_and_the_password_from_the_secret():
    objs = k8s_objects()
    dep = objs[("Deployment", "apexq-redis")]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["sh", "-c"]
    (script,) = c["args"]
    assert "appendonly yes" in script and "appendfsync everysec" in script
    assert acl_user_rule(script, "$REDIS_PASSWORD") == acl_rule()
    for name in ("REDIS_PASSWORD", "REDIS_ADMIN_PASSWORD"):
        (env,) = [e for e in c["env"] if e["name"] == name]
        ref = env["valueFrom"]["secretKeyRef"]
        assert ref["key"] in objs[("Secret", ref["name"])]["stringData"]
    # data on the PVC, Service selects the pod
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    data_dir = re.search(r"^dir (\S+)$", script, re.M).group(1)
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == data_dir)
    claim = vols[mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in objs
    svc = objs[("Service", "apexq-redis")]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()


# -- (d) configs/cluster.yaml ---------------------------------------------------------------------


def leaf_keys(data, prefix=""):
    out = set()
    for k, v in data.items():
        key = f"{prefix}{k}"
        out |= leaf_keys(v, key + ".") if isinstance(v, dict) else {key}
    return out


def test_cluster_config_loads_with_cluster_settings():
    cfg = load_config(ROOT / "configs" / "cluster.yaml")
    assert cfg.replay.shards >= 2
    assert cfg.actors.num > load_config().actors.num
    assert cfg.metrics.host == "0.0.0.0" and cfg.metrics.enabled
    assert cfg.eval.every_seconds > 0


def test_cluster_config_is_an_overlay_of_the_default():
    """configs/cluster.yaml names only keys of the default that it changes, each with a comment (why it
    differs) above it; every key it leaves out loads as the default. (When it became an overlay, the
    overlay loaded to the same Config as the full copy it replaced, compared with to_dict().)"""
    path = ROOT / "configs" / "cluster.yaml"
    text = path.read_text()
    assert "merges this file over configs/mountaincar.yaml" in " ".join(text.split())
    overlay = yaml.safe_load(text)
    default = load_config().to_dict()
    cluster = load_config(path).to_dict()
    named = leaf_keys(overlay)
    assert named <= leaf_keys(default), named - leaf_keys(default)

    def value(data, key):
        for part in key.split("."):
            data = data[part]
        return data

    same = [k for k in named if value(cluster, k) == value(default, k)]
    assert not same, f"keys set to their default value: {same}"
    for key in leaf_keys(default) - named:
        assert value(cluster, key) == value(default, key), key
    lines = text.splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z_][\w]*):\s*(\S.*)?$", line)
        if not m or m.group(3) is None:  # not a key, or a section header
            continue
        if i == 0 or not lines[i - 1].strip().startswith("#"):
            undocumented.append(m.group(2))
    assert not undocumented, f"keys without a comment line above them: {undocumented}"


# -- secrets and Pod Security (issue #22) -----------------------------------------------------------


def acl_user_rule(text, password_token):
    """The rule of the `user apexq` line a deploy file writes into its Redis config; the file must
    also keep `default` off with every right (Redis replays its AOF as `default`: see acl.py)."""
    from apexq.replay_server.acl import DEFAULT_USER_LINE

    assert re.search(rf"^\s*{re.escape(DEFAULT_USER_LINE)}\s*$", text, re.M), f"no `{DEFAULT_USER_LINE}` line"
    m = re.search(rf"^\s*user apexq reset on >{re.escape(password_token)} (.+?)\s*$", text, re.M)
    assert m, f"no `user apexq reset on >{password_token} ...` line"
    return m.group(1)


def acl_list_rule(admin):
    """The apexq user's rule as a running server reports it (ACL LIST), in acl_rule()'s form; the
    default user must be off with every right."""
    users = [u.decode() for u in admin.execute_command("ACL", "LIST")]
    (default,) = [u for u in users if u.startswith("user default ")]
    assert " off " in default and "~*" in default and "+@all" in default, default
    (line,) = [u for u in users if u.startswith("user apexq ")]
    return "resetkeys " + line[line.index(" ~") + 1 :]


def pod_specs(node):
    """Every pod spec (a mapping with `containers`) anywhere inside a manifest."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield node
        for v in node.values():
            yield from pod_specs(v)
    elif isinstance(node, list):
        for v in node:
            yield from pod_specs(v)


def restricted_violations(pod):
    """What Pod Security "restricted" would reject in one pod spec (container settings override the pod's)."""
    bad = []
    psc = pod.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            bad.append(key)
    bad += [f"hostPath volume {v['name']}" for v in pod.get("volumes", []) if "hostPath" in v]
    for c in pod.get("initContainers", []) + pod["containers"]:
        sc = c.get("securityContext") or {}
        name = c["name"]

        def eff(key):
            return sc.get(key, psc.get(key))

        if eff("runAsNonRoot") is not True:
            bad.append(f"{name}: runAsNonRoot")
        if not eff("runAsUser"):  # restricted allows an unset uid for non-root images; we pin one
            bad.append(f"{name}: runAsUser unset or 0")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation")
        if sc.get("privileged"):
            bad.append(f"{name}: privileged")
        caps = sc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            bad.append(f"{name}: capabilities")
        if (eff("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{name}: seccompProfile")
        bad += [f"{name}: hostPort" for p in c.get("ports", []) if p.get("hostPort")]
    return bad


def test_every_kubernetes_pod_meets_pod_security_restricted():
    pods = [(name, pod) for (kind, name), obj in k8s_objects().items() for pod in pod_specs(obj.get("spec", {}))]
    # redis, the RayJob's submitter, head and both worker groups
    assert len(pods) >= 5, [n for n, _ in pods]
    for name, pod in pods:
        assert not restricted_violations(pod), (name, restricted_violations(pod))
        sc = pod["securityContext"]
        assert sc["runAsUser"] > 0 and sc["runAsNonRoot"] is True, name


def secret_env_names(container):
    """Env vars of a container that hold a secret: from a secretKeyRef, or built from one with $(VAR)."""
    names = set()
    for e in container.get("env", []):
        value = e.get("value", "")
        if "secretKeyRef" in e.get("valueFrom", {}) or any(f"$({n})" in value for n in names):
            names.add(e["name"])
    return names


def argv_secret_leaks():
    """Places in deploy/ where a password would end up in some process's argv or Ray's job record."""
    leaks = []
    literal = re.compile(r"rediss?://[^\s@/]*:[^\s@/$]+@")  # a URL with a literal password
    for (kind, name), obj in k8s_objects().items():
        if kind == "RayJob":
            entry = obj["spec"]["entrypoint"]
            if "--redis-url " in entry or "$(" in entry or literal.search(entry):
                leaks.append(f"{name}: entrypoint {entry}")
        for pod in pod_specs(obj.get("spec", {})):
            for c in pod.get("initContainers", []) + pod["containers"]:
                argv = " ".join(map(str, c.get("command", []) + c.get("args", [])))
                for var in secret_env_names(c):  # Kubernetes expands $(VAR) in command and args
                    if f"$({var})" in argv:
                        leaks.append(f"{name}/{c['name']}: $({var}) in argv")
                if literal.search(argv) or "--requirepass" in argv:
                    leaks.append(f"{name}/{c['name']}: password in argv")
    cmd = compose()["services"]["redis"]["command"]
    argv = " ".join(cmd) if isinstance(cmd, list) else cmd
    if "--requirepass" in argv or re.search(r"(?<!\$)\$\{?\w*PASSWORD", argv):
        leaks.append("docker-compose redis: password in argv")
    ray_text = (DEPLOY / "ray" / "cluster.yaml").read_text()
    if re.search(r"--redis-url\s+\S*(\$\(cat|redis://)", ray_text) or literal.search(ray_text):
        leaks.append("ray/cluster.yaml: --redis-url with the password")
    return leaks


def test_no_password_reaches_an_argv_or_the_recorded_entrypoint():
    assert argv_secret_leaks() == []


def compose_secret_fallbacks(text):
    """${VAR:-default} / ${VAR-default} of a password variable: a known password when VAR is unset."""
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    refs = re.findall(r"\$\{(\w*PASSWORD\w*)(:?[-?])?[^}]*\}", code)
    assert refs, "no password variables found"
    return sorted({var for var, op in refs if op != ":?"})


def test_compose_requires_every_password_variable():
    assert compose_secret_fallbacks((DEPLOY / "docker-compose.yml").read_text()) == []


def run_redis_script(script, tmp_path, port):
    """A deploy file's Redis start script, run by sh on this machine with the embedded server binary."""
    from apexq.cluster.redis_server import find_server

    data = tmp_path / "data"
    data.mkdir()
    conf = tmp_path / "redis.conf"
    script = script.replace("dir /data", f"dir {data}").replace("/tmp/redis.conf", str(conf))
    script = re.sub(r"exec redis-server (\S+)", rf"exec {find_server()} \1 --port {port} --bind 127.0.0.1", script)
    env = {"PATH": "/usr/bin:/bin", "REDIS_PASSWORD": "c1ient-pw", "REDIS_ADMIN_PASSWORD": "adm1n-pw"}
    return subprocess.Popen(["sh", "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), conf


def redis_start_scripts():
    (c,) = k8s_objects()[("Deployment", "apexq-redis")]["spec"]["template"]["spec"]["containers"]
    return {"compose": compose()["services"]["redis"]["command"][2].replace("$$", "$"), "k8s": c["args"][0]}


@pytest.mark.parametrize("which", ["compose", "k8s"])
def test_deploy_redis_scripts_start_a_server_with_the_client_acl(which, tmp_path):
    port = free_tcp_port()
    proc, conf = run_redis_script(redis_start_scripts()[which], tmp_path, port)
    try:
        client = redis.Redis(port=port, username="apexq", password="c1ient-pw")
        deadline = time.monotonic() + 15
        while True:
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "the server did not answer"
                time.sleep(0.1)
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.flushall()
        admin = redis.Redis(port=port, username="admin", password="adm1n-pw")
        assert acl_list_rule(admin) == acl_rule()
        assert admin.info("persistence")["aof_enabled"] == 1
        assert conf.stat().st_mode & 0o077 == 0
        assert b"c1ient-pw" not in conf.read_bytes() and b"adm1n-pw" not in conf.read_bytes()  # they came on stdin
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes()  # sh exec'd redis-server
        assert b"c1ient-pw" not in argv and b"adm1n-pw" not in argv
    finally:
        proc.kill()
        proc.wait()


def test_readme_gives_the_acl_line_and_the_pod_security_profile():
    from apexq.replay_server.acl import setuser_command

    readme = (ROOT / "README.md").read_text()
    assert setuser_command() in readme
    assert 'meet Pod Security "restricted"' in readme
    for option in ("APEXQ_REDIS_URL", "--redis-url-file"):
        assert option in readme


# -- (e) images that form one cluster -------------------------------------------------------------


def dockerfile_instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments left out."""
    out, cont = [], False
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        out[-1:] = [out[-1] + " " + line] if cont else out[-1:] + [line]
        cont = out[-1].endswith("\\")
        if cont:
            out[-1] = out[-1][:-1].rstrip()
    return out


def dockerfile_args() -> dict:
    return dict(re.fullmatch(r"ARG (\w+)=(\S+)", i).groups() for i in dockerfile_instructions() if i.startswith("ARG "))


def test_every_deploy_file_declares_the_ray_version_of_the_image():
    """Nodes with different Ray versions cannot join one cluster: one version, stated everywhere."""
    version = dockerfile_args()["RAY_VERSION"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    job = next(o for (kind, _), o in k8s_objects().items() if kind == "RayJob")
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == version
    launcher = (DEPLOY / "ray" / "cluster.yaml").read_text()
    readme = (ROOT / "README.md").read_text()
    for where, text in (("deploy/ray/cluster.yaml", launcher), ("README.md", readme)):
        pins = set(re.findall(r"ray\[default\]==(\d[\w.]*)", text))
        assert pins == {version}, f"{where} pins Ray {pins}, the image {version}"
    text = "\n".join(dockerfile_instructions())
    assert '"ray[default]==${RAY_VERSION}"' in text and not re.search(r"ray\[default\](?!==\$\{RAY_VERSION\})", text)


def test_cpu_and_gpu_nodes_take_the_same_torch_version():
    version = dockerfile_args()["TORCH_VERSION"]
    text = "\n".join(dockerfile_instructions())
    assert text.count('"torch==${TORCH_VERSION}"') == 2 and "torch>=" not in text
    launcher = (DEPLOY / "ray" / "cluster.yaml").read_text()
    assert set(re.findall(r'"torch([^"]*)"', launcher)) == {f"=={version}"}  # CPU and GPU node types alike
    from packaging.specifiers import SpecifierSet

    deps = [
        d
        for d in __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        if d.startswith("torch")
    ]
    assert version in SpecifierSet(deps[0][len("torch") :])


def test_dockerfile_installs_dependencies_before_copying_the_source():
    """Layer caching: an edit of the code must not reinstall Ray and torch."""
    lines = dockerfile_instructions()
    copies = [i for i, line in enumerate(lines) if line.startswith("COPY ")]
    assert lines[copies[0]].split()[1:-1] == ["pyproject.toml", "README.md"]
    source = next(i for i in copies if lines[i] == "COPY . .")
    assert copies == [copies[0], source]  # nothing else copied: the source arrives in one step
    installs = [i for i, line in enumerate(lines) if "pip install" in line]
    deps = next(i for i in installs if "pip install -r /tmp/requirements.txt" in lines[i])
    assert copies[0] < deps < source and "tomllib.load(open('pyproject.toml'" in lines[deps]
    after = [lines[i] for i in installs if i > source]
    assert after and all("--no-deps" in line for line in after), after
