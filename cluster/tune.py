"""``apexq tune``: search any config keys for the configuration that solves fastest.

    apexq tune --config BASE.yaml --space SPACE.yaml --trials N [--seeds K] [--budget S] [--id NAME]
               [--distributed] [--start-at OVERLAY.yaml ...] [--grace S] [--resume]

A trial draws a value for each key of SPACE.yaml (format: :mod:`.tune_space`, example:
configs/tune/mountaincar_space.yaml) and runs ``apexq train --single-process`` (``apexq train``
with ``--distributed``) on BASE.yaml with those values, once per seed 0 .. K-1, each run with
``train.max_seconds`` = S (:mod:`.tune_trial`).
Its objective (:mod:`.tune_objective`) is what a user waits for: the median over the seeds of the
seconds from launch to a greedy evaluation reaching BASE's ``train.stop_at_return`` (and
confirmed on ``eval.confirm_episodes`` other episodes), unsolved runs counted at S, ties broken
by the final evaluation return.

Why Optuna's TPE (through Tune's ``OptunaSearch``): each trial costs minutes, so the search gets a
handful of them, and TPE is sample-efficient there: after a few random trials it models which
values the good trials had and draws near them, and it takes log-scaled ranges, integers and
categorical choices as they are (no encoding, no Gaussian-process fitting to tune itself).
Why ASHA (``ASHAScheduler``): most drawn configurations are hopeless, and a trial reports after
every evaluation, so ASHA compares trials at the same amount of run time (rungs at a quarter of a
seed's budget, then x3) and stops those below the best third there. It is asynchronous: a trial
is judged the moment it reaches a rung, against the trials that got there before, so it needs no
fixed number of rungs or brackets filled in lock-step and works with one trial at a time. A
stopped trial still has an objective (its runs not made count at the budget), which Optuna learns from.
``--grace S`` moves the first rung (Tune's ``grace_period``): an env whose early returns say
little (LunarLander's are negative for the first minutes of every config) needs a later one;
``--grace`` = seeds x budget turns early stopping off.

``--start-at FILE`` (Tune's ``points_to_evaluate``, Optuna's enqueued trials): the first trials
run the searched keys' values from FILE, a config overlay read over BASE (a hand-set config, or
an earlier search's best.yaml), before TPE draws; TPE then models them with the rest. Without it,
a search may never draw near a config already known to be good: 12 TPE trials over
configs/tune/cartpole_space2.yaml did not (41.2 s at best, configs/cartpole.yaml 20.6 s).
The sampler's seed is --id's CRC-32: the same id draws the same trials, another id others (with
one fixed seed, a search started at an earlier search's best drew that search's first trials
again: LunarLander's ll2 re-ran ll1's trial 1, its own start point).

What a distributed run inherits from these single-process trials: the hyperparameters (learning
rate, batch size, n-step, target period, replay ratio ...) and their balance, which is what the
rate limiter (``replay.samples_per_insert``) keeps the same in both modes. Not the throughput: a
distributed run steps more environments per second, so its time to solve differs; settings that
only change throughput (``actors.num`` and the like) are best measured with the distributed run.
Nor the ranking, always: on CartPole the best single-process trial of a search (median 6.6 s
single-process) took 32.6 s distributed, against 15.8 s for a config that took 31.6 s
single-process. ``--distributed`` runs the trials as users run ``apexq train`` (each run starts
a private local Ray, its first update 4-8 s later) and ranks configs by that.

Trials run one at a time by default (``--cpus-per-trial`` = all CPUs): the objective is wall
time, which trials sharing the machine would distort. Everything lands in ``tune/<id>/``: the
table's ``trials.csv``, ``best.yaml`` (an overlay of the searched keys), ``objective.png``,
``runs/<trial>/seed<i>/`` (each run's directory), copies of BASE and SPACE, and Tune's own state
(``ray/``, written by Tune, never read by apexq). ``--resume --id NAME`` continues an interrupted
search from its ``trials.csv`` (:mod:`.tune_search` says how).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import shlex
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .config import ConfigError, load_config
from .tune_space import load_space, load_start_point
from .tune_trial import TrialSettings

INSTALL_HINT = 'apexq tune needs the tune extra: pip install "apexq[tune]"'
ROOT = Path("tune")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
DEFAULT_SEEDS = 3


class TuneError(Exception):
    """Something the user can fix; one line, exit status 2."""


def add_arguments(p) -> None:
    p.add_argument("--config", help="the base config (YAML overlay); must set train.stop_at_return")
    p.add_argument("--space", help="the search space (YAML; see configs/tune/mountaincar_space.yaml)")
    p.add_argument("--trials", type=int, metavar="N", help="how many configurations to try")
    p.add_argument(
        "--seeds",
        type=int,
        metavar="K",
        help=f"runs per trial, seeds 0..K-1; the objective is their median (default {DEFAULT_SEEDS})",
    )
    p.add_argument(
        "--budget",
        type=float,
        metavar="S",
        help="seconds each run may take (train.max_seconds; default: the base config's)",
    )
    p.add_argument("--id", help="the search's name: its folder is tune/<id> (default: a new timestamped id)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted search --id")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="run each seed as plain `apexq train` runs (a private local Ray with actors, shards and "
        "learner in processes of their own) instead of --single-process: its first update 4-8 s later, "
        "but it ranks configs by the mode users run (the two modes can rank them differently)",
    )
    p.add_argument(
        "--start-at",
        action="append",
        metavar="OVERLAY",
        help="a config overlay over --config (e.g. a hand-set config or an earlier best.yaml) whose "
        "values of the searched keys the first trial runs before the sampler draws; repeat for more",
    )
    p.add_argument(
        "--grace",
        type=float,
        metavar="S",
        help="seconds of a trial's runs before early stopping may end it, ASHA's first rung "
        "(default: a quarter of --budget)",
    )
    p.add_argument(
        "--cpus-per-trial",
        type=float,
        metavar="C",
        help="CPUs Ray gives each trial (default: all of this machine's, so one trial at a time)",
    )


@dataclass
class Search:
    """A search's settings, as tune/<id>/search.json keeps them for --resume."""

    trials: int
    seeds: int
    budget_s: float
    target: float
    command: str
    distributed: bool = False  # (absent from the search.json of a search before --distributed)
    start_at: list = field(default_factory=list)  # --start-at: {key: drawn} per start point, run first
    grace_s: Optional[float] = None  # --grace; None: budget_s / 4
    sampler_seed: int = 0  # the TPE sampler's seed, from --id (0 in a search.json from before it was kept)

    @property
    def grace(self) -> float:
        return self.grace_s if self.grace_s is not None else self.budget_s / 4

    def settings(self, folder: Path, params) -> TrialSettings:
        return TrialSettings(
            str((folder / "base.yaml").resolve()),
            tuple(params),
            self.seeds,
            self.budget_s,
            self.target,
            str((folder / "runs").resolve()),
            self.distributed,
        )


