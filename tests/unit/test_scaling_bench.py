"""benchmarks/scaling.py's rates come from a run's metrics.jsonl, over its steady part, by hand."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def scaling():
    spec = importlib.util.spec_from_file_location("scaling", ROOT / "benchmarks" / "scaling.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rec(t, steps, updates, inserted, sampled, sw=0, iw=0, bp=0, final=False):
    r = {
        "time_s": t,
        "env_steps": steps,
        "updates": updates,
        "transitions_inserted": inserted,
        "transitions_sampled": sampled,
        "sample_waits": sw,
        "insert_waits": iw,
        "backpressure_waits": bp,
    }
    return {**r, "final": True} if final else r


def test_rates_are_taken_from_the_first_record_with_updates_to_the_last(tmp_path):
    recs = [
        rec(2.0, 1000, 0, 900, 0),
        rec(4.0, 5000, 0, 4800, 0),  # start-up: excluded
        rec(6.0, 10_000, 10, 9_600, 5_120, sw=1, iw=0, bp=2),  # first record with updates
        rec(8.0, 20_000, 210, 19_200, 107_520, sw=3, iw=4, bp=2),
        rec(16.0, 60_000, 1010, 57_600, 517_120, sw=15, iw=4, bp=9),
        rec(17.0, 61_000, 1020, 58_000, 520_000, final=True),
    ]  # the final record: excluded
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    got = scaling().steady_rates(tmp_path)
    # over 10 s from t=6 to t=16: (60000-10000)/10, (1010-10)/10, (57600-9600)/10, (517120-5120)/10, ...
    assert got == {
        "env_steps_per_s": 5000.0,
        "updates_per_s": 100.0,
        "inserts_per_s": 4800.0,
        "samples_per_s": 51200.0,
        "learner_waits_per_s": 1.4,
        "insert_waits_per_s": 0.4,
        "backpressure_per_s": 0.7,
        "window_s": 10.0,
    }


def test_a_run_that_never_trained_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rec(2.0, 1000, 0, 900, 0)) + "\n")
    with pytest.raises(RuntimeError, match="never updated"):
        scaling().steady_rates(tmp_path)
