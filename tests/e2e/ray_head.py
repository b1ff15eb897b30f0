"""A real `ray start --head` for tests, with Ray's default (token) authentication, stopped by its own pids.

The head gets a temp folder of its own (``RAY_TMPDIR``: its ``ray_current_cluster`` address file
and sessions stay out of other Rays' way), a token file of its own that Ray finds through
``RAY_AUTH_TOKEN_PATH`` (``RAY_AUTH_MODE`` is left unset, so ``ray start`` turns token
authentication on by itself, as it does for a user with a token) and free ports for everything
that would otherwise take a fixed one. ``--block`` keeps ``ray start`` in the foreground, in a
session of its own: stopping the head ends exactly the processes of that session, never another
Ray on the machine (``ray stop`` would end them all).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from apexq.cluster.redis_server import free_port

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def wait_for(condition, timeout: float, step: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (the head's ``ray start`` and everything Ray started under it)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    zombie = f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
                if not zombie and os.getsid(int(name)) == sid:
                    out.append(int(name))
            except (OSError, IndexError):
                pass
    return out


def clean_env(**extra: str) -> dict:
    """The environment of a user's shell on this machine: no Ray address or auth settings inherited."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR")
    }
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    env.update(extra)
    return env


class RayHead:
    def __init__(self, num_cpus: int = 4):
        # short: Ray's unix sockets live below it and a socket path has at most 107 bytes
        self.tmp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
        self.token_path = self.tmp / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        self.home = self.tmp / "home"  # a HOME without ~/.ray/auth_token, for runs that must find no token
        self.home.mkdir()
        self.port, self.dash = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.num_cpus = num_cpus
        self.env = clean_env(RAY_TMPDIR=str(self.tmp), RAY_AUTH_TOKEN_PATH=str(self.token_path))
        self.proc = None

    @property
    def address_file(self) -> Path:
        return self.tmp / "ray" / "ray_current_cluster"

    def start(self, tries: int = 2) -> RayHead:
        """Start the head; once more if it failed to come up (Ray gives its raylet a fixed 30 s to
        register, which a machine loaded by other tests can exceed)."""
        for attempt in range(tries):
            try:
                return self._start()
            except AssertionError:
                if attempt == tries - 1:
                    shutil.rmtree(self.tmp, ignore_errors=True)
                    raise
                self.port, self.dash = free_port(), free_port()
                self.address = f"127.0.0.1:{self.port}"
        raise AssertionError("unreachable")

    def _start(self) -> RayHead:
        self.log = open(self.tmp / "head.log", "w")
        self.proc = subprocess.Popen(
            [
                RAY,
                "start",
                "--head",
                "--block",
                "--num-cpus",
                str(self.num_cpus),
                "--port",
                str(self.port),
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(self.dash),
                "--include-dashboard=true",
                "--ray-client-server-port",
                str(free_port()),
                "--dashboard-agent-listen-port",
                str(free_port()),
                "--disable-usage-stats",
            ],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def ready() -> bool:
            if self.proc.poll() is not None:
                return True  # exited: told below
            if not self.address_file.exists() or self.address_file.read_text().strip() != self.address:
                return False
            try:  # the job server answers (401 without a token: it is up)
                with urllib.request.urlopen(f"http://127.0.0.1:{self.dash}/api/version", timeout=2):
                    return True
            except urllib.error.HTTPError:
                return True
            except OSError:
                return False

        if not wait_for(ready, 180, 1.0) or self.proc.poll() is not None:
            tail = self.log_tail()
            self.stop(keep_tmp=True)
            raise AssertionError("ray start --head did not come up:\n" + tail)
        return self

    def log_tail(self) -> str:
        return (self.tmp / "head.log").read_text()[-3000:]

    def stop(self, keep_tmp: bool = False) -> None:
        if self.proc is None:
            return
        sid = self.proc.pid
        # SIGTERM to `ray start --block` alone: it stops what it started in order (3 s here); a
        # SIGTERM to every process at once left the GCS and two others running past 25 s
        self.proc.terminate()
        if not wait_for(lambda: not session_pids(sid), 20, 0.2):
            for pid in session_pids(sid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            wait_for(lambda: not session_pids(sid), 10, 0.2)
        self.proc.wait(timeout=10)
        self.proc = None
        self.log.close()
        if not keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
