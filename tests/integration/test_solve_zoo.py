"""benchmarks/solve.py's checks before any run, and the zoo configs it runs (configs/<env>.yaml).

No training here: every solve.py call below stops before its first run (a refused env, a missing
SB3) or has no seeds to run (``--seeds`` with no values), so each takes seconds.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import gymnasium
import pytest
import yaml
from needs import unavailable

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


@pytest.fixture
def no_sb3(tmp_path):
    """A PYTHONPATH entry whose stable_baselines3 raises ImportError, as if the bench extra were not installed."""
    shim = tmp_path / "shim" / "stable_baselines3"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named stable_baselines3 (test shim)')\n")
    return str(shim.parent)


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
    """Each zoo config loads, names its env and gymnasium's reward_threshold as the stop, and names only
    keys of the default that it changes, each with a comment line above it (why it differs)."""
    path = ROOT / ZOO_CONFIGS[env_id]
    text = path.read_text()
    cfg = load_config(path)
    assert cfg.env.id == env_id
    assert cfg.train.stop_at_return == gymnasium.spec(env_id).reward_threshold
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
