"""deploy/grafana/dashboards/apexq.json imports into any Grafana: every query goes through the
data-source variable (offered by the import dialog through `__inputs`), no rate window is fixed
(`$__rate_interval` fits any scrape interval) and no aggregation adds different runs together."""

import json
import subprocess
from pathlib import Path

import yaml
from promql_checks import FIXED_WINDOW, aggregations_dropping, promtool, range_windows

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "apexq.json"
VARIABLE_REF = {"type": "prometheus", "uid": "${datasource}"}


def load(text=None):
    return json.loads(DASHBOARD.read_text() if text is None else text)


def exprs(dashboard):
    """(panel title, expr) of every panel query."""
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def datasource_refs(node, path="$"):
    """(path, value) of every `datasource` field anywhere in the dashboard's JSON."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "datasource":
                yield f"{path}.{k}", v
            yield from datasource_refs(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from datasource_refs(v, f"{path}[{i}]")


def foreign_datasources(dashboard):
    """Data-source references that do not go through the variable (Grafana's built-in annotation
    source aside): a fixed uid or name is "datasource not found" in any other Grafana."""
    return [
        (path, ref)
        for path, ref in datasource_refs(dashboard)
        if ref != VARIABLE_REF and not (isinstance(ref, dict) and ref.get("type") == "grafana")
    ]


def test_every_datasource_reference_is_the_variable():
    dashboard = load()
    refs = list(datasource_refs(dashboard))
    assert len(refs) > 2 * len(dashboard["panels"])  # panels, their targets, the run variable
    assert not foreign_datasources(dashboard)


def test_the_import_dialog_asks_for_the_datasource_and_fills_the_variable():
    text = DASHBOARD.read_text()
    (inp,) = load()["__inputs"]
    assert inp["name"] == "DS_PROMETHEUS" and inp["type"] == "datasource" and inp["pluginId"] == "prometheus"
    # Grafana's import replaces ${DS_PROMETHEUS} in every string of the JSON with the chosen uid.
    # Only the variable's default names it, so the panels keep following the variable.
    imported = load(text.replace("${DS_PROMETHEUS}", "their-prometheus"))
    (var,) = [v for v in imported["templating"]["list"] if v["name"] == "datasource"]
    assert var["type"] == "datasource" and var["query"] == "prometheus" and not var["multi"]
    assert var["current"]["value"] == "their-prometheus"
    assert not foreign_datasources(imported)
    assert imported["templating"]["list"][0] is var  # defined before the `run` variable that uses it


def test_no_rate_has_a_fixed_window():
    found = 0
    for title, expr in exprs(load()):
        assert not FIXED_WINDOW.search(expr), (title, expr)
        windows = range_windows(expr)
        assert all(w == "$__rate_interval" for w in windows), (title, expr)
        found += len(windows)
    assert found >= 20


def test_every_aggregation_keeps_the_run():
    found = 0
    for title, expr in exprs(load()):
        assert not aggregations_dropping(expr, "run"), (title, expr)
        found += expr.count(" by (")
        assert 'run=~"$run"' in expr, (title, expr)
    assert found >= 30


def test_every_query_is_valid_promql(tmp_path):
    """promtool parses each query (Grafana's variables filled in) as a recording rule."""
    queries = [e.replace("$run", ".*").replace("$__rate_interval", "20s") for _, e in exprs(load())]
    rules = [{"record": f"apexq_dashboard:query{i}", "expr": q} for i, q in enumerate(queries)]
    (tmp_path / "queries.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run(
        [promtool(), "check", "rules", str(tmp_path / "queries.yml")], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and f"SUCCESS: {len(rules)} rules found" in r.stdout, r.stdout + r.stderr


def test_standalone_replay_server_rpc_panels():
    queries = {title: expr for title, expr in exprs(load())}
    rpc = {t: e for t, e in queries.items() if "apexq_replay_rpc_" in e}
    assert any("sum by (run, shard) (rate(apexq_replay_rpc_requests_total" in e for e in rpc.values())
    assert any("sum by (run, reason) (rate(apexq_replay_rpc_rejected_total" in e for e in rpc.values())


def test_the_checks_catch_a_dashboard_made_the_old_way():
    """The scanners above on the forms this dashboard used to have (fixed uid, [30s] windows,
    runs summed together), so the tests cannot pass vacuously."""
    old = {
        "panels": [
            {
                "title": "x",
                "datasource": {"type": "prometheus", "uid": "apexq-prometheus"},
                "targets": [
                    {
                        "datasource": {"type": "prometheus", "uid": "apexq-prometheus"},
                        "expr": 'sum(rate(apexq_actor_env_steps_total{run=~"$run"}[30s]))',
                    }
                ],
            }
        ],
        "annotations": {"list": [{"datasource": {"type": "grafana", "uid": "-- Grafana --"}}]},
    }
    assert [path for path, _ in foreign_datasources(old)] == [
        "$.panels[0].datasource",
        "$.panels[0].targets[0].datasource",
    ]
    ((_, expr),) = exprs(old)
    assert FIXED_WINDOW.search(expr) and range_windows(expr) == ["30s"]
    assert aggregations_dropping(expr, "run") == [("sum", None, set())]
    assert aggregations_dropping("sum by (actor) (x)", "run") and aggregations_dropping("max(x) without (run)", "run")
    assert not aggregations_dropping("sum(x) by (run, actor) + max without (shard) (y)", "run")
    assert range_windows("increase(a[$__rate_interval]) / irate(b[1m])") == ["$__rate_interval", "1m"]
