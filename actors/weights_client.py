"""Non-blocking weight updates for actors: fetches happen on a background thread; weights arrive as numpy."""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

from apexq.core import weights_store
from apexq.core.connection import connect

log = logging.getLogger(__name__)


class WeightsClient:
    def __init__(self, redis_url: str, namespace: str):
        self.redis = connect(redis_url)
        self.keys = weights_store.WeightsKeys(namespace)
        self.version = -1  # version in use
        self.latest_seen = -1  # newest version seen in Redis
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="weights")
        self._future: Optional[Future] = None
        self.errors = 0

    def _fetch(self, have: int):
        latest = weights_store.published_version(self.redis, self.keys)
        got = weights_store.fetch_if_newer(self.redis, self.keys, have, as_numpy=True) if latest > have else None
        return latest, got

    def poll(self) -> Optional[tuple[int, dict]]:
        """Start a fetch if none is running; return (version, state_dict) when one has finished with news."""
        result = None
        if self._future is not None and self._future.done():
            try:
                latest, got = self._future.result()
                self.latest_seen = max(self.latest_seen, latest)
                if got is not None and got[0] > self.version:
                    result = got
            except Exception as exc:  # Redis restarting: try again next period
                self.errors += 1
                log.debug("weights fetch failed: %s", exc)
            self._future = None
        if self._future is None:
            self._future = self._pool.submit(self._fetch, self.version if result is None else result[0])
        return result

    def wait_first(self, timeout: float) -> Optional[tuple[int, dict]]:
        """Block up to ``timeout`` s for any published version (used once at start)."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            try:
                got = weights_store.fetch_if_newer(self.redis, self.keys, -1, as_numpy=True)
            except Exception:
                got = None
            if got is not None:
                self.latest_seen = got[0]
                return got
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    @property
    def lag(self) -> int:
        return max(0, self.latest_seen - self.version) if self.version >= 0 else 0

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
