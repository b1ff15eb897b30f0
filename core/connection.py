"""Redis connections with retry and backoff, shared by actors, shards and the learner."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRYABLE = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, ConnectionError, OSError)


class RedisAuthError(RuntimeError):
    pass


def connect(url: str, *, decode_responses: bool = False, timeout: float = 10.0) -> redis.Redis:
    """A client for ``url`` (redis:// or rediss://, password in the URL) that retries transient errors."""
    client = redis.Redis.from_url(
        url,
        decode_responses=decode_responses,
        socket_timeout=timeout,
        socket_connect_timeout=5.0,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=5),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError],
    )
    return client


def once() -> Retry:
    """A retry policy of no retries, for probes that must say "down" within their own timeout.

    redis-py's defaults are not that everywhere, and have changed between versions: 8.x retries a
    failed connection 10 times with jittered backoff for a client made from host and port (a PING
    to a refused port took 3.1 s here; on a host that drops packets each try also waits out the
    connect timeout), and not for one made from a URL. A probe says what it wants.
    """
    return Retry(NoBackoff(), 0)


def probe(url: str, timeout: float) -> redis.Redis:
    """A client for liveness checks: each command is tried once, each socket wait is ``timeout``."""
    return redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout, retry=once())


def check(url: str) -> None:
    """Ping ``url`` once; raise a one-line error that tells a bad password from a dead server."""
    client = probe(url, 3.0)
    try:
        client.ping()
    except redis.AuthenticationError:
        raise RedisAuthError(f"Redis at {redact(url)} refused the password") from None
    except redis.ResponseError as exc:
        if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
            raise RedisAuthError(f"Redis at {redact(url)} requires a (correct) password") from None
        raise
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise ConnectionError(f"cannot reach Redis at {redact(url)}: {exc}") from None
    finally:
        client.close()


def redact(url: str) -> str:
    """The URL with its password (in the user info or a ``password=`` query parameter) replaced by ***."""
    url = re.sub(r"([?&]password=)[^&#]*", r"\1***", url)
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    cred, host = rest.rsplit("@", 1)
    user = cred.split(":", 1)[0] if ":" in cred else ""
    return f"{scheme}://{user}:***@{host}"


def with_backoff(
    fn: Callable[[], T], *, what: str, stop: Callable[[], bool] = lambda: False, max_wait: float = 5.0
) -> T:
    """Call ``fn`` until it stops raising connection errors (Redis restarting), backing off."""
    delay = 0.05
    warned = False
    while True:
        try:
            return fn()
        except RETRYABLE as exc:
            if stop():
                raise
            if not warned:
                log.warning("%s: Redis unavailable (%s); retrying with backoff", what, exc)
                warned = True
            time.sleep(delay)
            delay = min(max_wait, delay * 2)
