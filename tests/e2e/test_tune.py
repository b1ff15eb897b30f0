"""`apexq tune` as a user runs it: a real search of tiny MountainCar trials on a private local Ray,
interrupted with SIGINT after its first trial and resumed to the end."""

import csv
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from procs import Watch, wait_for

from apexq.cluster.config import load_config

pytestmark = pytest.mark.slow
ENV = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
# Every MountainCar episode returns at least -200, so a run solves at its first greedy evaluation.
BASE = "eval: {every_seconds: 1.0, episodes: 5}\ntrain: {stop_at_return: -200, progress_every_s: 1.0}\n"
SPACE = "learner.lr: {type: loguniform, low: 1.0e-4, high: 3.0e-3}\nactors.n_step: {type: randint, low: 1, high: 3}\n"
ARGS = ["--config", "base.yaml", "--space", "space.yaml", "--trials", "3", "--seeds", "1", "--budget", "8"]
# trial, id, objective_s, solved/seeds, final_return, state, params
LINE = re.compile(
    r"^\s*(\d+)\s+([0-9a-f]{8})\s+(\d+\.\d)\s+([01])/1\s+(-?\d+\.\d|-)\s+(done|stopped early)\s+"
    r"learner\.lr=[0-9.e-]+ actors\.n_step=([123])(\s+\(before the resume\))?$"
)


class Search:
    """``apexq tune ARGS`` in ``cwd``, its output collected as it comes and its processes watched."""

    def __init__(self, cwd: Path, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "apexq.cluster.cli", "tune", *args],
            cwd=cwd,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.watch = Watch(self.proc.pid)
        self.lines: list[str] = []
        self.errors: list[str] = []
        self.readers = [
            threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, ""))),
            threading.Thread(target=lambda: self.errors.extend(iter(self.proc.stderr.readline, ""))),
        ]
        for t in self.readers:
            t.start()

    def rows(self) -> list[re.Match]:
        return [m for m in map(LINE.match, list(self.lines)) if m]

    def finish(self, timeout: float) -> tuple[int, str, str]:
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            for t in self.readers:
                t.join(10)
            self.watch.stop()
        left = self.watch.wait_gone(30)
        assert not left, f"outlived the search: {left}"
        assert self.watch.kinds("apexq.cluster.cli train"), "the watch never saw a trial's run"
        return self.proc.returncode, "".join(self.lines), "".join(self.errors)


