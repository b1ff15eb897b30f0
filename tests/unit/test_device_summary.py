"""benchmarks/device_summary.py: the GPU machine's figures from the logs benchmarks/device.sh leaves."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def summary():
    spec = importlib.util.spec_from_file_location("device_summary", ROOT / "benchmarks" / "device_summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def scaling_json(n, steps, updates):
    f = {"actors": [n], "env_steps_per_s": [steps], "updates_per_s": [updates], "learner_waits_per_s": [0.0]}
    return json.dumps({"benchmark": "scaling", "figures": f, "targets": {}})


def solve_log(key, final_key, solve_s, final):
    return "a table\n" + json.dumps({"benchmark": "solve", "figures": {key: solve_s, final_key: [final]}})


def test_figures_from_the_logs_of_each_step(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (tmp_path / "machine.txt").write_text("GPU 0: NVIDIA H200 (UUID: GPU-x)\nname, driver\n")
    (logs / "cuda_tests.txt").write_text("..........\n10 passed in 30.1s\n")
    learner = {"updates_per_s_b512": 3000.0, "bare_updates_per_s_b512": 5000.0, "efficiency_b512": 0.6}
    (logs / "learner_async.txt").write_text("table\n" + json.dumps({"benchmark": "learner", "figures": learner}))
    (logs / "scaling_1.json").write_text(scaling_json(1, 10_000.0, 4000.0))
    (logs / "scaling_8.json").write_text(scaling_json(8, 64_000.0, 4600.0))
    (logs / "scaling_8.txt").write_text(
        "  8 actor(s), capacity: apexq: first learner update 7.1s after launch "
        "(on cuda:0, the update as one CUDA graph)\n"
    )
    (logs / "solve_dist_0.txt").write_text(solve_log("apexq_median_solve_s", "apexq_final_returns", 20.0, -104.0))
    (logs / "solve_dist_1.txt").write_text(solve_log("apexq_median_solve_s", "apexq_final_returns", 30.0, -105.0))
    (logs / "solve_single_0.txt").write_text(
        solve_log("apexq_single_median_solve_s", "single_final_returns", 50.0, -106.0)
    )
    (logs / "solve_single_1.txt").write_text("Traceback: the step was cut by its time limit\n")

    out = summary().summarise(tmp_path)
    f, t = out["figures"], out["targets"]
    assert f["machine"] == "GPU 0: NVIDIA H200 (UUID: GPU-x)" and f["cuda_tests"] == "10 passed in 30.1s"
    assert f["first_update_line"].startswith("apexq: first learner update") and "CUDA graph" in f["first_update_line"]
    assert f["actors"] == [1, 8] and f["scaling_efficiency"] == [1.0, 0.8]
    assert f["learner_in_system_vs_bare"] == [0.8, 0.92]
    assert f["updates_per_s_b512_sync"] is None  # that step left no result: None, the rest still reported
    assert f["solve_s_distributed"] == {0: 20.0, 1: 30.0} and f["solve_s_single"] == {0: 50.0, 1: None}
    assert f["median_solve_s_distributed"] == 25.0 and f["speedup_vs_single"] == pytest.approx(2.0)
    assert t["scaling_efficiency_at_8_actors"]["met"] and t["learner_in_system_vs_bare_at_8_actors"]["met"]
    assert t["distributed_faster_than_single_process"]["met"]
