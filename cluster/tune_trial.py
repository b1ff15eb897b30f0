"""One trial of ``apexq tune``: ordinary ``apexq train --single-process`` runs, one seed after another.

Each run is a subprocess (``python -m apexq.cluster.cli train --single-process --run-dir DIR --config
BASE --set KEY=VALUE ... --set train.max_seconds=S --set seed=i``) whose ``metrics.jsonl`` is read
as it grows; every new evaluation is reported to Tune (``tune.report``) with the objective as if
the trial ended now, so ASHA can stop the trial at any report and Optuna still gets a value.

A run ends by itself, as any ``apexq train`` does: at its first evaluation >= the base config's
``train.stop_at_return``, or after ``S`` seconds; it then writes its policy files (the best
evaluated weights). Then the trial judges that policy as ``benchmarks/solve.py`` does: ``apexq
evaluate`` on :data:`FRESH_EPISODES` episodes from seed :data:`FRESH_SEED`, which no actor and no
in-run evaluation uses. A solve counts only if the policy holds there (mean >= the target); the
fresh mean is the run's final return (the objective's tie-break). A run still going
:data:`EXIT_GRACE_S` after its budget is killed, and is judged on what it wrote.

A run must not outlive its trial: when ASHA stops the trial, ``tune.report`` raises SystemExit
here and the run is killed; when Ray ends the trial's worker first (it does not wait for this
thread after a stop, nor at an interrupted search's end), Linux's parent-death signal kills the
run with it. Each run has its own session (a Ctrl-C in the terminal reaches the search, which
stops the trials, not the runs directly) and its own TMPDIR inside the trial's folder, removed
after it (or, when Ray ended the trial first, at the search's end), so nothing a killed run
leaves lands in /tmp; except, with ``--distributed``, the run's Ray session folder, which stays
where Ray keeps it for every run (``/tmp/ray``: Unix socket paths are limited to 107 bytes).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .tune_objective import TrialProgress
from .tune_space import Param

POLL_S = 0.2
FRESH_SEED = 777  # as benchmarks/solve.py's final evaluation
FRESH_EPISODES = 100
EXIT_GRACE_S = 60.0  # a run's start-up before its clock starts, its final checkpoint and policy export
# Run as `python -c WRAPPER PARENT_PID ARGS...`: ask Linux to SIGKILL this process when its parent
# thread dies (PR_SET_PDEATHSIG = 1), give up if the parent is already gone, then become ARGS.
# (A preexec_fn would do the same, but is unsafe in a process with threads, as a Ray worker is.)
WRAPPER = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGKILL)\n"
    "if os.getppid() != int(sys.argv[1]):\n    sys.exit(1)\n"
    "os.execv(sys.executable, [sys.executable] + sys.argv[2:])\n"
)


def python(args: list[str]) -> list[str]:
    """The command line running ``python ARGS`` so that it dies with this process (on Linux)."""
    prefix = [sys.executable, "-c", WRAPPER, str(os.getpid())] if sys.platform == "linux" else [sys.executable]
    return [*prefix, *args]


class TrialFailed(RuntimeError):
    """A run of the trial ended with an error before solving (its reason in one line)."""


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of a search shares (passed to Tune with ``tune.with_parameters``)."""

    base_config: str  # absolute path of the search's copy of --config
    params: tuple[Param, ...]
    seeds: int
    budget_s: float
    target: float  # the base config's train.stop_at_return
    runs_dir: str  # absolute: runs/<trial id>/seed<i>/ go here
    distributed: bool = False  # runs as `apexq train` runs by default (its own local Ray), not --single-process

    def overrides(self, drawn: dict) -> list[str]:
        return [f"{p.key}={p.set_text(drawn[p.key])}" for p in self.params]


def train_command(settings: TrialSettings, drawn: dict, run_dir: Path, seed: int) -> list[str]:
    """The ``apexq train`` command line of one seed's run (after the python executable)."""
    sets = [*settings.overrides(drawn), f"train.max_seconds={settings.budget_s!r}", f"seed={seed}"]
    return [
        "-m",
        "apexq.cluster.cli",
        "train",
        *([] if settings.distributed else ["--single-process"]),
        "--run-dir",
        str(run_dir),
        "--config",
        settings.base_config,
        *[a for s in sets for a in ("--set", s)],
    ]


