"""Time to solve an env (MountainCar-v0 by default): apexq (distributed, and single-process) vs Stable-Baselines3.

One invocation runs, for the same seeds and the same judging protocol:
  * apexq with the env's config (`apexq train`, as a user runs it): the default config for
    MountainCar-v0, `configs/<name>.yaml` for the other envs of ``ZOO``,
  * apexq in single-process mode (`apexq train --single-process`, same config),
  * Stable-Baselines3 DQN with rl-zoo3's tuned hyperparameters for the env (the `bench` extra).

Protocol for all three: a 100-episode greedy evaluation (apexq's vector-env evaluator, seeds no
actor uses, the same 100 starts each time) every `--eval-every` seconds of training (default 5 s;
15 s for LunarLander-v3, whose evaluations take seconds); an evaluation with mean >= the env's
threshold (gymnasium's reward_threshold, -110 for MountainCar-v0) is confirmed on 100 other
episodes (apexq's `eval.confirm_episodes`), and if those fall short training goes on; time to
solve = seconds from launch to the first confirmed evaluation, evaluation time excluded, start-up
included; then the final policy (the solving weights) is evaluated on 100 fresh episodes (another
seed range), and holds if those reach the threshold. Both systems stop at the same return: the
threshold, or the env config's higher `train.stop_at_return` (a margin, so that the policy it stops
with holds on fresh episodes; LunarLander-v3's 220), or `--stop-at`. Prints a table, then one JSON
line.
Launch is the start of each system's own process (`apexq train`, or a fresh Python process for
SB3), so the imports of torch and the rest count for all three.
"""

from __future__ import annotations

import time

PROCESS_START = time.monotonic()  # an SB3 worker's launch: its imports count, as apexq's do

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FINAL_SEED = 777
INSTALL_BENCH = "pip install -e '.[bench]'"


@dataclass(frozen=True)
class ZooEnv:
    """How solve.py runs one env: apexq's config overlay (None: the default config) and default budgets."""

    config: Optional[str]
    budget: float  # apexq's training seconds per run
    sb3_budget: float  # SB3's training seconds per run (it also stops at the zoo's n_timesteps)
    needs: tuple = ()  # (module, apexq extra) the env needs beyond gymnasium's classic control
    eval_every: float = 5.0  # seconds between evaluations (--eval-every overrides)


ZOO = {
    # rl-zoo's 120k steps took ~330 s on this 2-core machine
    "MountainCar-v0": ZooEnv(None, budget=150.0, sb3_budget=420.0),
    "CartPole-v1": ZooEnv("configs/cartpole.yaml", budget=150.0, sb3_budget=420.0),
    "Acrobot-v1": ZooEnv("configs/acrobot.yaml", budget=240.0, sb3_budget=600.0),
    # needs Box2D; an evaluation (100 episodes of up to 1,000 steps) takes seconds, so every 15 s
    "LunarLander-v3": ZooEnv(
        "configs/lunarlander.yaml", budget=900.0, sb3_budget=900.0, needs=("Box2D", "box2d"), eval_every=15.0
    ),
}
# the zoo's dqn.yml keys that DQN(...) takes as they are; any other key (normalize, frame_stack,
# env_wrapper, n_envs, ...) would change the env or the policy and is refused rather than dropped
SB3_DQN_KEYS = {
    "learning_rate",
    "batch_size",
    "buffer_size",
    "learning_starts",
    "gamma",
    "target_update_interval",
    "train_freq",
    "gradient_steps",
    "exploration_fraction",
    "exploration_initial_eps",
    "exploration_final_eps",
    "max_grad_norm",
    "tau",
}


def fail(message: str) -> NoReturn:
    """One line on stderr, exit status 2: a setup problem, found before any run starts."""
    print(f"solve.py: {message}", file=sys.stderr)
    sys.exit(2)


def threshold_of(env_id: str) -> float:
    """The return that counts as solved: gymnasium's reward_threshold for the env."""
    import gymnasium

    threshold = gymnasium.spec(env_id).reward_threshold
    if threshold is None:
        fail(f"{env_id} has no reward_threshold in gymnasium's registry")
    return float(threshold)


