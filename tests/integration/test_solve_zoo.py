"""benchmarks/solve.py's checks before any run, and the zoo configs it runs (configs/<env>.yaml).

No training here: every solve.py call below stops before its first run (a refused env, a missing
SB3) or has no seeds to run (``--seeds`` with no values), so each takes seconds.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import gymnasium
import pytest
import yaml
from needs import unavailable
from procs import run_cli

from apexq.cluster.config import load_config

ROOT = Path(__file__).resolve().parents[2]
SOLVE = ROOT / "benchmarks" / "solve.py"
sys.path.insert(0, str(SOLVE.parent))
import solve  # noqa: E402  (benchmarks/ is no package)

ZOO_CONFIGS = {env_id: zoo.config for env_id, zoo in solve.ZOO.items() if zoo.config}


def run_solve(*args: str, pythonpath: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pythonpath, str(ROOT)) if p))
    return subprocess.run(
        [sys.executable, str(SOLVE), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def missing(tmp_path: Path, module: str) -> str:
    """A PYTHONPATH entry whose ``module`` raises ImportError, as if its extra were not installed."""
    shim = tmp_path / "shim" / module
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(f"raise ImportError('No module named {module} (test shim)')\n")
    return str(shim.parent)


@pytest.fixture
def no_sb3(tmp_path):
    return missing(tmp_path, "stable_baselines3")


def test_solve_without_sb3_stops_with_how_to_install_it(no_sb3):
    proc = run_solve("--env", "CartPole-v1", pythonpath=no_sb3)
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "pip install -e '.[bench]'" in lines[0] and "--skip-sb3" in lines[0]
    assert proc.stdout == "", "no run may start before the check"


def test_solve_skip_sb3_runs_without_it(no_sb3):
    """--skip-sb3 is the way to run without the extra: past the check, here with no seeds to run."""
    proc = run_solve("--skip-sb3", "--seeds", pythonpath=no_sb3)
    assert proc.returncode == 0, proc.stderr
    assert '"benchmark": "solve"' in proc.stdout.splitlines()[-1]
    assert '"env": "MountainCar-v0"' in proc.stdout.splitlines()[-1]
    assert json.loads(proc.stdout.splitlines()[-1])["figures"]["stop_at"] == -110.0


def test_the_stop_target_is_the_threshold_or_the_configs_margin_above_it():
    """MountainCar's default config stops nowhere: runs stop at the threshold; LunarLander's config
    stops at 220 and both systems stop there, while a policy holds at gymnasium's 200."""
    assert solve.stop_at_of(solve.ZOO["MountainCar-v0"], -110.0) == -110.0
    assert solve.stop_at_of(solve.ZOO["LunarLander-v3"], 200.0) == 220.0
    assert solve.stop_at_of(solve.ZOO["LunarLander-v3"], 230.0) == 230.0  # never below the threshold


def test_a_stop_target_below_the_threshold_is_one_line(no_sb3):
    proc = run_solve("--env", "CartPole-v1", "--stop-at", "400", "--skip-sb3", "--seeds", pythonpath=no_sb3)
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr.strip().splitlines() == [
        "solve.py: --stop-at 400 is below CartPole-v1's threshold 475: the run would stop unsolved"
    ], proc.stderr


def test_solve_refuses_an_env_it_has_no_config_for():
    proc = run_solve("--env", "Pendulum-v1", "--skip-sb3")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"solve.py: --env 'Pendulum-v1' is not one of {', '.join(solve.ZOO)}"
    ], proc.stderr
    assert proc.stdout == ""


def test_rl_zoo_hyperparameters_of_every_env_apply_to_sb3_dqn():
    """Every key rl-zoo3 sets for a zoo env is one solve.py passes to DQN (others would be refused)."""
    # found, not imported: importing rl_zoo3 patches gymnasium's TimeLimit for the whole process (its
    # gym_patches), which changed MountainCar's truncation in later tests; solve.py reads the file alone
    if importlib.util.find_spec("rl_zoo3") is None:  # in the test extra: CI must have it
        unavailable("rl_zoo3 is not installed (pip install -e '.[test]')")
    for env_id in solve.ZOO:
        n_timesteps, hp, policy_kwargs = solve.zoo_hyperparameters(env_id)
        assert n_timesteps > 0 and set(hp) <= solve.SB3_DQN_KEYS and "net_arch" in policy_kwargs, env_id


