"""Typed, validated configuration: one dataclass per component, loaded from YAML.

Every error is a :class:`ConfigError` whose message names the offending key, so the CLI can
print one line and exit 2 before anything is started.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


def bundled_config(name: str) -> Path:
    """A config that ships with apexq (``configs/NAME`` of the checkout, package data of any install)."""
    from importlib.resources import files

    return Path(str(files("apexq.configs").joinpath(name)))


DEFAULT_CONFIG = bundled_config("mountaincar.yaml")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def _rule(check: Callable[[Any], bool], message: str):
    """A field whose value must pass ``check``. Like every field, it has no default here: defaults
    live in configs/mountaincar.yaml only, which :func:`load_config` reads under every config."""
    return field(metadata={"check": check, "message": message})


def positive():
    return _rule(lambda v: v > 0, "must be > 0")


def non_negative():
    return _rule(lambda v: v >= 0, "must be >= 0")


def in_range(lo: float, hi: float):
    return _rule(lambda v: lo <= v <= hi, f"must be between {lo} and {hi}")


def one_of(*choices: str):
    return _rule(lambda v: v in choices, "must be one of " + ", ".join(choices))


def not_empty():
    return _rule(lambda v: len(v) > 0, "must not be empty")


@dataclass(kw_only=True)  # fields have no defaults (configs/mountaincar.yaml holds them)
class EnvConfig:
    id: str = not_empty()


@dataclass(kw_only=True)  # fields have no defaults (configs/mountaincar.yaml holds them)
class ActorsConfig:
    num: int = _rule(lambda v: 1 <= v <= 4096, "must be between 1 and 4096")
    envs_per_actor: int = _rule(lambda v: 1 <= v <= 65536, "must be between 1 and 65536")
    epsilon_base: float = in_range(0.0, 1.0)
    epsilon_alpha: float = non_negative()
    explore_max_duration: int = _rule(lambda v: 1 <= v <= 100_000, "must be between 1 and 100000")
    explore_mu: float = _rule(lambda v: 1.0 < v <= 100.0, "must be in (1, 100]")
    n_step: int = _rule(lambda v: 1 <= v <= 100, "must be between 1 and 100")
    gamma: float = _rule(lambda v: 0 < v <= 1, "must be in (0, 1]")
    block_size: int = _rule(lambda v: 1 <= v <= 1_000_000, "must be between 1 and 1000000")
    weights_update_period: int = positive()
    max_backlog_blocks: int = positive()
    num_cpus: float = non_negative()
    spread: bool


@dataclass(kw_only=True)  # fields have no defaults (configs/mountaincar.yaml holds them)
class ReplayConfig:
    shards: int = _rule(lambda v: 1 <= v <= 256, "must be between 1 and 256")
    capacity: int = _rule(lambda v: v >= 1, "must be >= 1")
    redis_urls: list[str]
    priority_alpha: float = in_range(0.0, 1.0)
    beta_start: float = in_range(0.0, 1.0)
    beta_anneal_updates: int = positive()
    priority_eps: float = positive()
    samples_per_insert: float = positive()
    min_size_to_sample: int = positive()
    error_buffer: float = positive()
    num_cpus: float = non_negative()
    external: bool
    namespace: Optional[str] = _rule(
        lambda v: v is None or (0 < len(v) <= 64 and all(c.isalnum() or c in "-_." for c in v)),
        "must be 1-64 letters, digits, '-', '_' or '.'",
    )


@dataclass(kw_only=True)  # fields have no defaults (configs/mountaincar.yaml holds them)
class LearnerConfig:
    batch_size: int = _rule(lambda v: 1 <= v <= 1_000_000, "must be between 1 and 1000000")
    device: str = one_of("auto", "cpu", "cuda")
    gpu_wait_s: float = positive()
    lr: float = positive()
    hidden_sizes: list[int] = _rule(
        lambda v: len(v) >= 1 and all(h > 0 for h in v), "must be a non-empty list of positive integers"
    )
    dueling: bool
    target_update_period: int = positive()
    target_tau: float = in_range(0.0, 1.0)
    grad_clip: float = non_negative()
    publish_every: int = positive()
    prefetch: int = _rule(lambda v: 1 <= v <= 64, "must be between 1 and 64")
    batches_per_request: int = _rule(lambda v: 1 <= v <= 64, "must be between 1 and 64")
    checkpoint_every_s: float = positive()
    num_cpus: float = non_negative()
    torch_threads: int = positive()
    compile: bool
    cuda_graphs: bool
    custom_resource: Optional[str]


@dataclass(kw_only=True)  # fields have no defaults (configs/mountaincar.yaml holds them)
class EvalConfig:
    every_seconds: float = non_negative()
    episodes: int = in_range(1, 50_000)
    confirm_episodes: Optional[int] = in_range(0, 50_000)  # None: as many as episodes


@dataclass(kw_only=True)  # fields have no defaults (configs/mountaincar.yaml holds them)
class TrainConfig:
    max_seconds: Optional[float] = positive()
    max_env_steps: Optional[int] = positive()
    stop_at_return: Optional[float]
    progress_every_s: float = positive()


@dataclass(kw_only=True)  # fields have no defaults (configs/mountaincar.yaml holds them)
class RedisConfig:
    server_path: Optional[str]
    host: str = not_empty()
    appendfsync: str = one_of("everysec", "always", "no")
    unreachable_timeout_s: float = positive()


@dataclass(kw_only=True)  # fields have no defaults (configs/mountaincar.yaml holds them)
class SupervisionConfig:
    max_restarts: int = non_negative()
    window_s: float = positive()
    heartbeat_timeout_s: float = positive()


@dataclass(kw_only=True)  # fields have no defaults (configs/mountaincar.yaml holds them)
class MetricsConfig:
    enabled: bool
    host: str = not_empty()
    port: int = in_range(0, 65535)


@dataclass(kw_only=True)  # fields have no defaults (configs/mountaincar.yaml holds them)
class LoggingConfig:
    tensorboard: bool


@dataclass(kw_only=True)  # fields have no defaults (configs/mountaincar.yaml holds them)
class RayConfig:
    num_cpus: Optional[int] = positive()


@dataclass(kw_only=True)  # fields have no defaults (configs/mountaincar.yaml holds them)
class Config:
    """The whole config, one section per component. Build it with :func:`load_config`: no field has
    a default in code, so the packaged configs/mountaincar.yaml is the one place defaults live."""

    seed: int = non_negative()
    env: EnvConfig
    actors: ActorsConfig
    replay: ReplayConfig
    learner: LearnerConfig
    eval: EvalConfig
    train: TrainConfig
    redis: RedisConfig
    metrics: MetricsConfig
    logging: LoggingConfig
    supervision: SupervisionConfig
    ray: RayConfig

    def to_dict(self) -> dict:
        """The config as records keep it (config.yaml, the checkpoint): a password inside a
        ``replay.redis_urls`` entry becomes ***, an ``env:``/``file:`` reference stays as written."""
        from .redis_url import redact_entry

        data = dataclasses.asdict(self)
        data["replay"]["redis_urls"] = [redact_entry(u) for u in data["replay"]["redis_urls"]]
        return data


# ---------------------------------------------------------------------------------------------
# Coercion and validation


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type_name(inner[0]) + " or null"
    if origin is list:
        return "a list of " + _type_name(typing.get_args(tp)[0]) + "s"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(key: str, value: Any, tp) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return _coerce(key, value, inner)
    wrong = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise wrong
        (item_tp,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise wrong
        return value
    if tp is float:
        if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads "1e15" (no dot) as a string; it is a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise wrong
        return value
    raise ConfigError(f"{key}: unsupported type")


def _build(cls, data: Any, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            key = f"{prefix}.{name}" if prefix else str(name)
            close = [f for f in fields if _similar(str(name), f)]
            hint = f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else ""
            raise ConfigError(f"{key}: unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data.get(name), key)
            continue
        if name not in data:  # only a packaged default that lacks a key gets here (a test checks it has all)
            raise ConfigError(f"{key}: missing from the default config {DEFAULT_CONFIG}")
        value = _coerce(key, data[name], tp)
        rule = f.metadata.get("check")
        if rule is not None and value is not None and not rule(value):
            raise ConfigError(f"{key}: {f.metadata['message']}, got {data[name]!r}")
        kwargs[name] = value
    return cls(**kwargs)


def _similar(a: str, b: str) -> bool:
    import difflib

    return difflib.SequenceMatcher(None, a, b).ratio() >= 0.8


def _cross_checks(cfg: Config) -> None:
    if cfg.replay.redis_urls and len(cfg.replay.redis_urls) != cfg.replay.shards:
        raise ConfigError(
            f"replay.redis_urls: has {len(cfg.replay.redis_urls)} URLs but "
            f"replay.shards is {cfg.replay.shards}; give one URL per shard or none"
        )
    if cfg.replay.external and cfg.replay.namespace is None:
        raise ConfigError(
            "replay.namespace: replay.external shards need a namespace that the run and every "
            "`apexq replay-server` are given (e.g. --set replay.namespace=myrun)"
        )
    per_shard = cfg.replay.capacity // cfg.replay.shards
    if per_shard < cfg.learner.batch_size:
        raise ConfigError(
            f"replay.capacity: {cfg.replay.capacity} over {cfg.replay.shards} shards "
            f"holds fewer than learner.batch_size={cfg.learner.batch_size} per shard"
        )
    if cfg.replay.min_size_to_sample > per_shard:
        raise ConfigError(
            f"replay.min_size_to_sample: {cfg.replay.min_size_to_sample} exceeds the "
            f"per-shard capacity {per_shard}; sampling could never start"
        )
    if cfg.train.max_seconds is None and cfg.train.max_env_steps is None and cfg.train.stop_at_return is None:
        raise ConfigError(
            "train.max_seconds: at least one of train.max_seconds, train.max_env_steps "
            "or train.stop_at_return must be set, or the run never ends"
        )
    from apexq.replay_server.rate_limiter import RateLimiterError, SampleToInsertRatio

    try:
        SampleToInsertRatio(
            cfg.replay.samples_per_insert, cfg.replay.min_size_to_sample, cfg.replay.error_buffer
        ).check_progress(
            sample_batch=cfg.learner.batch_size * cfg.learner.batches_per_request, insert_batch=cfg.actors.block_size
        )
    except RateLimiterError as exc:
        raise ConfigError(f"replay.error_buffer: {exc}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY=VALUE")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text}: empty key")
    try:
        value = _parse_yaml(raw, f"--set {key}") if raw.strip() else ""
    except ConfigError as exc:
        if "is not valid YAML" not in str(exc):
            raise
        value = raw
    return key.split("."), value


MAX_CONFIG_BYTES = 1 << 20  # a config is a page of YAML; anything larger is not one
MAX_CONFIG_DEPTH = 32  # sections are two levels deep; deeper nesting is never a config


def _parse_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` that turns every way a hostile or broken text can fail into one ConfigError.

    PyYAML's own errors are not the only ones: a 4,300-digit integer raises ValueError (Python's
    int-conversion limit), and deep nesting RecursionError, so both are bounded here first.
    """
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_CONFIG_BYTES} bytes; not a config")
    depth = deepest = 0
    for ch in text:  # flow-style nesting ([[[...]]] / {{...}}) is what recursion needs; count it cheaply
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    if deepest > MAX_CONFIG_DEPTH:
        raise ConfigError(f"{where}: nested more than {MAX_CONFIG_DEPTH} levels deep; not a config")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{where}:{line} is not valid YAML") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply; not a config") from None
    except ValueError as exc:  # "Exceeds the limit (4300 digits) for integer string conversion ..."
        what = "an integer has too many digits" if "digits" in str(exc) else str(exc).split(":")[0][:80]
        raise ConfigError(f"{where}: a value cannot be read ({what})") from None
    _check_depth(data, where)
    return data


