"""What ``apexq tune`` shows and leaves: a table line per finished trial, ``trials.csv``, ``best.yaml``
(an overlay of the searched keys) and ``objective.png``, all rebuilt each time a trial finishes
from the finished trials. ``trials.csv`` is also what a resumed search starts from
(:func:`rows_from_csv`): plain text, checked field by field, never Tune's pickled state."""

from __future__ import annotations

import csv
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from .tune_objective import rank_key
from .tune_trial import TrialSettings

TRIAL_ID = re.compile(r"[0-9a-f]{8}")  # Tune's trial ids; also the folder name of a trial's runs
STATES = ("done", "stopped early", "error")
HEADER = f"{'trial':>5}  {'id':<8}  {'objective_s':>11}  {'solved':>6}  {'final_return':>12}  {'state':<13}  params"


@dataclass
class Row:
    """One finished trial."""

    number: int  # creation order, 1-based, counted over the whole search (a resumed search goes on from its last)
    trial_id: str
    drawn: dict  # key -> value as drawn (choice values as their --set texts)
    state: str  # done | stopped early | error
    objective: Optional[float] = None
    solved: int = 0
    final_return: Optional[float] = None
    budget_used_s: Optional[float] = None


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def row_of(trial, settings: TrialSettings, offset: int = 0) -> Row:
    """A finished Tune trial as a row: its own last report says how far it got. ``offset``: the
    trials finished before this session of the search (Tune numbers each session's trials from 1)."""
    last = trial.last_result or {}
    drawn = {p.key: trial.config.get(p.key) for p in settings.params}
    number = offset + int(str(trial.experiment_tag).split("_")[0])
    if trial.status == "ERROR":
        return Row(number, trial.trial_id, drawn, "error")
    state = "done" if last.get("seeds_finished") == settings.seeds else "stopped early"
    return Row(
        number,
        trial.trial_id,
        drawn,
        state,
        last.get("objective"),
        int(last.get("solved_seeds", 0)),
        last.get("final_return"),
        last.get("budget_s"),
    )


def table_line(row: Row, seeds: int) -> str:
    obj = f"{row.objective:.1f}" if row.objective is not None else "-"
    ret = f"{row.final_return:.1f}" if row.final_return is not None else "-"
    params = " ".join(f"{k}={_fmt(v)}" for k, v in row.drawn.items())
    return (
        f"{row.number:>5}  {row.trial_id:<8}  {obj:>11}  {row.solved:>3}/{seeds:<2}  {ret:>12}  "
        f"{row.state:<13}  {params}"
    )


def ranked(rows: list[Row]) -> list[tuple[float, Row]]:
    """(objective, row) of the trials that have an objective (all but failed ones), in trial order."""
    return sorted(
        ((r.objective, r) for r in rows if r.objective is not None and r.state != "error"),
        key=lambda pair: pair[1].number,
    )


def best_row(rows: list[Row]) -> Optional[Row]:
    trials = ranked(rows)
    return min(trials, key=lambda p: (rank_key(p[0], p[1].final_return), p[1].number))[1] if trials else None


def write_csv(rows: list[Row], settings: TrialSettings, path: Path) -> None:
    keys = [p.key for p in settings.params]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "trial",
                "trial_id",
                *keys,
                "objective_s",
                "solved_seeds",
                "seeds",
                "final_return",
                "budget_used_s",
                "state",
            ]
        )
        for r in rows:
            w.writerow(
                [
                    r.number,
                    r.trial_id,
                    *[r.drawn[k] for k in keys],
                    r.objective,
                    r.solved,
                    settings.seeds,
                    r.final_return,
                    r.budget_used_s,
                    r.state,
                ]
            )


def overlay(settings: TrialSettings, drawn: dict) -> dict:
    """The searched keys with their drawn values, nested as a config file holds them."""
    out: dict = {}
    for p in settings.params:
        *sections, name = p.key.split(".")
        node = out
        for s in sections:
            node = node.setdefault(s, {})
        node[name] = p.config_value(drawn[p.key])
    return out


def write_best(row: Row, rows: list[Row], settings: TrialSettings, command: str, base_config: str, path: Path) -> None:
    sets = " ".join(f"--set {shlex.quote(s)}" for s in settings.overrides(row.drawn))
    ret = f"{row.final_return:.1f}" if row.final_return is not None else "none"
    header = [
        f"apexq tune: the best of {len(rows)} finished trials: trial {row.number} ({row.trial_id}), {row.state}",
        f"objective {row.objective:.1f} s: median over {settings.seeds} seed(s) of the time from launch to a greedy",
        f"evaluation >= train.stop_at_return {settings.target:g}, confirmed on other episodes (unsolved at the",
        f"budget, {settings.budget_s:g} s);",
        f"{row.solved}/{settings.seeds} seeds solved; final return {ret}",
        f"found by: {command}",
        "Only the searched keys: an overlay. Train with them over the search's base config:",
        f"  apexq train --config {shlex.quote(base_config)} {sets}",
    ]
    body = yaml.safe_dump(overlay(settings, row.drawn), sort_keys=False)
    path.write_text("".join(f"# {line}\n" for line in header) + body)