def leaf_keys(data, prefix=""):
    out = set()
    for k, v in data.items():
        key = f"{prefix}{k}"
        out |= leaf_keys(v, key + ".") if isinstance(v, dict) else {key}
    return out


def value(data, key):
    for part in key.split("."):
        data = data[part]
    return data


@pytest.mark.parametrize("env_id", sorted(ZOO_CONFIGS))
def test_zoo_config_is_an_overlay_that_stops_at_the_threshold(env_id):
    """Each zoo config loads, names its env and stops at gymnasium's reward_threshold or at most 10% of
    the threshold above it (a margin; solve.py then stops both systems there), and names only keys of
    the default that it changes, each with a comment line above it (why it differs)."""
    path = ROOT / ZOO_CONFIGS[env_id]
    text = path.read_text()
    cfg = load_config(path)
    assert cfg.env.id == env_id
    threshold = gymnasium.spec(env_id).reward_threshold
    assert threshold <= cfg.train.stop_at_return <= threshold + abs(threshold) / 10
    assert solve.stop_at_of(solve.ZOO[env_id], threshold) == cfg.train.stop_at_return
    assert cfg.eval.episodes == 100, "solved means a mean over 100 greedy episodes"
    default = load_config().to_dict()
    loaded = cfg.to_dict()
    named = leaf_keys(yaml.safe_load(text))
    assert named <= leaf_keys(default), named - leaf_keys(default)
    same = [k for k in named if value(loaded, k) == value(default, k)]
    assert not same, f"keys set to their default value: {same}"
    for key in leaf_keys(default) - named:
        assert value(loaded, key) == value(default, key), key
    lines = text.splitlines()
    undocumented = [
        m.group(1)
        for i, line in enumerate(lines)
        if (m := re.match(r"^\s*([A-Za-z_]\w*):\s*\S", line)) and not lines[i - 1].strip().startswith("#")
    ]
    assert not undocumented, f"keys without a comment line above them: {undocumented}"
    assert "benchmarks/solve.py --env " + env_id in " ".join(text.split()), "the header says how it is measured"


# -- LunarLander-v3: Box2D is an extra ---------------------------------------------------------------


@pytest.fixture
def no_box2d(tmp_path):
    return missing(tmp_path, "Box2D")


def run_apexq(*args: str, pythonpath: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    return run_cli(*args, env={"PYTHONPATH": os.pathsep.join(p for p in (pythonpath, str(ROOT)) if p)}, timeout=timeout)


def test_lunarlander_without_box2d_is_one_line_naming_the_extra(no_box2d, tmp_path):
    proc = run_solve("--env", "LunarLander-v3", "--skip-sb3", pythonpath=no_box2d)
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr.strip().splitlines() == [
        "solve.py: --env LunarLander-v3 needs Box2D, which is not installed: pip install -e '.[box2d]'"
    ]
    proc = run_apexq(
        "train",
        "--single-process",
        "--config",
        "configs/lunarlander.yaml",
        "--run-dir",
        str(tmp_path / "run"),
        pythonpath=no_box2d,
    )
    assert proc.returncode == 2, proc
    assert proc.stderr.strip().splitlines() == [
        "apexq: error: env.id: 'LunarLander-v3' needs a package that is not installed: pip install 'apexq[box2d]'"
    ], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_the_lunarlander_config_trains_and_evaluates(tmp_path):
    """The zoo config as a user runs it (briefly): Box2D steps, the learner updates, an evaluation lands."""
    if importlib.util.find_spec("Box2D") is None:  # in the test extra: CI must have it
        unavailable("Box2D is not installed (pip install -e '.[test]')")
    run = tmp_path / "run"
    sets = ["train.max_seconds=12", "replay.min_size_to_sample=500", "eval.every_seconds=4", "eval.episodes=5"]
    proc = run_apexq(
        "train",
        "--single-process",
        "--config",
        "configs/lunarlander.yaml",
        "--run-dir",
        str(run),
        *[a for s in sets for a in ("--set", s)],
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = records[-1]
    assert last["env_steps"] > 500 and last["updates"] > 0 and last["eval_return"] is not None, last
    assert -1e4 < last["eval_return"] < 400  # LunarLander's returns, not MountainCar's -200 floor
    assert (run / "policy.json").is_file()
