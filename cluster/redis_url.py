"""Where a Redis URL comes from, so that its password need not be on a command line or in a record.

``--redis-url`` puts the password where ``ps`` shows it to every local user (and a Ray job's
recorded entrypoint), so ``apexq train`` and ``apexq replay-server`` also take it from a file
(``--redis-url-file PATH``: its first line) or from the environment (``APEXQ_REDIS_URL``, e.g.
fed from a Kubernetes Secret). Precedence: --redis-url, then --redis-url-file, then the variable.

``replay.redis_urls`` entries may be references, ``env:VAR`` or ``file:PATH``, resolved when the
run starts. Records of the run (config.yaml, the checkpoint's config) keep a reference as written
and a literal URL with its password replaced by ``***`` (:func:`redact_entry`); ``--resume`` of a
run whose config holds a redacted URL asks for a reference instead of guessing.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

from apexq.core.connection import redact

from .config import Config, ConfigError

ENV_VAR = "APEXQ_REDIS_URL"
SCHEMES = ("redis://", "rediss://", "unix://")
REDACTED = ":***@"


class RedisUrlError(ConfigError):
    """A URL source is missing, unreadable, empty or not a Redis URL; the message names the source."""


def _checked(url: str, where: str) -> str:
    if not url.startswith(SCHEMES):  # never echo the value: it may be a password
        raise RedisUrlError(f"{where}: is not a redis://, rediss:// or unix:// URL")
    return url


def read_url_file(path: str, where: str) -> str:
    """The first line of ``path`` (``~`` expanded), stripped; a one-line error naming ``where``."""
    p = Path(path).expanduser()
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise RedisUrlError(f"{where} {path}: cannot read ({reason})") from None
    first = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not first:
        raise RedisUrlError(f"{where} {path}: is empty")
    return _checked(first, f"{where} {path}")


def from_cli(url: Optional[str], url_file: Optional[str], environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The URL given by --redis-url, else --redis-url-file, else $APEXQ_REDIS_URL; None if none is."""
    if url:
        return _checked(url, "--redis-url")
    if url_file:
        return read_url_file(url_file, "--redis-url-file")
    if environ.get(ENV_VAR, "").strip():
        return _checked(environ[ENV_VAR].strip(), ENV_VAR)
    return None


def resolve_entry(value: str, key: str, environ: Mapping[str, str] = os.environ) -> str:
    """A ``replay.redis_urls`` entry as a URL: ``env:VAR`` and ``file:PATH`` are read now."""
    if value.startswith("env:"):
        name = value[4:]
        if not environ.get(name, "").strip():
            raise RedisUrlError(f"{key}: environment variable {name} (from {value}) is not set")
        return _checked(environ[name].strip(), f"{key} ({value})")
    if value.startswith("file:"):
        return read_url_file(value[5:], key)
    if REDACTED in value:
        raise RedisUrlError(
            f"{key}: the saved config holds this URL with its password redacted; give it as "
            f"env:VAR or file:PATH, e.g. --set '{key.split('[')[0]}=[env:APEXQ_SHARD_URL_0, ...]'"
        )
    return _checked(value, key)


def redact_entry(value: str) -> str:
    """What records keep of a ``replay.redis_urls`` entry: references as written, URLs without password."""
    return value if value.startswith(("env:", "file:")) else redact(value)


def resolved(cfg: Config, environ: Mapping[str, str] = os.environ) -> Config:
    """A copy of ``cfg`` whose ``replay.redis_urls`` are URLs, for the run (never for records)."""
    urls = [resolve_entry(u, f"replay.redis_urls[{k}]", environ) for k, u in enumerate(cfg.replay.redis_urls)]
    return dataclasses.replace(cfg, replay=dataclasses.replace(cfg.replay, redis_urls=urls))