class Run:
    """One seed's ``apexq train`` subprocess and its growing ``metrics.jsonl``."""

    def __init__(self, args: list[str], run_dir: Path, log: Path, tmp: Path, own_ray: bool = False):
        self.run_dir, self.log_path, self.tmp = run_dir, log, tmp
        tmp.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TMPDIR": str(tmp)}
        if own_ray:
            # a distributed run starts a private Ray (never joins Tune's) whose session folder stays
            # where every Ray's does: its sockets under the trial's folder could pass the 107-byte
            # limit of a Unix socket path
            env.pop("RAY_ADDRESS", None)
            env.setdefault("RAY_TMPDIR", tempfile.gettempdir())
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                python(args),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.started = time.monotonic()
        self.offset = 0
        self.killed = False

    def records(self, deadline_s: float) -> Iterator[dict]:
        """Each new record until the process exits, or is killed ``deadline_s`` after its launch."""
        metrics = self.run_dir / "metrics.jsonl"
        while True:
            exited = self.proc.poll() is not None
            yield from self._new_records(metrics)
            if exited:
                return
            if time.monotonic() - self.started >= deadline_s:
                self.kill()
                return
            time.sleep(POLL_S)

    def _new_records(self, metrics: Path) -> Iterator[dict]:
        try:
            with open(metrics, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        self.offset += end
        for line in data[:end].splitlines():
            if line.strip():
                yield json.loads(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.killed = True
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the group is the run
            except ProcessLookupError:
                pass
        self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def failure(self) -> str:
        """The run's own error line, else its last line of output."""
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        errors = [ln for ln in lines if ln.startswith("apexq: error:")]
        last = errors[-1] if errors else (lines[-1] if lines else "no output")
        return f"{self.run_dir.name}: apexq train exited with status {self.proc.returncode}: {last.strip()}"


def fresh_return(run_dir: Path, log: Path) -> Optional[float]:
    """``apexq evaluate`` of the run's policy on fresh episodes; None if it wrote none (its output
    is appended to the run's log)."""
    if not (run_dir / "policy.json").is_file() and not (run_dir / "checkpoint.pt").is_file():
        return None
    args = ["evaluate", str(run_dir), "--episodes", str(FRESH_EPISODES), "--seed", str(FRESH_SEED), "--json"]
    proc = subprocess.run(
        python(["-m", "apexq.cluster.cli", *args]), capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    with open(log, "a") as out:
        out.write(f"\n$ apexq {' '.join(args)}\n{proc.stdout}{proc.stderr}")
    if proc.returncode != 0:
        return None
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["mean"])


def run_trial(config: dict, settings: TrialSettings) -> None:
    """Tune's trainable: the trial's seeds one after another, a report after each new evaluation."""
    from ray import tune

    trial_dir = Path(settings.runs_dir) / tune.get_context().get_trial_id()
    if trial_dir.exists():  # left by this trial in a search that was interrupted: the trial starts over
        shutil.rmtree(trial_dir)
    trial_dir.mkdir(parents=True)
    progress = TrialProgress(settings.seeds, settings.budget_s, settings.target)
    for seed in range(settings.seeds):
        run_dir = trial_dir / f"seed{seed}"
        progress.start_seed()
        run = Run(
            train_command(settings, config, run_dir, seed),
            run_dir,
            trial_dir / f"seed{seed}.log",
            trial_dir / f"seed{seed}.tmp",
            own_ray=settings.distributed,
        )
        try:
            for rec in run.records(settings.budget_s + EXIT_GRACE_S):
                # a solve is reported below, once the run has ended and its policy is judged
                if progress.record(rec) and progress.current.solved_at is None:
                    tune.report(progress.report())  # raises SystemExit when ASHA stops the trial
        finally:
            run.kill()
        if progress.current.solved_at is None and not run.killed and run.proc.returncode != 0:
            why = run.failure()
            (trial_dir / "failed.txt").write_text(why + "\n")
            raise TrialFailed(why)
        progress.end_seed(fresh_return(run_dir, trial_dir / f"seed{seed}.log"))
        tune.report(progress.report())