def write_plot(rows: list[Row], settings: TrialSettings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    trials = ranked(rows)
    fig, ax = plt.subplots(figsize=(7, 4))
    for state, marker in (("done", "o"), ("stopped early", "x")):
        pts = [(r.number, obj) for obj, r in trials if r.state == state]
        if pts:
            ax.plot(*zip(*pts), marker, linestyle="none", label=f"trial ({state})")
    best, xs, ys = math.inf, [], []
    for obj, r in trials:
        best = min(best, obj)
        xs.append(r.number)
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    ax.axhline(settings.budget_s, color="grey", linestyle="--", linewidth=1, label="budget (unsolved)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(f"median seconds to return >= {settings.target:g}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(rows: list[Row], settings: TrialSettings, command: str, base_config: str, folder: Path) -> None:
    write_csv(rows, settings, folder / "trials.csv")
    best = best_row(rows)
    if best is not None:
        write_best(best, rows, settings, command, base_config, folder / "best.yaml")
    write_plot(rows, settings, folder / "objective.png")


def read_rows(path: Path) -> list[dict]:
    """trials.csv back as dicts (numbers as floats, empty cells as None); [] before any trial finished."""
    if not path.exists():
        return []

    def cell(text: str):
        if text == "":
            return None
        try:
            return float(text)
        except ValueError:
            return text

    with open(path, newline="") as f:
        return [{k: cell(v) for k, v in r.items()} for r in csv.DictReader(f)]


class TrialsFileError(ValueError):
    """trials.csv cannot be read back: one line naming the file, the row and the field."""


def rows_from_csv(path: Path, settings: TrialSettings) -> list[Row]:
    """The finished trials ``trials.csv`` lists, as :func:`write_csv` wrote them; every field is
    checked (the file is text anyone can edit, and trial ids name folders)."""
    if not path.exists():
        return []
    keys = [p.key for p in settings.params]
    columns = ["trial", "trial_id", *keys, "objective_s", "solved_seeds", "seeds", "final_return", "budget_used_s"]
    columns.append("state")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header != columns:
                raise TrialsFileError(f"{path}: header is {header}, expected {columns} (the search's space changed?)")
            rows = [_parsed_row(path, i, cells, columns, settings) for i, cells in enumerate(reader, start=2)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TrialsFileError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    numbers = [r.number for r in rows]
    if numbers != list(range(1, len(rows) + 1)):
        raise TrialsFileError(f"{path}: trials are numbered {numbers}, expected 1 .. {len(rows)} in order")
    if len({r.trial_id for r in rows}) < len(rows):
        raise TrialsFileError(f"{path}: a trial_id repeats")
    return rows


def _parsed_row(path: Path, line: int, cells: list[str], columns: list[str], settings: TrialSettings) -> Row:
    where = f"{path} line {line}"
    if len(cells) != len(columns):
        raise TrialsFileError(f"{where}: {len(cells)} fields, expected {len(columns)}")
    field = dict(zip(columns, cells))

    def number(name: str, integer: bool = False, optional: bool = True):
        text = field[name]
        if text == "" and optional:
            return None
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            kind = "an integer" if integer else "a number"
            raise TrialsFileError(f"{where}: {name}: expected {kind}, got {text!r}") from None
        if not math.isfinite(value) or (integer and value < 0):
            raise TrialsFileError(f"{where}: {name}: out of range: {text}")
        return value

    if field["state"] not in STATES:
        raise TrialsFileError(f"{where}: state: expected one of {', '.join(STATES)}, got {field['state']!r}")
    if not TRIAL_ID.fullmatch(field["trial_id"]):
        raise TrialsFileError(f"{where}: trial_id: expected 8 hex digits, got {field['trial_id']!r}")
    if number("seeds", integer=True, optional=False) != settings.seeds:
        raise TrialsFileError(f"{where}: seeds: {field['seeds']}, but the search runs {settings.seeds} per trial")
    drawn = {}
    for p in settings.params:
        try:
            drawn[p.key] = p.drawn_from_text(field[p.key])
        except ValueError as exc:
            raise TrialsFileError(f"{where}: {p.key}: {exc}") from None
    row = Row(
        number("trial", integer=True, optional=False),
        field["trial_id"],
        drawn,
        field["state"],
        number("objective_s"),
        number("solved_seeds", integer=True) or 0,
        number("final_return"),
        number("budget_used_s"),
    )
    if row.state != "error" and row.objective is None:
        raise TrialsFileError(f"{where}: objective_s: empty for a trial that did not fail")
    return row
