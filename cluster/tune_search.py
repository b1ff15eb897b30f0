"""Ray Tune wiring of ``apexq tune`` (needs the ``tune`` extra: ``ray[tune]``, ``optuna``).

Verified against Ray 2.60's own source: ``OptunaSearch(space={key: optuna distribution}, metric, mode,
sampler)`` draws the keys as given (dotted names stay whole: Tune nests only on "/") and tells Optuna
each finished trial's last ``score`` (a trial ASHA stopped included: its last report stands);
``ASHAScheduler(time_attr=...)`` takes any monotonic number a trial reports; ``tune.report`` raises
SystemExit in a trial that ASHA has stopped; a first SIGINT makes ``Tuner.fit`` stop the trials and return.

A resumed search does not use ``Tuner.restore``: that unpickles the experiment state Tune wrote,
and apexq never runs code from a file. It starts a new Tuner (its state under ``ray/part<k>/``,
written by Tune and never read back) from the search's own ``trials.csv``: every trial listed
there is told to the new Optuna study (``OptunaSearch.add_evaluated_point``, the same value the
finished trial told it), so TPE models them as before; the trial numbers go on from the last one;
the new Tuner runs the trials still owed. What is not carried over: the trial that was running
when the search stopped (its runs are removed; a fresh draw replaces it) and ASHA's rungs (the
new trials are compared with each other).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from .tune_objective import score
from .tune_report import Row, row_of, table_line, write_outputs
from .tune_trial import TrialSettings, run_trial

METRIC, MODE = "score", "min"  # see tune_objective.score
CLOCK = "budget_s"  # ASHA's time: seconds of the trial's runs so far (solved runs count to their solve)
EXPERIMENTS = "ray"  # tune/<id>/ray/part<k>/ holds Tune's own state of the search's k-th session (never read)
ASHA_REDUCTION = 3  # keep the best third at each rung


class TrialTable(tune.Callback):
    """One table line per finished trial, and the search's files rewritten from all finished trials."""

    def __init__(
        self, settings: TrialSettings, folder: str, command: str, base_config: str, before: list[Row], starts: int = 0
    ):
        self.settings, self.folder, self.command, self.base_config = settings, folder, command, base_config
        self.before = before  # a resumed search's trials, from its trials.csv
        self.starts = starts  # trials 1 .. starts run the --start-at points
        for row in before:
            print(self._line(row) + "  (before the resume)", flush=True)

    def _line(self, row: Row) -> str:
        return table_line(row, self.settings.seeds) + ("  (--start-at)" if row.number <= self.starts else "")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finished(trials, trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finished(trials, trial)

    def _rows(self, trials, current) -> list[Row]:
        done = [t for t in trials if t.status in ("TERMINATED", "ERROR") or t is current]
        offset = len(self.before)
        return self.before + sorted((row_of(t, self.settings, offset) for t in done), key=lambda r: r.number)

    def _finished(self, trials, trial) -> None:
        rows = self._rows(trials, trial)
        row = next(r for r in rows if r.trial_id == trial.trial_id)
        print(self._line(row), flush=True)
        failed = Path(self.settings.runs_dir) / trial.trial_id / "failed.txt"
        if row.state == "error":
            why = failed.read_text().strip() if failed.exists() else f"see {trial.local_path}"
            print(f"      trial {row.number} failed: {why}", flush=True)
        write_outputs(rows, self.settings, self.command, self.base_config, Path(self.folder))


def start_ray(num_cpus: int) -> None:
    """A private local Ray for the search (no address file, no dashboard); trials' output stays in their logs."""
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR
    )
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # Tune's newer console output prints a banner even at verbose=0
    for name in ("ray.tune", "ray.train", "ray.air"):  # a failed trial is the table's line, not a traceback
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _trainable(settings: TrialSettings, cpus_per_trial: float):
    return tune.with_resources(tune.with_parameters(run_trial, settings=settings), {"cpu": cpus_per_trial})


def new_searcher(settings: TrialSettings, total: int, before: list[Row], start_at: list, seed: int = 0) -> OptunaSearch:
    """Optuna's TPE for a search of ``total`` trials: the trials of ``before`` (a resumed search's)
    are told to its study first, and the ``start_at`` points not yet run are its first draws
    (Optuna's enqueued trials: trials 1 .. len(start_at) of the search run them)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # TPE models the good and the bad trials once it has a few; before that it draws at random. A
    # resumed search seeds its sampler anew, so its random draws do not repeat the first session's.
    sampler = optuna.samplers.TPESampler(seed=seed + len(before), n_startup_trials=max(2, min(10, total // 3)))
    searcher = OptunaSearch(
        space={p.key: p.distribution() for p in settings.params},
        metric=METRIC,
        mode=MODE,
        sampler=sampler,
        points_to_evaluate=[dict(point) for point in start_at[len(before) :]] or None,
    )
    for row in before:
        if row.state == "error" or row.objective is None:
            searcher.add_evaluated_point(row.drawn, 0.0, error=True)
        else:
            searcher.add_evaluated_point(row.drawn, score(row.objective, row.final_return))
    return searcher


def new_scheduler(settings: TrialSettings, grace_s: float) -> ASHAScheduler:
    """ASHA over the seconds of a trial's runs: no trial is judged before ``grace_s`` (by default a
    quarter of one seed's budget); rungs at ``grace_s`` x 1, 3, 9 ... (whole seconds)."""
    return ASHAScheduler(
        time_attr=CLOCK,
        metric=METRIC,
        mode=MODE,
        max_t=math.ceil(settings.seeds * settings.budget_s),
        grace_period=max(1, round(grace_s)),
        reduction_factor=ASHA_REDUCTION,
    )


def new_tuner(
    settings: TrialSettings,
    trials: int,
    cpus_per_trial: float,
    concurrent: int,
    folder: Path,
    table: TrialTable,
    start_at: list,
    grace_s: float,
    seed: int,
) -> tune.Tuner:
    """A Tuner for the ``trials`` still owed, its searcher :func:`new_searcher`'s."""
    searcher = new_searcher(settings, trials + len(table.before), table.before, start_at, seed)
    scheduler = new_scheduler(settings, grace_s)
    experiments = folder.resolve() / EXPERIMENTS
    part = 1 + sum(1 for p in experiments.glob("part*")) if experiments.is_dir() else 1
    return tune.Tuner(
        _trainable(settings, cpus_per_trial),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=trials,
            max_concurrent_trials=concurrent,
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=f"part{part}",
            storage_path=str(experiments),
            verbose=0,
            callbacks=[table],
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
