"""Whatever a local run started goes when its driver goes, even when the driver is SIGKILLed.

``ray.init`` starts Ray's daemons (GCS, raylet, agents, workers) under the driver. A driver that
stops cleanly shuts them down; one that is SIGKILLed leaves Ray's dashboard and runtime-env
agents running for good (measured with Ray 2.60: both still alive a minute later). This small
process, started by the driver in a session of its own, watches the driver through a pipe:
while the driver lives it records the driver's descendants every ``PERIOD_S`` (pid plus the
kernel's start time, so a recycled pid is never touched); when the pipe closes (the driver
exited without saying it stopped cleanly) it sends SIGTERM to every recorded process still alive, then SIGKILL
after ``GRACE_S``. Linux only (it reads /proc); elsewhere :func:`start` does nothing.

Run as ``python -m apexq.cluster.reaper DRIVER_PID`` with the pipe on stdin.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from typing import Optional

PERIOD_S = 0.5
GRACE_S = 3.0
BYE = b"stopped cleanly\n"


def _stat(pid: int) -> Optional[tuple[int, int]]:
    """(parent pid, start time in clock ticks) of a live, non-zombie process, else None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data.rsplit(b")", 1)[1].split()  # the command name may hold spaces and ')'
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """pid -> start time of every live descendant of ``root``."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                children.setdefault(st[0], []).append(int(name))
                starts[int(name)] = st[1]
    out: dict[int, int] = {}
    todo = [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out[c] = starts[c]
                todo.append(c)
    return out


def _signal_all(seen: dict[int, int], sig: int) -> int:
    """Send ``sig`` to each recorded process that is still the same process; how many were alive."""
    alive = 0
    for pid, start in seen.items():
        st = _stat(pid)
        if st is None or st[1] != start:
            continue
        alive += 1
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    return alive


def watch(driver: int, pipe_fd: int = 0) -> int:
    me = os.getpid()
    mine = _stat(me)
    assert mine is not None  # this very process
    born = mine[1]  # only what the run starts from now on is the run's (not, say, a test's servers)
    seen: dict[int, int] = {}
    while True:
        ready, _, _ = select.select([pipe_fd], [], [], PERIOD_S)
        if ready:
            data = os.read(pipe_fd, 4096)
            if BYE in data:
                return 0  # the driver stopped everything itself
            if not data:
                break  # EOF without a goodbye: the driver died
        for pid, start in descendants(driver).items():
            if pid != me and start >= born:
                seen[pid] = start
        if _stat(driver) is None:
            break
    # the driver's own children that outlived it were reparented; their children too: record them
    for pid in list(seen):
        seen.update({p: s for p, s in descendants(pid).items() if p != me})
    if not _signal_all(seen, signal.SIGTERM):
        return 0
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline:
        time.sleep(0.1)
        if not _signal_all(seen, 0):
            return 0
    _signal_all(seen, signal.SIGKILL)
    return 0


def start() -> Optional[subprocess.Popen]:
    """Start the reaper for this process (call before ``ray.init``); :func:`release` it after a clean stop."""
    if not sys.platform.startswith("linux"):
        return None
    proc = subprocess.Popen(
        [sys.executable, "-m", "apexq.cluster.reaper", str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    return proc


def release(proc: Optional[subprocess.Popen]) -> None:
    """The driver stopped what it started: the reaper exits without touching anything."""
    if proc is None or proc.stdin is None:
        return
    try:
        proc.stdin.write(BYE)
        proc.stdin.close()
        proc.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        pass


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C for the driver is not for the reaper
    sys.exit(watch(int(sys.argv[1])))
