"""Typed, validated configuration: one dataclass per component, loaded from YAML.

Every error is a :class:`ConfigError` whose message names the offending key, so the CLI can
print one line and exit 2 before anything is started.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

def bundled_config(name: str) -> Path:
    """A config that ships with apexq (``configs/NAME`` of the checkout, package data of any install)."""
    from importlib.resources import files
    return Path(str(files("apexq.configs").joinpath(name)))


DEFAULT_CONFIG = bundled_config("mountaincar.yaml")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def _rule(check: Callable[[Any], bool], message: str) -> dict:
    return {"check": check, "message": message}


def positive() -> dict:
    return _rule(lambda v: v > 0, "must be > 0")


def non_negative() -> dict:
    return _rule(lambda v: v >= 0, "must be >= 0")


def in_range(lo: float, hi: float) -> dict:
    return _rule(lambda v: lo <= v <= hi, f"must be between {lo} and {hi}")


def one_of(*choices: str) -> dict:
    return _rule(lambda v: v in choices, "must be one of " + ", ".join(choices))


def _f(default, rule: Optional[dict] = None):
    meta = rule or {}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class EnvConfig:
    id: str = _f("MountainCar-v0", _rule(lambda v: len(v) > 0, "must not be empty"))


@dataclass
class ActorsConfig:
    num: int = _f(2, _rule(lambda v: 1 <= v <= 4096, "must be between 1 and 4096"))
    envs_per_actor: int = _f(32, _rule(lambda v: 1 <= v <= 65536, "must be between 1 and 65536"))
    epsilon_base: float = _f(0.5, in_range(0.0, 1.0))
    epsilon_alpha: float = _f(6.0, non_negative())
    explore_max_duration: int = _f(50, _rule(lambda v: 1 <= v <= 100_000, "must be between 1 and 100000"))
    explore_mu: float = _f(1.5, _rule(lambda v: 1.0 < v <= 100.0, "must be in (1, 100]"))
    n_step: int = _f(3, _rule(lambda v: 1 <= v <= 100, "must be between 1 and 100"))
    gamma: float = _f(0.98, _rule(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    block_size: int = _f(256, _rule(lambda v: 1 <= v <= 1_000_000, "must be between 1 and 1000000"))
    weights_update_period: int = _f(50, positive())
    max_backlog_blocks: int = _f(64, positive())
    num_cpus: float = _f(0.5, non_negative())
    spread: bool = _f(True)


@dataclass
class ReplayConfig:
    shards: int = _f(1, _rule(lambda v: 1 <= v <= 256, "must be between 1 and 256"))
    capacity: int = _f(50_000, _rule(lambda v: v >= 1, "must be >= 1"))
    redis_urls: list[str] = _f([])
    priority_alpha: float = _f(0.6, in_range(0.0, 1.0))
    beta_start: float = _f(0.4, in_range(0.0, 1.0))
    beta_anneal_updates: int = _f(20_000, positive())
    priority_eps: float = _f(1e-6, positive())
    samples_per_insert: float = _f(8.0, positive())
    min_size_to_sample: int = _f(2000, positive())
    error_buffer: float = _f(20_000.0, positive())
    num_cpus: float = _f(0.5, non_negative())
    external: bool = _f(False)
    namespace: Optional[str] = _f(None, _rule(lambda v: v is None or (0 < len(v) <= 64 and all(
        c.isalnum() or c in "-_." for c in v)), "must be 1-64 letters, digits, '-', '_' or '.'"))


@dataclass
class LearnerConfig:
    batch_size: int = _f(512, _rule(lambda v: 1 <= v <= 1_000_000, "must be between 1 and 1000000"))
    device: str = _f("auto", one_of("auto", "cpu", "cuda"))
    gpu_wait_s: float = _f(600.0, positive())
    lr: float = _f(2e-3, positive())
    hidden_sizes: list[int] = _f([64, 64], _rule(lambda v: len(v) >= 1 and all(h > 0 for h in v),
                                                  "must be a non-empty list of positive integers"))
    dueling: bool = _f(False)
    target_update_period: int = _f(100, positive())
    target_tau: float = _f(0.0, in_range(0.0, 1.0))
    grad_clip: float = _f(10.0, non_negative())
    publish_every: int = _f(25, positive())
    prefetch: int = _f(8, _rule(lambda v: 1 <= v <= 64, "must be between 1 and 64"))
    batches_per_request: int = _f(8, _rule(lambda v: 1 <= v <= 64, "must be between 1 and 64"))
    checkpoint_every_s: float = _f(30.0, positive())
    num_cpus: float = _f(1.0, non_negative())
    torch_threads: int = _f(1, positive())
    compile: bool = _f(False)
    cuda_graphs: bool = _f(True)
    custom_resource: Optional[str] = _f(None)


@dataclass
class EvalConfig:
    every_seconds: float = _f(10.0, non_negative())
    episodes: int = _f(100, positive())


@dataclass
class TrainConfig:
    max_seconds: Optional[float] = _f(600.0, positive())
    max_env_steps: Optional[int] = _f(None, positive())
    stop_at_return: Optional[float] = _f(None)
    progress_every_s: float = _f(5.0, positive())


@dataclass
class RedisConfig:
    server_path: Optional[str] = _f(None)
    host: str = _f("127.0.0.1", _rule(lambda v: len(v) > 0, "must not be empty"))
    appendfsync: str = _f("everysec", one_of("everysec", "always", "no"))
    unreachable_timeout_s: float = _f(60.0, positive())


@dataclass
class SupervisionConfig:
    max_restarts: int = _f(20, non_negative())
    window_s: float = _f(300.0, positive())
    heartbeat_timeout_s: float = _f(30.0, positive())


@dataclass
class MetricsConfig:
    enabled: bool = _f(True)
    host: str = _f("127.0.0.1", _rule(lambda v: len(v) > 0, "must not be empty"))
    port: int = _f(9400, in_range(0, 65535))


@dataclass
class LoggingConfig:
    tensorboard: bool = _f(False)


@dataclass
class RayConfig:
    num_cpus: Optional[int] = _f(None, positive())


@dataclass
class Config:
    seed: int = _f(0, non_negative())
    env: EnvConfig = field(default_factory=EnvConfig)
    actors: ActorsConfig = field(default_factory=ActorsConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)
    ray: RayConfig = field(default_factory=RayConfig)

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
        tp, getattr(tp, "__name__", str(tp)))


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
        if name not in data:
            continue
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
        raise ConfigError(f"replay.redis_urls: has {len(cfg.replay.redis_urls)} URLs but "
                          f"replay.shards is {cfg.replay.shards}; give one URL per shard or none")
    if cfg.replay.external and cfg.replay.namespace is None:
        raise ConfigError("replay.namespace: replay.external shards need a namespace that the run and every "
                          "`apexq replay-server` are given (e.g. --set replay.namespace=myrun)")
    per_shard = cfg.replay.capacity // cfg.replay.shards
    if per_shard < cfg.learner.batch_size:
        raise ConfigError(f"replay.capacity: {cfg.replay.capacity} over {cfg.replay.shards} shards "
                          f"holds fewer than learner.batch_size={cfg.learner.batch_size} per shard")
    if cfg.replay.min_size_to_sample > per_shard:
        raise ConfigError(f"replay.min_size_to_sample: {cfg.replay.min_size_to_sample} exceeds the "
                          f"per-shard capacity {per_shard}; sampling could never start")
    if cfg.train.max_seconds is None and cfg.train.max_env_steps is None and cfg.train.stop_at_return is None:
        raise ConfigError("train.max_seconds: at least one of train.max_seconds, train.max_env_steps "
                          "or train.stop_at_return must be set, or the run never ends")
    from apexq.replay_server.rate_limiter import SampleToInsertRatio, RateLimiterError
    try:
        SampleToInsertRatio(cfg.replay.samples_per_insert, cfg.replay.min_size_to_sample,
                            cfg.replay.error_buffer).check_progress(
            sample_batch=cfg.learner.batch_size * cfg.learner.batches_per_request,
            insert_batch=cfg.actors.block_size)
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
MAX_CONFIG_DEPTH = 32       # sections are two levels deep; deeper nesting is never a config


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


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                base: Optional[dict] = None) -> Config:
    """Read YAML (or start from ``base``), apply ``KEY=VALUE`` overrides, validate."""
    if base is not None:
        data = base
    else:
        path = Path(path) if path else DEFAULT_CONFIG
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"--config {path}: cannot read ({exc.strerror or exc})") from None
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"--config {path}: larger than {MAX_CONFIG_BYTES} bytes; not a config")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[:exc.start].count(b"\n") + 1
            raise ConfigError(f"--config {path}: line {line} is not UTF-8 text (byte 0x{raw[exc.start]:02x})") from None
        data = _parse_yaml(text, f"--config {path}") or {}
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
                    raise ConfigError(f"{'.'.join(parts[:i + 1])}: is not a section")
            node = nxt
        node[parts[-1]] = value
    cfg = _build(Config, data, "")
    _cross_checks(cfg)
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