def _check_depth(data: Any, where: str) -> None:
    """Block-style nesting passes the bracket count: walk the parsed value without recursion."""
    todo, seen = [(data, 0)], set()
    while todo:
        node, d = todo.pop()
        if isinstance(node, (dict, list)):  # aliases share nodes: visit each once ("billion laughs")
            if id(node) in seen:
                continue
            seen.add(id(node))
        if d > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{where}: nested more than {MAX_CONFIG_DEPTH} levels deep; not a config")
        if isinstance(node, dict):
            todo.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            todo.extend((v, d + 1) for v in node)


def _read_yaml_file(path: Path, where: str) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_CONFIG_BYTES} bytes; not a config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{where}: line {line} is not UTF-8 text (byte 0x{raw[exc.start]:02x})") from None
    return _parse_yaml(text, where)


def _overlay(base: Any, over: Any) -> Any:
    """``over`` merged over ``base``: mappings merge key by key, anything else replaces.

    An empty section (``actors:`` with nothing under it, which YAML reads as null) keeps the
    section's defaults, as it always did. Only ``base`` (the packaged default, two levels deep)
    is descended, so a hostile ``over`` cannot make this recurse deeply.
    """
    if isinstance(base, dict):
        if over is None:
            return dict(base)
        if isinstance(over, dict):
            return {**base, **{k: _overlay(base.get(k), v) for k, v in over.items()}}
    return over


