"""What a trial of ``apexq tune`` is worth, as pure arithmetic over its runs' metrics records.

The objective is what a user waits for, measured as ``benchmarks/solve.py`` measures it: the
median, over a trial's ``--seeds`` runs, of the seconds from a run's launch to the evaluation the
run itself calls solved (the record's ``solved``: the first whose mean return reaches
``train.stop_at_return`` and whose weights reach it again on ``eval.confirm_episodes`` other
episodes), less the run's evaluation time ``eval_time_s`` (start-up included, evaluations
excluded). A solve counts only if the run's policy then holds on fresh episodes (:mod:`.tune_trial` evaluates it); a run
that does not solve, or whose policy does not hold, counts at the budget, and so does a run that
has not happened yet: the objective of a trial still going (or stopped early by ASHA) is the one
it would have if it ended now. With an even number of seeds the median is the mean of the middle two.

Ties (typically several trials with no seed solved, all at the budget) are broken by the final
return: the mean, over the trial's runs, of each run's return on the fresh episodes (for a run
not judged yet, its latest evaluation's). The search minimises one number, :func:`score`: the
objective less a tie-break smaller than :data:`TIE_BREAK_S`, growing with the final return, so
the order it gives is (objective, higher final return) for any objectives more than a millisecond apart.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional

TIE_BREAK_S = 1e-3


def objective(solve_times: list[Optional[float]], seeds: int, budget_s: float) -> float:
    """Median over ``seeds`` runs of the seconds to solve; ``solve_times`` holds one entry per run so
    far (None: not solved). Unsolved runs, runs not made yet and solves after the budget count at it."""
    times = [budget_s if t is None else min(t, budget_s) for t in solve_times]
    times += [budget_s] * (seeds - len(times))
    return float(statistics.median(times))


def final_return(last_returns: list[Optional[float]]) -> Optional[float]:
    """Mean of the runs' last evaluation returns (runs with no evaluation yet left out); None if none."""
    known = [r for r in last_returns if r is not None]
    return sum(known) / len(known) if known else None


def score(objective_s: float, final: Optional[float]) -> float:
    """The number the search minimises: the objective less a tie-break in (0, TIE_BREAK_S) that grows
    with the final return (none at all without one)."""
    if final is None:
        return objective_s
    return objective_s - TIE_BREAK_S * (0.5 + math.atan(final) / math.pi)


def rank_key(objective_s: float, final: Optional[float]) -> tuple:
    """Sorts trials best first: lower objective, then higher final return."""
    return objective_s, -final if final is not None else math.inf


@dataclass
class SeedRun:
    """What one seed's run has shown so far."""

    solved_at: Optional[float] = None  # seconds to the solving evaluation, its evaluation time excluded
    last_return: Optional[float] = None  # the latest evaluation's return, then the fresh episodes' one
    held: Optional[bool] = None  # after a solve: whether the policy held on fresh episodes
    used_s: float = 0.0
    eval_time_s: float = -1.0  # the run's evaluation seconds at its latest evaluation
    ended: bool = False


class TrialProgress:
    """A trial's seeds, run one after the other; :meth:`report` is what the trial tells Tune."""

    def __init__(self, seeds: int, budget_s: float, target: float):
        self.seeds, self.budget_s, self.target = seeds, budget_s, target
        self.runs: list[SeedRun] = []
        self.latest: dict = {}

    def start_seed(self) -> None:
        self.runs.append(SeedRun())

    @property
    def current(self) -> SeedRun:
        return self.runs[-1]

    def record(self, rec: dict) -> bool:
        """Take one ``metrics.jsonl`` record of the current run; True when it holds a new evaluation.

        Every record repeats the latest evaluation's return; a new one is known by the run's total
        evaluation time (``eval_time_s``) having grown.
        """
        run = self.current
        self.latest = rec
        run.used_s = min(max(run.used_s, float(rec.get("time_s") or 0.0)), self.budget_s)
        value, spent = rec.get("eval_return"), float(rec.get("eval_time_s") or 0.0)
        if value is None or spent <= run.eval_time_s or run.solved_at is not None:
            return False
        run.eval_time_s, run.last_return = spent, float(value)
        if rec.get("solved") is True:  # reached the target, and confirmed on other episodes (the run's own judgement)
            run.solved_at = max(0.0, float(rec["time_s"]) - spent)
        return True

    def end_seed(self, fresh: Optional[float]) -> None:
        """The current run is over (solved, or its budget spent); ``fresh``: its policy's mean return
        on fresh episodes (None: it left no policy). A solve whose policy does not hold is undone."""
        run = self.current
        run.ended = True
        if fresh is not None:
            run.last_return = fresh
        if run.solved_at is not None:
            run.held = fresh is not None and fresh >= self.target
            if not run.held:
                run.solved_at = None
        if run.solved_at is None:
            run.used_s = self.budget_s

    def report(self) -> dict:
        """The latest record's numbers and the trial's own: ``objective`` as if the trial ended now,
        ``score`` (what the search minimises), ``budget_s`` (seconds of runs so far: ASHA's clock)."""
        times = [r.solved_at for r in self.runs]
        obj = objective(times, self.seeds, self.budget_s)
        final = final_return([r.last_return for r in self.runs])
        out = {k: v for k, v in self.latest.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        out.update(
            objective=obj,
            score=score(obj, final),
            solved_seeds=sum(t is not None for t in times),
            not_held=sum(r.held is False for r in self.runs),
            seeds_finished=sum(r.ended or r.solved_at is not None for r in self.runs),
            seeds=self.seeds,
            seed=len(self.runs) - 1,
            budget_s=sum(r.used_s for r in self.runs),
        )
        if final is not None:
            out["final_return"] = final
        return out
