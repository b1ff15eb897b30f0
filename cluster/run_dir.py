"""The run directory: resolved config, metrics log, driver state, curve."""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Optional

import yaml

from .config import Config, dump_config


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def policy(self) -> Path:
        return self.path / "policy.pt"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    def create(self, cfg: Config) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        probe = self.path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
        (self.path / "config.yaml").write_text(dump_config(cfg))

    def append_metrics(self, record: dict) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")

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
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.state_file)

    def read_state(self) -> Optional[dict]:
        if not self.state_file.exists():
            return None
        return json.loads(self.state_file.read_text())

    def saved_config(self) -> dict:
        return yaml.safe_load((self.path / "config.yaml").read_text())