def test_a_search_interrupted_after_its_first_trial_resumes_to_the_end(tmp_path):
    (tmp_path / "base.yaml").write_text(BASE)
    (tmp_path / "space.yaml").write_text(SPACE)
    folder = tmp_path / "tune" / "s"
    runs = folder / "runs"

    first = Search(tmp_path, *ARGS, "--id", "s")
    # interrupt once trial 1 is in the table and trial 2 has started
    assert wait_for(lambda: first.rows() and runs.is_dir() and len(list(runs.iterdir())) >= 2, 150), first.lines
    first.proc.send_signal(signal.SIGINT)
    rc, out, err = first.finish(90)
    assert rc == 130, (out, err)
    done_before = first.rows()
    assert [int(m[1]) for m in done_before][:1] == [1] and len(done_before) < 3, out
    assert re.search(rf"interrupted with {len(done_before)} of 3 trials finished .*apexq tune --id s --resume", out)
    assert "Traceback" not in err, err
    assert not list(runs.glob("*/*.tmp")), "a run's TMPDIR was left"
    trial1 = done_before[0][2]
    kept = (runs / trial1 / "seed0" / "metrics.jsonl").read_bytes()
    mtime = (runs / trial1 / "seed0" / "metrics.jsonl").stat().st_mtime_ns

    # A resume reads the search's own trials.csv, never Tune's pickled state: spoil all of that.
    spoiled = [f for f in (folder / "ray").rglob("*") if f.is_file()]
    assert spoiled, "Tune wrote no state under tune/s/ray"
    for f in spoiled:
        f.write_bytes(b"not a pickle")

    second = Search(tmp_path, "--id", "s", "--resume")
    rc, out, err = second.finish(240)
    assert rc == 0, (out, err)
    assert "Traceback" not in err, err
    rows = second.rows()
    assert [int(m[1]) for m in rows] == [1, 2, 3], out  # the earlier ones listed first, then the new
    assert all(bool(m[8]) == (int(m[1]) <= len(done_before)) for m in rows), out
    assert rows[0][2] == trial1
    assert re.search(r"^apexq tune: 3 trials \(", out, re.M), out
    # the first trial was not run again: its run is untouched, and there are three runs in all
    assert (runs / trial1 / "seed0" / "metrics.jsonl").read_bytes() == kept
    assert (runs / trial1 / "seed0" / "metrics.jsonl").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in runs.iterdir()) == sorted(m[2] for m in rows)
    assert not list(runs.glob("*/*.tmp")), "a run's TMPDIR was left"

    with open(folder / "trials.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["trial"]) for r in table] == [1, 2, 3]
    assert [r["trial_id"] for r in table] == [m[2] for m in rows]
    for r, m in zip(table, rows):
        assert r["state"] == m[6] and float(r["objective_s"]) <= 8.0
        assert 1e-4 <= float(r["learner.lr"]) <= 3e-3 and r["actors.n_step"] in ("1", "2", "3")

    text = (folder / "best.yaml").read_text()
    assert text.startswith("# apexq tune: the best of 3 finished trials: trial ")
    assert "objective " in text and "apexq train --config tune/s/base.yaml --set learner.lr=" in text
    best = yaml.safe_load(text)
    assert set(best) == {"learner", "actors"} and set(best["learner"]) == {"lr"} and set(best["actors"]) == {"n_step"}
    cfg = load_config(folder / "best.yaml")  # an overlay over the packaged default
    assert cfg.learner.lr == best["learner"]["lr"] and cfg.actors.n_step == best["actors"]["n_step"]
    assert (folder / "objective.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # each trial's runs were judged on fresh episodes after they ended (every return is >= -200)
    for m in rows:
        log = (runs / m[2] / "seed0.log").read_text()
        assert "$ apexq evaluate " in log and "--seed 777 --json" in log, log[-2000:]


def test_a_distributed_search_runs_each_seed_on_a_private_ray_of_its_own(tmp_path):
    """--distributed: each run is a plain `apexq train` (its own local Ray, actors and learner in
    processes of their own), and its solve is confirmed on other episodes before it counts. A
    one-value choice fixes a key for every trial: here the confirmation's 7 episodes (5 by default).
    --start-at: the trial runs the start point's values (lr from the file, n_step from base.yaml)."""
    (tmp_path / "base.yaml").write_text(BASE + "actors: {n_step: 2}\n")
    (tmp_path / "space.yaml").write_text(SPACE + "eval.confirm_episodes: {type: choice, values: [7]}\n")
    (tmp_path / "start.yaml").write_text("learner: {lr: 0.000321}\n")
    args = ["--config", "base.yaml", "--space", "space.yaml", "--trials", "1", "--seeds", "1", "--budget", "20"]
    rc, out, err = Search(tmp_path, *args, "--id", "d", "--distributed", "--start-at", "start.yaml").finish(240)
    assert rc == 0 and "Traceback" not in err, (out, err)
    line = re.compile(
        r"^\s*1\s+([0-9a-f]{8})\s+\S+\s+1/1\s.*\s+learner\.lr=0\.000321 actors\.n_step=2 "
        r"eval\.confirm_episodes=7  \(--start-at\)$"
    )
    rows = [m for m in map(line.match, out.splitlines()) if m]
    assert rows, out
    log = (tmp_path / "tune" / "d" / "runs" / rows[0][1] / "seed0.log").read_text()
    assert "apexq: started a local Ray" in log, log[:2000]  # a single-process run starts no Ray
    assert re.search(r"apexq: done \(eval return -200\.0 >= train\.stop_at_return, confirmed on 7 other", log), log
    best = (tmp_path / "tune" / "d" / "best.yaml").read_text()
    assert "--distributed" in best and yaml.safe_load(best)["eval"] == {"confirm_episodes": 7}, best
