"""The learner's files of a run (checkpoint, exported policy), held as bytes until the driver takes them.

The learner may run on any node of a cluster, the run directory is the driver's: a file the
learner wrote on its own node would stay there (and go with the pod on Kubernetes). So a
distributed learner writes nothing into the run directory; it puts each new file's bytes here,
and the driver asks for what is newer than what it already wrote, once per tick when the
learner's stats show a new version, and writes it into its run directory, each file atomically.
A DQN's checkpoint is ~100 KB and the policy files less, so no shared storage is needed.

Versions count puts in this process; ``token`` tells processes apart, so that a driver holding
version 7 of a learner that Ray restarted (and whose count began again at 0) asks for everything.
"""

from __future__ import annotations

import threading
import uuid

# every name a learner may hand the driver: the driver writes nothing else
NAMES = ("checkpoint.pt", "policy.safetensors", "policy.json", "policy.pt2", "policy.onnx")


class Outbox:
    def __init__(self):
        self.token = uuid.uuid4().hex
        self.version = 0
        self._files: dict[str, tuple[int, bytes]] = {}
        self._lock = threading.Lock()

    def put(self, files: dict[str, bytes]) -> int:
        """Hold these files (name -> bytes) as one new version; returns it."""
        bad = sorted(set(files) - set(NAMES))
        if bad:
            raise ValueError(f"not a file of a run: {bad}")
        with self._lock:
            self.version += 1
            for name, data in files.items():
                self._files[name] = (self.version, bytes(data))
            return self.version

    def mark(self) -> tuple[str, int]:
        """(token, version): what the driver compares with what it last took."""
        with self._lock:
            return self.token, self.version

    def since(self, token: str, version: int) -> tuple[str, int, dict[str, bytes]]:
        """(token, version, the files put after ``version``); all of them if ``token`` is another process's."""
        with self._lock:
            after = version if token == self.token else 0
            return self.token, self.version, {n: d for n, (v, d) in self._files.items() if v > after}