def _positive(name: str, value, integer: bool = True) -> None:
    if value is not None and not value > 0:
        raise TuneError(f"--{name}: must be {'>= 1' if integer else '> 0'}, got {value:g}")


def _read_text(path: str, flag: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TuneError(f"{flag} {path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None


def _new_search(args, folder: Path) -> tuple[Search, list]:
    for flag in ("config", "space", "trials"):
        if getattr(args, flag) is None:
            raise TuneError(f"--{flag}: needed to start a search (or continue one with --id NAME --resume)")
    if (folder / "search.json").exists():
        raise TuneError(f"--id {args.id}: {folder} already holds a search; add --resume to continue it")
    base = load_config(args.config)
    if base.train.stop_at_return is None:
        raise TuneError(
            f"--config {args.config}: train.stop_at_return is not set; the objective is the time to "
            f"reach it, so set the return that counts as solved (e.g. -110 for MountainCar)"
        )
    if base.replay.external:
        raise TuneError(
            f"--config {args.config}: replay.external is true; every run of a trial needs a replay of "
            f"its own (its shards in the process, or its own Redis with --distributed)"
        )
    budget = args.budget if args.budget is not None else base.train.max_seconds
    if budget is None:
        raise TuneError(
            f"--budget: give the seconds each run may take (--config {args.config} sets no train.max_seconds)"
        )
    _positive("budget", budget, integer=False)
    params = load_space(args.space, args.config)
    seeds = args.seeds if args.seeds is not None else DEFAULT_SEEDS
    starts = [load_start_point(path, params, args.config) for path in args.start_at or []]
    if len(starts) > args.trials:
        raise TuneError(
            f"--start-at: {len(starts)} start points but --trials {args.trials}; give at least as many trials"
        )
    if args.grace is not None and args.grace > seeds * budget:
        raise TuneError(
            f"--grace: at most --seeds x --budget ({seeds * budget:g} s, which turns early stopping off), "
            f"got {args.grace:g}"
        )
    command = " ".join(
        [
            "apexq tune",
            "--config",
            shlex.quote(args.config),
            "--space",
            shlex.quote(args.space),
            f"--trials {args.trials} --seeds {seeds} --budget {budget:g} --id {args.id}",
            *(["--distributed"] if args.distributed else []),
            *[f"--start-at {shlex.quote(path)}" for path in args.start_at or []],
            *([f"--grace {args.grace:g}"] if args.grace is not None else []),
        ]
    )
    target = float(base.train.stop_at_return)
    grace = float(args.grace) if args.grace is not None else None
    seed = zlib.crc32(args.id.encode())
    search = Search(args.trials, seeds, float(budget), target, command, bool(args.distributed), starts, grace, seed)
    return search, params


def _record(args, folder: Path, search: Search) -> None:
    """What --resume reads: the settings, and copies of the base config and space the trials use."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.config, folder / "base.yaml")
    shutil.copyfile(args.space, folder / "space.yaml")
    (folder / "search.json").write_text(json.dumps(search.__dict__, indent=1) + "\n")


def _resumed_search(args, folder: Path) -> tuple[Search, list]:
    if not (folder / "search.json").is_file():
        raise TuneError(f"--resume: {folder} holds no search (no search.json)")
    search = Search(**json.loads((folder / "search.json").read_text()))
    for flag, given, kept in (
        ("trials", args.trials, search.trials),
        ("seeds", args.seeds, search.seeds),
        ("budget", args.budget, search.budget_s),
        ("grace", args.grace, search.grace),
    ):
        if given is not None and given != kept:
            raise TuneError(f"--resume: this search runs with --{flag} {kept:g}; leave --{flag} out or give that")
    if args.start_at:
        raise TuneError("--resume: --start-at is given when a search starts; the search runs its own start points")
    for flag, path, copy in (("config", args.config, "base.yaml"), ("space", args.space, "space.yaml")):
        if path is not None and _read_text(path, f"--{flag}") != (folder / copy).read_text(encoding="utf-8"):
            raise TuneError(
                f"--resume: --{flag} {path} differs from the one this search started with "
                f"({folder / copy}); leave --{flag} out"
            )
    return search, load_space(folder / "space.yaml", str(folder / "base.yaml"))


def _remove_unfinished_runs(runs: Path, finished: set) -> None:
    """The runs of trials an interrupted search did not finish (they are not in trials.csv): a
    resumed search draws new trials in their place."""
    if runs.is_dir():
        for trial in runs.iterdir():
            if trial.is_dir() and trial.name not in finished:
                shutil.rmtree(trial)


def _check_installed() -> None:
    try:
        for module in ("optuna", "ray.tune", "ray.tune.search.optuna"):
            importlib.import_module(module)
    except ImportError as exc:
        raise TuneError(f"{INSTALL_HINT} ({exc})") from None


def run(args) -> int:
    """The whole command; every check that can fail with one line runs before Ray starts."""
    _positive("trials", args.trials)
    _positive("seeds", args.seeds)
    _positive("cpus-per-trial", args.cpus_per_trial, integer=False)
    _positive("grace", args.grace, integer=False)
    if args.id is not None and not NAME.fullmatch(args.id):
        raise TuneError(f"--id: a folder name of letters, digits, '.', '_' and '-', got {args.id!r}")
    if args.id is None:
        if args.resume:
            raise TuneError("--resume: name the search to continue with --id NAME (its folder is tune/NAME)")
        from .run_dir import new_run_id

        args.id = new_run_id()
    folder = ROOT / args.id
    try:
        search, params = (_resumed_search if args.resume else _new_search)(args, folder)
    except ConfigError as exc:
        raise TuneError(str(exc)) from None
    _check_installed()
    if not args.resume:
        _record(args, folder, search)
    from . import tune_search
    from .tune_report import HEADER, TrialsFileError, read_rows, rows_from_csv

    cpus = args.cpus_per_trial or float(os.cpu_count() or 1)
    ray_cpus = max(os.cpu_count() or 1, math.ceil(cpus))
    concurrent = max(1, int(ray_cpus // cpus))
    settings = search.settings(folder, params)
    try:
        before = rows_from_csv(folder / "trials.csv", settings) if args.resume else []
    except TrialsFileError as exc:
        raise TuneError(f"--resume: {exc}") from None
    if len(before) >= search.trials:
        print(f"apexq tune: search {args.id} has finished all its {search.trials} trials; nothing to resume")
        return _summary(read_rows(folder / "trials.csv"), search, folder, args.id)
    _remove_unfinished_runs(folder / "runs", {r.trial_id for r in before})
    print(
        f"apexq tune: search {args.id} in {folder} | {search.trials} trials x {search.seeds} seed(s), "
        f"{search.budget_s:g} s each | solved: eval return >= {search.target:g}, confirmed, and the final policy holds "
        f"on fresh episodes | keys: {', '.join(p.key for p in params)} | Optuna TPE + ASHA on Ray Tune "
        f"(first rung at {max(1, round(search.grace))} s), {concurrent} trial(s) at a time"
        + (f" | resuming after {len(before)} finished trial(s)" if args.resume else ""),
        flush=True,
    )
    tune_search.start_ray(ray_cpus)
    try:
        print(HEADER, flush=True)
        table = tune_search.TrialTable(
            settings, str(folder.resolve()), search.command, str(folder / "base.yaml"), before, len(search.start_at)
        )
        tuner = tune_search.new_tuner(
            settings,
            search.trials - len(before),
            cpus,
            concurrent,
            folder,
            table,
            search.start_at,
            search.grace,
            search.sampler_seed,
        )
        tuner.fit()
    finally:
        import ray

        ray.shutdown()
        # a run's TMPDIR outlives it when Ray ended its trial before the trial could remove it
        for tmp in (folder / "runs").glob("*/*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
    return _summary(read_rows(folder / "trials.csv"), search, folder, args.id)


def _summary(rows: list[dict], search: Search, folder: Path, search_id: str) -> int:
    from .tune_objective import rank_key

    states = {s: sum(r["state"] == s for r in rows) for s in ("done", "stopped early", "error")}
    counts = f"{states['done']} done, {states['stopped early']} stopped early, {states['error']} failed"
    ranked = [r for r in rows if r["state"] != "error" and r["objective_s"] is not None]
    best: Optional[dict] = min(ranked, key=lambda r: rank_key(r["objective_s"], r["final_return"]), default=None)
    if best is not None:
        ret = f"{best['final_return']:.1f}" if best["final_return"] is not None else "-"
        print(
            f"apexq tune: best: trial {best['trial']:.0f}, objective {best['objective_s']:.1f} s "
            f"({best['solved_seeds']:.0f}/{search.seeds} seeds solved, final return {ret}) | {folder / 'best.yaml'}"
            f" | {folder / 'trials.csv'} | {folder / 'objective.png'}",
            flush=True,
        )
    if len(rows) < search.trials:
        print(
            f"apexq tune: interrupted with {len(rows)} of {search.trials} trials finished ({counts}); continue "
            f"with: apexq tune --id {search_id} --resume",
            flush=True,
        )
        return 130
    print(f"apexq tune: {len(rows)} trials ({counts})", flush=True)
    if best is None:
        print("apexq tune: error: no trial finished without an error (see the table's failure lines)", flush=True)
        return 1
    return 0