def stop_at_of(zoo_env: ZooEnv, threshold: float) -> float:
    """The return runs stop at: the env config's ``train.stop_at_return`` when it sets one above the
    threshold (a margin), else the threshold."""
    from apexq.cluster.config import ConfigError, load_config

    try:
        stop = load_config(str(ROOT / zoo_env.config) if zoo_env.config else None).train.stop_at_return
    except ConfigError as exc:
        fail(str(exc))
    return threshold if stop is None else max(threshold, float(stop))


def sb3_missing() -> Optional[str]:
    """Why the SB3 baseline cannot run here (one line), or None when stable_baselines3 and rl_zoo3 are there."""
    import importlib.util

    try:
        import stable_baselines3  # noqa: F401
    except ImportError as exc:
        return f"the SB3 baseline needs the bench extra ({exc}): {INSTALL_BENCH}, or pass --skip-sb3"
    if importlib.util.find_spec("rl_zoo3") is None:
        return (
            f"the SB3 baseline needs the bench extra (no module named 'rl_zoo3'): {INSTALL_BENCH}, or pass --skip-sb3"
        )
    return None


def run_apexq(
    env_id: str,
    stop_at: float,
    seed: int,
    budget: float,
    eval_every: float,
    single: bool,
    workdir: Path,
    overrides=(),
) -> dict:
    run_dir = workdir / f"apexq-{'single' if single else 'dist'}-{seed}"
    config = ZOO[env_id].config
    cmd = [
        sys.executable,
        "-m",
        "apexq.cluster.cli",
        "train",
        *(["--config", str(ROOT / config)] if config else []),
        "--run-dir",
        str(run_dir),
        "--set",
        f"seed={seed}",
        "--set",
        f"train.max_seconds={budget}",
        "--set",
        f"train.stop_at_return={stop_at}",
        "--set",
        f"eval.every_seconds={eval_every}",
        "--set",
        "metrics.port=0",
    ]
    for o in overrides:
        cmd += ["--set", o]
    if single:
        cmd.append("--single-process")
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget + 240)
    wall = time.monotonic() - t0
    m = re.search(r"platform ready in ([0-9.]+)s|ready in ([0-9.]+)s", proc.stdout)
    startup = float(next(g for g in m.groups() if g)) if m else None
    records = (
        [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
        if (run_dir / "metrics.jsonl").exists()
        else []
    )
    # the run's own judgement: an evaluation >= stop_at that eval.confirm_episodes other episodes confirmed
    solve = next((r for r in records if r.get("solved") is True), None)
    out = {
        "seed": seed,
        "exit": proc.returncode,
        "wall_s": round(wall, 1),
        "startup_s": startup,
        "solve_s": round(solve["time_s"] - solve.get("eval_time_s", 0.0), 1) if solve else None,
        "solve_env_steps": solve["env_steps"] if solve else None,
    }
    # where the time to solve goes: launch -> first update (start-up, then filling the replay to
    # replay.min_size_to_sample), then the updates needed at the learner's rate
    first = next((r for r in records if r.get("first_update_s") is not None), None)
    out["first_update_s"] = round(first["first_update_s"], 1) if first else None
    if solve and first and solve.get("updates"):
        out["solve_updates"] = int(solve["updates"])
        learning = solve["time_s"] - solve.get("eval_time_s", 0.0) - first["first_update_s"]
        out["updates_per_s"] = round(solve["updates"] / learning, 1) if learning > 0 else None
    else:
        out["solve_updates"] = out["updates_per_s"] = None
    ev = subprocess.run(
        [
            sys.executable,
            "-m",
            "apexq.cluster.cli",
            "evaluate",
            str(run_dir),
            "--episodes",
            "100",
            "--seed",
            str(FINAL_SEED),
            "--json",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    out["final_return"] = json.loads(ev.stdout.strip().splitlines()[-1])["mean"] if ev.returncode == 0 else None
    if proc.returncode != 0:
        out["error"] = (proc.stderr or proc.stdout)[-500:]
    return out


def parse_dict_call(text: str) -> dict:
    """``"dict(net_arch=[256, 256])"`` -> ``{"net_arch": [256, 256]}`` without eval: literals only."""
    import ast

    node = ast.parse(text, mode="eval").body
    if not (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "dict" and not node.args):
        raise ValueError(f"unsupported policy_kwargs {text!r}")
    return {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}


def run_sb3(env_id: str, seed: int, budget: float, eval_every: float, stop_at: float) -> dict:
    """One SB3 run in a fresh process, so that its clock starts at launch as apexq's does."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--env",
        env_id,
        "--sb3-worker",
        str(seed),
        "--sb3-budget",
        str(budget),
        "--eval-every",
        str(eval_every),
        "--stop-at",
        str(stop_at),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget + 600)
    if proc.returncode != 0:
        return {
            "seed": seed,
            "solve_s": None,
            "solve_env_steps": None,
            "final_return": None,
            "error": (proc.stderr or proc.stdout)[-500:],
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def zoo_hyperparameters(env_id: str) -> tuple[int, dict, dict]:
    """rl-zoo3's DQN settings for ``env_id``: (n_timesteps, DQN keyword arguments, policy_kwargs).

    Read from the zoo's hyperparams/dqn.yml without importing rl_zoo3 (and all it imports).
    """
    import importlib.util

    import yaml

    zoo = importlib.util.find_spec("rl_zoo3")
    if zoo is None or not zoo.submodule_search_locations:
        fail(f"rl_zoo3 is not installed: {INSTALL_BENCH}")
    hp_file = Path(list(zoo.submodule_search_locations)[0]) / "hyperparams" / "dqn.yml"
    table = yaml.safe_load(hp_file.read_text())
    if env_id not in table:
        fail(f"{hp_file} has no DQN hyperparameters for {env_id}")
    hp = dict(table[env_id])
    n_timesteps = int(float(hp.pop("n_timesteps")))  # the schedule (exploration_fraction) depends on it
    if hp.pop("policy", "MlpPolicy") != "MlpPolicy":
        fail(f"rl-zoo3's {env_id} DQN uses a policy other than MlpPolicy; solve.py runs MlpPolicy only")
    pk = hp.pop("policy_kwargs", None)
    policy_kwargs = parse_dict_call(pk) if isinstance(pk, str) else (pk or {})  # the zoo stores it as a str
    unknown = sorted(set(hp) - SB3_DQN_KEYS)
    if unknown:
        fail(f"rl-zoo3's {env_id} DQN settings use {', '.join(unknown)}, which solve.py does not apply")
    return n_timesteps, hp, policy_kwargs


def sb3_worker(env_id: str, stop_at: float, seed: int, budget: float, eval_every: float) -> dict:
    """SB3 DQN with rl-zoo3's hyperparameters, judged by the same evaluator on the same schedule.

    Time counts from this process's start (``PROCESS_START``): torch's and SB3's imports are
    part of SB3's start-up as torch's import in the learner is part of apexq's.
    """
    import gymnasium as gym
    import numpy as np
    import torch
    from stable_baselines3 import DQN
    from stable_baselines3.common.callbacks import BaseCallback

    from apexq.cluster.evaluate import CONFIRM_FIRST_EPISODE, evaluate

    t_launch = PROCESS_START
    torch.set_num_threads(1)
    n_timesteps, hp, policy_kwargs = zoo_hyperparameters(env_id)

    class Greedy(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, obs):
            return self.model.q_net(obs)

    state = {"eval_time": 0.0, "next_eval": time.monotonic() + eval_every, "solve": None}

    class Judge(BaseCallback):
        def _on_step(self) -> bool:
            now = time.monotonic()
            if now >= state["next_eval"]:
                t, before = time.monotonic(), state["eval_time"]
                greedy = Greedy(self.model.policy)
                with torch.no_grad():
                    mean = float(np.mean(evaluate(greedy, env_id, 100, seed=seed)))
                    # confirmed on 100 other episodes, as apexq's eval.confirm_episodes does
                    if mean >= stop_at:
                        other = evaluate(greedy, env_id, 100, seed=seed, first_episode=CONFIRM_FIRST_EPISODE)
                        mean = float(np.mean(other))
                state["eval_time"] += time.monotonic() - t
                state["next_eval"] = time.monotonic() + eval_every
                if mean >= stop_at:
                    # launch to this evaluation, earlier evaluations excluded
                    state["solve"] = (t - t_launch - before, self.num_timesteps)
                    return False
            return now - t_launch - state["eval_time"] < budget

    model = DQN("MlpPolicy", gym.make(env_id), seed=seed, policy_kwargs=policy_kwargs, verbose=0, device="cpu", **hp)
    model.learn(total_timesteps=n_timesteps, callback=Judge())
    with torch.no_grad():
        final = float(np.mean(evaluate(Greedy(model.policy), env_id, 100, seed=FINAL_SEED)))
    solve = state["solve"]
    return {
        "seed": seed,
        "solve_s": round(solve[0], 1) if solve else None,
        "solve_env_steps": solve[1] if solve else None,
        "final_return": final,
        "hyperparameters": hp,
    }


def median_or_none(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one seed each")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument(
        "--env",
        default="MountainCar-v0",
        metavar="ID",
        help=f"the env to solve, one of {', '.join(ZOO)} (default MountainCar-v0)",
    )
    ap.add_argument(
        "--budget",
        type=float,
        help="training seconds per apexq run before giving up (default: the env's, e.g. 150 for MountainCar-v0)",
    )
    ap.add_argument(
        "--eval-every", type=float, help="seconds between evaluations (default: the env's, 5 for MountainCar-v0)"
    )
    ap.add_argument(
        "--stop-at",
        type=float,
        metavar="RETURN",
        help="the return both systems stop at (default: the env config's train.stop_at_return, at least the threshold)",
    )
    ap.add_argument("--skip-sb3", action="store_true")
    ap.add_argument(
        "--sb3-budget",
        type=float,
        help="training seconds per SB3 run (default: the env's, e.g. 420 for MountainCar-v0)",
    )
    ap.add_argument(
        "--only",
        choices=["apexq", "single", "sb3"],
        action="append",
        help="run only these systems (repeatable); default all three",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="KEY=VALUE",
        help="config overrides for the apexq runs (both modes), e.g. actors.num=8 learner.device=cuda",
    )
    ap.add_argument("--sb3-worker", type=int, metavar="SEED", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.env not in ZOO:
        fail(f"--env {args.env!r} is not one of {', '.join(ZOO)}")
    env_id, zoo_env = args.env, ZOO[args.env]
    budget = zoo_env.budget if args.budget is None else args.budget
    sb3_budget = zoo_env.sb3_budget if args.sb3_budget is None else args.sb3_budget
    threshold = threshold_of(env_id)
    stop_at = stop_at_of(zoo_env, threshold) if args.stop_at is None else args.stop_at
    if stop_at < threshold:
        fail(f"--stop-at {stop_at:g} is below {env_id}'s threshold {threshold:g}: the run would stop unsolved")
    if args.eval_every is None:
        args.eval_every = zoo_env.eval_every
    if args.sb3_worker is not None:
        print(json.dumps(sb3_worker(env_id, stop_at, args.sb3_worker, sb3_budget, args.eval_every)))
        return
    seeds = args.seeds[:1] if args.quick else args.seeds
    only = set(args.only or ["apexq", "single", "sb3"])
    if args.skip_sb3:
        only.discard("sb3")
    if zoo_env.needs:
        import importlib

        module, extra = zoo_env.needs
        try:
            importlib.import_module(module)
        except ImportError:
            fail(f"--env {env_id} needs {module}, which is not installed: pip install -e '.[{extra}]'")
    if "sb3" in only:  # before any run: a missing baseline must not surface as `speedup: null` an hour later
        missing = sb3_missing()
        if missing:
            fail(missing)
    work = Path(tempfile.mkdtemp(prefix="apexq-solve-"))
    results: dict = {"apexq": [], "single": [], "sb3": []}
    for s in seeds:
        if "apexq" in only:
            results["apexq"].append(run_apexq(env_id, stop_at, s, budget, args.eval_every, False, work, args.overrides))
            print("apexq", results["apexq"][-1], flush=True)
        if "single" in only:
            results["single"].append(run_apexq(env_id, stop_at, s, budget, args.eval_every, True, work, args.overrides))
            print("single-process", results["single"][-1], flush=True)
        if "sb3" in only:
            results["sb3"].append(run_sb3(env_id, s, sb3_budget, args.eval_every, stop_at))
            print("sb3", {k: v for k, v in results["sb3"][-1].items() if k != "hyperparameters"}, flush=True)

    def solved(rs):
        return sum(1 for r in rs if r["solve_s"] is not None)

    def holds(rs):
        return sum(1 for r in rs if r.get("final_return") is not None and r["final_return"] >= threshold)

    margin = f"; runs stop at {stop_at:g} (confirmed), a margin above it" if stop_at > threshold else ""
    print(f"\n{env_id}: solved at a mean of {threshold:g} over 100 greedy episodes{margin}")
    print(
        f"{'system':<16}{'seed':>5}{'solve s':>9}{'steps':>9}{'final100':>10}{'startup s':>10}"
        f"{'1st upd s':>10}{'updates':>9}{'upd/s':>8}"
    )
    for name, rs in (
        ("apexq", results["apexq"]),
        ("apexq single", results["single"]),
        ("sb3 (rl-zoo)", results["sb3"]),
    ):
        for r in rs:
            print(
                f"{name:<16}{r['seed']:>5}{str(r['solve_s']):>9}{str(r['solve_env_steps']):>9}"
                f"{str(None if r.get('final_return') is None else round(r['final_return'], 1)):>10}"
                f"{str(r.get('startup_s')):>10}{str(r.get('first_update_s', '-')):>10}"
                f"{str(r.get('solve_updates', '-')):>9}{str(r.get('updates_per_s', '-')):>8}"
            )
    a_med = median_or_none([r["solve_s"] for r in results["apexq"]])
    s_med = median_or_none([r["solve_s"] for r in results["single"]])
    b_med = median_or_none([r["solve_s"] for r in results["sb3"]])
    figures = {
        "env": env_id,
        "threshold": threshold,
        "stop_at": stop_at,
        "apexq_median_solve_s": a_med,
        "apexq_single_median_solve_s": s_med,
        "sb3_median_solve_s": b_med,
        "speedup": round(b_med / a_med, 2) if a_med and b_med else None,
        "speedup_vs_single": round(s_med / a_med, 2) if a_med and s_med else None,
        "apexq_solved_seeds": solved(results["apexq"]),
        "sb3_solved_seeds": solved(results["sb3"]),
        "single_solved_seeds": solved(results["single"]),
        "apexq_final_returns": [r.get("final_return") for r in results["apexq"]],
        "sb3_final_returns": [r.get("final_return") for r in results["sb3"]],
        "single_final_returns": [r.get("final_return") for r in results["single"]],
        "apexq_startup_s": [r.get("startup_s") for r in results["apexq"]],
        # the bound on the time to solve: first update + updates needed / updates per second
        "apexq_first_update_s": [r.get("first_update_s") for r in results["apexq"]],
        "apexq_solve_updates": [r.get("solve_updates") for r in results["apexq"]],
        "apexq_updates_per_s": [r.get("updates_per_s") for r in results["apexq"]],
        "single_first_update_s": [r.get("first_update_s") for r in results["single"]],
        "single_solve_updates": [r.get("solve_updates") for r in results["single"]],
        "single_updates_per_s": [r.get("updates_per_s") for r in results["single"]],
        "seeds": seeds,
        "overrides": args.overrides,
    }
    n = len(seeds)
    targets = {
        "apexq_solved_seeds": {
            "target": f"{n} of {n}",
            "met": figures["apexq_solved_seeds"] == n and holds(results["apexq"]) == n,
        },
        "speedup": {"target": ">= 5x SB3 median", "met": bool(figures["speedup"] and figures["speedup"] >= 5)},
        "speedup_vs_single": {
            "target": "> 1 (distributed faster than single-process)",
            "met": bool(figures["speedup_vs_single"] and figures["speedup_vs_single"] > 1),
        },
    }
    print(json.dumps({"benchmark": "solve", "figures": figures, "targets": targets}))


if __name__ == "__main__":
    main()
