"""Processes of one run, found by ancestry: a test checks what its own run started, never the machine.

Other tests (or other people) may run Ray or Redis at the same time, so a machine-wide ``ps`` scan
that expects "exactly two actors" or "no raylet left" races with them. These helpers read /proc:
the live descendants of a pid, and a ``Watch`` that keeps recording a run's process tree while it
runs, so that after the run ends the test can ask which of those very processes (pid and kernel
start time, so a reused pid is not mistaken for one) are still alive.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]


def _stat(pid: int) -> Optional[list[bytes]]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None


def start_time(pid: int) -> Optional[int]:
    """The kernel's start time of a live process (tells it from a later one with its pid), else None."""
    fields = _stat(pid)
    return None if fields is None or fields[0] in (b"Z", b"X") else int(fields[19])


def descendants(root: int) -> dict[int, str]:
    """pid -> command line of every live descendant of ``root`` (zombies excluded)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            fields = _stat(int(d))
            if fields is not None and fields[0] not in (b"Z", b"X"):
                children.setdefault(int(fields[1]), []).append(int(d))
    out, todo = {}, [root]
    while todo:
        for c in children.get(todo.pop(), []):
            try:
                out[c] = Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            todo.append(c)
    return out


def pids_of(root: int, needle: str) -> list[int]:
    """Descendants of ``root`` whose command line contains ``needle``."""
    return sorted(p for p, cmd in descendants(root).items() if needle in cmd)


class Watch:
    """Records every descendant of ``root`` seen while it lives (polled every ``every`` seconds).

    ``leftovers()`` are the recorded processes still alive (same pid and start time) -- after the
    run ended, what it leaked. Something that starts and dies between two polls is not seen; the
    runs start nothing that short-lived that could also leak.
    """

    def __init__(self, root: int, every: float = 0.1):
        self.root, self.every = root, every
        self.seen: dict[int, tuple[int, str]] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True, name=f"watch-{root}")
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            if start_time(self.root) is None:
                return
            self._stop.wait(self.every)

    def poll(self) -> None:
        for pid, cmd in descendants(self.root).items():
            st = start_time(pid)
            if st is not None and pid not in self.seen:
                self.seen[pid] = (st, cmd)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(10)
        assert not self._t.is_alive(), "the process watch did not stop"

    def kinds(self, needle: str) -> list[int]:
        return [p for p, (_, cmd) in self.seen.items() if needle in cmd]

    def leftovers(self) -> dict[int, str]:
        return {p: cmd for p, (st, cmd) in self.seen.items() if start_time(p) == st}

    def wait_gone(self, timeout: float) -> dict[int, str]:
        """Wait until every recorded process has ended; what is left after ``timeout`` seconds."""
        wait_for(lambda: not self.leftovers(), timeout)
        return self.leftovers()


def wait_for(pred: Callable, timeout: float, every: float = 0.2):
    """``pred()``'s first truthy value within ``timeout`` seconds, else its last (falsy) value."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(every)


def run_cli(*args: str, env: Optional[dict] = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``apexq ARGS`` as a user runs it, from the repository root, with Ray kept on loopback;
    ``env``: variables set on top of this process's environment."""
    full = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "apexq.cluster.cli", *args],
        cwd=ROOT,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
