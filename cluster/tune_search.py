"""Ray Tune wiring of ``apexq tune`` (needs the ``tune`` extra: ``ray[tune]``, ``optuna``).

Verified against Ray 2.60's own source: ``OptunaSearch(space={key: optuna distribution}, metric, mode,
sampler)`` draws the keys as given (dotted names stay whole: Tune nests only on "/") and tells Optuna
each finished trial's last ``score`` (a trial ASHA stopped included: its last report stands);
``ASHAScheduler(time_attr=...)`` takes any monotonic number a trial reports; ``tune.report`` raises
SystemExit in a trial that ASHA has stopped; a first SIGINT makes ``Tuner.fit`` save the experiment
and return, and ``Tuner.restore(path, trainable)`` continues it: finished trials stay finished, the
searcher's state (the Optuna study) and the trial count come back, a trial that was running starts over.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from .tune_report import Row, row_of, table_line, write_outputs
from .tune_trial import TrialSettings, run_trial

METRIC, MODE = "score", "min"  # see tune_objective.score
CLOCK = "budget_s"  # ASHA's time: seconds of the trial's runs so far (solved runs count to their solve)
EXPERIMENT = "ray"  # tune/<id>/ray/ holds Tune's own state
ASHA_REDUCTION = 3  # keep the best third at each rung
SAMPLER_SEED = 0


class TrialTable(tune.Callback):
    """One table line per finished trial, and the search's files rewritten from all finished trials."""

    def __init__(self, settings: TrialSettings, folder: str, command: str, base_config: str):
        self.settings, self.folder, self.command, self.base_config = settings, folder, command, base_config
        self.shown = False  # a resumed search first lists the trials finished before (state is not restored)

    def on_step_begin(self, iteration, trials, **info):
        if not self.shown:
            self.shown = True
            for row in self._rows(trials, None):
                print(table_line(row, self.settings.seeds) + "  (before the resume)", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finished(trials, trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finished(trials, trial)

    def _rows(self, trials, current) -> list[Row]:
        done = [t for t in trials if t.status in ("TERMINATED", "ERROR") or t is current]
        return sorted((row_of(t, self.settings) for t in done), key=lambda r: r.number)

    def _finished(self, trials, trial) -> None:
        rows = self._rows(trials, trial)
        row = next(r for r in rows if r.trial_id == trial.trial_id)
        print(table_line(row, self.settings.seeds), flush=True)
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


def new_tuner(
    settings: TrialSettings, trials: int, cpus_per_trial: float, concurrent: int, folder: Path, table: TrialTable
) -> tune.Tuner:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # TPE models the good and the bad trials once it has a few; before that it draws at random.
    sampler = optuna.samplers.TPESampler(seed=SAMPLER_SEED, n_startup_trials=max(2, min(10, trials // 3)))
    searcher = OptunaSearch(
        space={p.key: p.distribution() for p in settings.params}, metric=METRIC, mode=MODE, sampler=sampler
    )
    # No trial is judged before a quarter of one seed's budget; rungs at 1/4, 3/4, 9/4 ... of it (whole seconds).
    scheduler = ASHAScheduler(
        time_attr=CLOCK,
        metric=METRIC,
        mode=MODE,
        max_t=math.ceil(settings.seeds * settings.budget_s),
        grace_period=max(1, round(settings.budget_s / 4)),
        reduction_factor=ASHA_REDUCTION,
    )
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
            name=EXPERIMENT,
            storage_path=str(folder.resolve()),
            verbose=0,
            callbacks=[table],
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )


def restorable(folder: Path) -> bool:
    return tune.Tuner.can_restore(str((folder / EXPERIMENT).resolve()))


def restored_tuner(settings: TrialSettings, cpus_per_trial: float, folder: Path) -> tune.Tuner:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return tune.Tuner.restore(
        str((folder / EXPERIMENT).resolve()),
        trainable=_trainable(settings, cpus_per_trial),
        resume_unfinished=True,
        resume_errored=False,
        restart_errored=False,
    )