def load_config(
    path: Optional[str | Path] = None, overrides: Optional[list[str]] = None, base: Optional[dict] = None
) -> Config:
    """The packaged default (:data:`DEFAULT_CONFIG`), the YAML at ``path`` (or ``base``, e.g. the config
    a checkpoint holds) merged over it, then the ``KEY=VALUE`` overrides; validated.

    So a config file names only the keys it changes (configs/cluster.yaml is one), and a key it
    leaves out has the value configs/mountaincar.yaml documents. Unknown keys are refused by
    :func:`_build`, which sees the user's keys beside the default ones.
    """
    data = _read_yaml_file(DEFAULT_CONFIG, f"default config {DEFAULT_CONFIG}")
    if base is not None:
        data = _overlay(data, base)
    elif path:
        data = _overlay(data, _read_yaml_file(Path(path), f"--config {path}"))
    for item in overrides or []:
        parts, value = parse_override(item)
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part) if isinstance(node, dict) else None
            if not isinstance(nxt, dict):
                if isinstance(node, dict) and part not in node:
                    nxt = {}
                    node[part] = nxt
                else:
                    raise ConfigError(f"{'.'.join(parts[: i + 1])}: is not a section")
            node = nxt
        node[parts[-1]] = _overlay(node.get(parts[-1]), value)
    cfg = _build(Config, data, "")
    _cross_checks(cfg)
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
