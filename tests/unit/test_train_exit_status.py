"""How `apexq train` ends, from the run's summary: unbalanced or unreconciled accounting and a Redis
that stayed unreachable exit 1 with one line saying why, never `done` and 0."""

from apexq.cluster import cli, launch

BALANCED = {
    "reconciled": True,
    "appended": 1024,
    "ingested": 768,
    "pending": 256,
    "balanced": True,
    "rejected_entries": 0,
    "lost_in_redis": 0,
    "in_flight_lost": 0,
}


def run(monkeypatch, tmp_path, capsys, summary):
    def fake_train(cfg, rd, **kw):
        return {"record": {"env_steps": 10, "updates": 2}, "checkpoint": str(rd.checkpoint), **summary}

    monkeypatch.setattr(launch, "train", fake_train)
    rc = cli.main(["train", "--run-dir", str(tmp_path / "run"), "--set", "metrics.enabled=false"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_balanced_run_exits_0(monkeypatch, tmp_path, capsys):
    rc, out, err = run(
        monkeypatch, tmp_path, capsys, {"stop_reason": "reached train.max_seconds", "accounting": BALANCED}
    )
    assert rc == 0, out + err
    assert "apexq: accounting: appended 1024 = ingested 768 + pending 256 -> balanced" in out
    assert "apexq: done (reached train.max_seconds)" in out and "error" not in err


def test_unbalanced_accounting_exits_1_with_one_line(monkeypatch, tmp_path, capsys):
    acct = {**BALANCED, "ingested": 1000, "balanced": False}
    rc, out, err = run(monkeypatch, tmp_path, capsys, {"stop_reason": "reached train.max_seconds", "accounting": acct})
    assert rc == 1
    (line,) = [l for l in err.splitlines() if l.startswith("apexq: error:")]
    assert line.startswith("apexq: error: accounting NOT BALANCED")


def test_unreconciled_accounting_exits_1(monkeypatch, tmp_path, capsys):
    acct = {"reconciled": False, "why": "Redis unreachable at the end of the run"}
    rc, out, err = run(monkeypatch, tmp_path, capsys, {"stop_reason": "interrupted", "accounting": acct})
    assert rc == 1
    assert (
        err.strip().splitlines()[-1]
        == "apexq: error: accounting not reconciled: Redis unreachable at the end of the run"
    )


def test_redis_unreachable_is_stopped_not_done(monkeypatch, tmp_path, capsys):
    rc, out, err = run(
        monkeypatch,
        tmp_path,
        capsys,
        {
            "stop_reason": "Redis unreachable: Redis at x unreachable for 61s",
            "accounting": {"reconciled": False, "why": "Redis unreachable"},
        },
    )
    assert rc == 1
    assert "apexq: stopped (Redis unreachable:" in out and "apexq: done" not in out


def test_lost_appends_are_explained_but_not_an_error(monkeypatch, tmp_path, capsys):
    acct = {**BALANCED, "lost_in_redis": 512}
    rc, out, err = run(monkeypatch, tmp_path, capsys, {"stop_reason": "reached train.max_seconds", "accounting": acct})
    assert rc == 0
    assert "apexq: note: 512 transitions that actors saw acknowledged were lost when Redis restarted" in out
