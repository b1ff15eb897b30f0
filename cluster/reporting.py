"""The run's Prometheus side: the driver's /metrics and /targets, each component's endpoint registered.

Records and the progress line are the driver loop's (:mod:`.driver`); this is what a scraper sees.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TextIO

from .config import Config
from .ray_components import Member
from .run_dir import RunDir

log = logging.getLogger("apexq")


class MetricsService:
    """The driver's endpoint (``metrics.*``) and Prometheus service discovery of every component."""

    def __init__(self, cfg: Config, run_dir: RunDir, driver_stats: Callable[[], dict], out: TextIO):
        self.cfg, self.run_dir, self.out = cfg, run_dir, out
        self.endpoint = None
        if not cfg.metrics.enabled:
            return
        from .metrics import DriverEndpoint

        self.endpoint = DriverEndpoint(driver_stats, cfg.metrics.host, cfg.metrics.port, run_dir.run_id)
        port = int(self.endpoint.address.rsplit(":", 1)[1])
        if cfg.metrics.port and port != cfg.metrics.port:
            print(
                f"apexq: metrics.port {cfg.metrics.port} is busy; the driver serves on port {port} instead",
                file=out,
                flush=True,
            )
        print(
            f"apexq: metrics at http://{self.endpoint.address}/metrics, Prometheus HTTP SD at "
            f"http://{self.endpoint.address}/targets",
            file=out,
            flush=True,
        )

    def register(self, m: Member) -> None:
        """Ask ``m`` to serve its metrics and add it to the targets (again after a restart: a new port)."""
        import ray

        if self.endpoint is None:
            return
        try:
            addr = ray.get(m.handle.serve_metrics.remote(self.cfg.metrics.host, 0), timeout=60)
        except Exception as exc:
            log.warning("no metrics endpoint for %s %d: %s", m.kind, m.index, exc)
            return
        self.endpoint.set_target(f"{m.kind}-{m.index}", addr, m.kind, m.index)
        self.run_dir.write_json("prometheus_targets.json", self.endpoint.sd_document())

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None
