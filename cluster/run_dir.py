"""The run directory: resolved config, metrics log, driver state, curve, and the learner's files.

Only the driver writes here, on its own node: files made elsewhere (the learner's checkpoint and
exported policy) come to it as bytes (see learner/artifacts.py), so no storage shared by the
nodes is needed, and ``--resume`` and ``apexq evaluate`` find everything where the driver ran.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import yaml

from .config import Config, dump_config

if TYPE_CHECKING:
    from .tensorboard import ScalarLogger


class RunDirError(RuntimeError):
    """Writing the run directory failed (disk full, read-only, removed); one line for the user."""


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.scalars: Optional[ScalarLogger] = None  # while logging.tensorboard is on

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def policy(self) -> Path:
        """The exported policy's stem: ``.safetensors`` + ``.json`` (what apexq reads), ``.onnx``, ``.pt2``."""
        return self.path / "policy"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tb"

    def open_tensorboard(self) -> None:
        """Send every metrics record to a new TensorBoard event file in tb/ too (driver only: one writer)."""
        from .tensorboard import ScalarLogger

        try:
            self.scalars = ScalarLogger(self.tensorboard_dir)
        except OSError as exc:
            raise self._failed(self.tensorboard_dir.name, exc) from None

    def close(self) -> None:
        if self.scalars is not None:
            self.scalars.close()
            self.scalars = None

    def create(self, cfg: Config) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        probe = self.path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
        (self.path / "config.yaml").write_text(dump_config(cfg))

    def _failed(self, name: str, exc: OSError) -> RunDirError:
        return RunDirError(f"{self.path}: {exc.strerror or exc} while writing {name}")

    def append_metrics(self, record: dict) -> None:
        """Append one line, all or nothing: a write cut short (disk full) is truncated away again."""
        data = (json.dumps(record) + "\n").encode()
        try:
            fd = os.open(self.metrics, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise self._failed(self.metrics.name, exc) from None
        try:
            size = os.fstat(fd).st_size
            try:
                written = os.write(fd, data)
                if written != len(data):
                    raise OSError(28, "No space left on device")
            except OSError as exc:
                try:
                    os.ftruncate(fd, size)
                except OSError:
                    pass
                raise self._failed(self.metrics.name, exc) from None
        finally:
            os.close(fd)
        if self.scalars is not None:
            self.scalars.write(record)

    def write_files(self, files: dict) -> None:
        """Write files made elsewhere (name -> bytes), each all or nothing: a temporary file, fsync, rename.

        Only the names in ``learner.artifacts.NAMES``; a write that fails (disk full) leaves the
        previous version of that file whole and raises :class:`RunDirError`.
        """
        from apexq.learner.artifacts import NAMES

        bad = [n for n in files if n not in NAMES or not isinstance(files[n], (bytes, bytearray))]
        if bad:
            raise ValueError(f"not a file of a run, or not bytes: {sorted(map(str, bad))}")
        for name in sorted(files, key=NAMES.index):
            self._replace(name, bytes(files[name]), sync=True)

    def write_json(self, name: str, obj) -> None:
        """Write ``name`` atomically (temporary file, then rename): the previous version survives a failure."""
        self._replace(name, json.dumps(obj, indent=1).encode())

    def _replace(self, name: str, data: bytes, sync: bool = False) -> None:
        """``name`` becomes ``data`` all or nothing: a temporary file (fsynced with ``sync``), then a rename."""
        path = self.path / name
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if sync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise self._failed(name, exc) from None

    def read_metrics(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        out = []
        for line in self.metrics.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return out

    def write_state(self, state: dict) -> None:
        self.write_json(self.state_file.name, state)

    def read_state(self) -> Optional[dict]:
        if not self.state_file.exists():
            return None
        return json.loads(self.state_file.read_text())

    def saved_config(self) -> dict:
        return yaml.safe_load((self.path / "config.yaml").read_text())
