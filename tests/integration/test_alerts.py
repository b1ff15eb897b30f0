"""deploy/prometheus/alerts.yml: promtool accepts the rules and their unit tests pass
(deploy/prometheus/alerts_test.yml), every alert has a firing and a quiet test case, reads only
metrics apexq exports, keeps the `run` label, and the shipped Prometheus configs load the file."""

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from promql_checks import aggregations_dropping, metric_names, promtool

from apexq.cluster.metrics import METRICS

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
ALERTS_TEST = PROMETHEUS / "alerts_test.yml"
WANTED = {
    "ApexqLearnerStalled",
    "ApexqActorWeightsStale",
    "ApexqRestartLoop",
    "ApexqReplayRejectingEntries",
    "ApexqNoEvaluation",
    "ApexqTargetDown",
}


def rules():
    (group,) = yaml.safe_load(ALERTS.read_text())["groups"]
    return group["rules"]


def run_promtool(*args, cwd=PROMETHEUS):
    return subprocess.run([promtool(), *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_promtool_checks_the_rules():
    r = run_promtool("check", "rules", ALERTS)
    assert r.returncode == 0 and f"SUCCESS: {len(WANTED)} rules found" in r.stdout, r.stdout + r.stderr


def test_promtool_unit_tests_of_the_alerts_pass():
    r = run_promtool("test", "rules", ALERTS_TEST)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("name", sorted(WANTED))
def test_the_unit_tests_fail_when_an_alert_never_fires(name, tmp_path):
    """Each alert's rule replaced by one that never fires: its firing test case must fail, so no
    alert's expectations are vacuous."""
    doc = yaml.safe_load(ALERTS.read_text())
    (rule,) = [r for r in doc["groups"][0]["rules"] if r["alert"] == name]
    rule["expr"] = "vector(1) == 0"
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(doc))
    (tmp_path / "alerts_test.yml").write_text(ALERTS_TEST.read_text())
    r = run_promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert r.returncode != 0 and f"alertname: {name}" in r.stdout + r.stderr, r.stdout + r.stderr


def test_the_promised_alerts_exist_with_summary_severity_and_metric():
    by_name = {r["alert"]: r for r in rules()}
    assert set(by_name) == WANTED and len(rules()) == len(WANTED)
    for name, rule in by_name.items():
        ann = rule["annotations"]
        assert ann["summary"] and ann["description"], name
        assert "{{ $labels.run }}" in ann["summary"], f"{name}: the summary must name the run"
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        read = metric_names(rule["expr"])
        unknown = read - set(METRICS) - {"up"}
        assert read and not unknown, f"{name} reads metrics apexq does not export: {unknown}"
        assert {m.strip() for m in ann["metric"].split(",")} == read, f"{name}: the metric annotation must list {read}"


def test_every_alert_keeps_the_run_label():
    for rule in rules():
        assert not aggregations_dropping(rule["expr"], "run"), (rule["alert"], rule["expr"])
    # the scrape alert reads `up` directly, which carries run from the driver's target labels
    (down,) = [r for r in rules() if r["alert"] == "ApexqTargetDown"]
    job = re.search(r'up\{job="([^"]+)"\}', down["expr"]).group(1)
    for name in ("prometheus.yml", "prometheus-compose.yml"):
        (scrape,) = yaml.safe_load((PROMETHEUS / name).read_text())["scrape_configs"]
        assert scrape["job_name"] == job, f"{name}: ApexqTargetDown watches job {job!r}"


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    cases = [c for t in yaml.safe_load(ALERTS_TEST.read_text())["tests"] for c in t["alert_rule_test"]]
    for name in WANTED:
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name}: no test case where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no test case where it stays quiet"
        for c in mine:
            for alert in c["exp_alerts"]:
                assert alert["exp_annotations"]["summary"], f"{name}: a firing case must check the summary"


def test_the_shipped_prometheus_configs_load_the_rules():
    for name in ("prometheus.yml", "prometheus-compose.yml"):
        config = yaml.safe_load((PROMETHEUS / name).read_text())
        assert config["rule_files"] == ["alerts.yml"], name  # relative to the config's directory
        r = run_promtool("check", "config", PROMETHEUS / name)
        assert r.returncode == 0 and f"SUCCESS: {len(WANTED)} rules found" in r.stdout, r.stdout + r.stderr
    # docker compose mounts the rules file beside the config it mounts
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    config_dir = next(dst for dst, src in mounts.items() if src.endswith("prometheus-compose.yml")).rsplit("/", 1)[0]
    assert (DEPLOY / mounts[f"{config_dir}/alerts.yml"]).resolve() == ALERTS.resolve()


def test_the_driver_exports_the_evaluation_time_the_no_evaluation_alert_reads():
    from prometheus_client import CollectorRegistry, generate_latest

    from apexq.cluster.metrics import StatsCollector

    def scrape(stats):
        registry = CollectorRegistry()
        registry.register(StatsCollector("driver", 0, lambda: stats))
        return generate_latest(registry).decode()

    base = {"eval_return": None, "time_to_solve_s": None, "restarts": {}, "env_steps": 0}
    assert "apexq_eval_last_timestamp_seconds 1.7e+09" in scrape(dict(base, eval_last_time=1.7e9))
    # evaluation off (eval.every_seconds 0): no sample, so the alert has nothing to fire on
    assert not re.search(r"^apexq_eval_last_timestamp_seconds ", scrape(dict(base, eval_last_time=None)), re.M)
