"""The search space of ``apexq tune``: a small YAML file, checked against the config before anything starts.

Each top-level key is a dotted config key; its value says how to draw it::

    learner.lr:              {type: loguniform, low: 1.0e-4, high: 3.0e-3}  # log-uniform in [low, high]
    replay.samples_per_insert: {type: uniform, low: 2, high: 16}            # uniform in [low, high]
    actors.n_step:           {type: randint, low: 1, high: 5}               # integers, both ends included
    learner.batch_size:      {type: choice, values: [128, 256, 512]}        # one of the values
    eval.every_seconds:      {type: choice, values: [15.0]}                 # one value: fixed for every trial

Every value a key can take is checked with :func:`.config.load_config`, as ``--set KEY=VALUE`` on
the base config would be: both ends of a range, every choice, and for ``uniform``/``loguniform`` a
fractional value (so a range over an integer key is refused and ``randint`` named instead). A
problem is one :class:`~.config.ConfigError` line that names the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from .config import Config, ConfigError, load_config, parse_override

KINDS = ("choice", "loguniform", "randint", "uniform")
# Keys the search sets itself for every run, so a space may not draw them.
SET_BY_TUNE = {
    "seed": "each trial runs seeds 0 .. --seeds-1",
    "train.max_seconds": "every run gets --budget seconds",
    "train.stop_at_return": "the objective is the time to reach the base config's value",
}
EXAMPLE = "{type: loguniform, low: 1.0e-4, high: 3.0e-3}"


def value_text(value: Any) -> str:
    """``value`` as written after ``--set KEY=``: one line of YAML that reads back as the same value."""
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text:  # YAML 1.1 reads 1e-05 as a string; 1.0e-05 is a number
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
    return text[: -len("\n...")].strip() if text.endswith("\n...") else text


@dataclass(frozen=True)
class Param:
    """One searched key. ``choice`` values are kept as their ``--set`` texts (Optuna's categories
    must be scalars; a choice may be a list such as ``learner.hidden_sizes``)."""

    key: str
    kind: str
    low: Optional[float] = None
    high: Optional[float] = None
    choices: tuple = ()

    def distribution(self):
        """The Optuna distribution Tune's OptunaSearch draws this key from."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "choice":
            return CategoricalDistribution(list(self.choices))
        if self.kind == "randint":
            return IntDistribution(int(self.low), int(self.high))  # Optuna's integer range includes high
        return FloatDistribution(float(self.low), float(self.high), log=self.kind == "loguniform")

    def set_text(self, drawn: Any) -> str:
        """The ``--set`` text of a value drawn for this key."""
        return drawn if self.kind == "choice" else value_text(drawn)

    def drawn_from_text(self, text: str) -> Any:
        """A value as ``trials.csv`` holds it, back as drawn; ValueError if this key could not have drawn it."""
        if self.kind == "choice":
            if text not in self.choices:
                raise ValueError(f"{text!r} is not one of the choices {', '.join(self.choices)}")
            return text
        assert self.low is not None and self.high is not None
        value: float = int(text) if self.kind == "randint" else float(text)
        if not self.low <= value <= self.high:
            raise ValueError(f"{text} is outside {value_text(self.low)} .. {value_text(self.high)}")
        return value

    def config_value(self, drawn: Any) -> Any:
        """The drawn value as the config holds it (what best.yaml writes)."""
        return parse_override(f"{self.key}={self.set_text(drawn)}")[1]


def _number(key: str, kind: str, name: str, value: Any, integer: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}: {kind} {name} must be a number, got {value!r}")
    if integer and not float(value).is_integer():
        raise ConfigError(f"{key}: randint {name} must be an integer, got {value!r}")
    return int(value) if integer else value


def parse_param(key: Any, spec: Any) -> Param:
    """One entry of the space file, checked for form only (not yet against the config)."""
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{key!r}: a key must be a dotted config key such as learner.lr")
    if key in SET_BY_TUNE:
        raise ConfigError(f"{key}: set by apexq tune ({SET_BY_TUNE[key]}); it cannot be searched")
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"{key}: expected a mapping such as {EXAMPLE}, got {spec!r}")
    kind = spec["type"]
    if kind not in KINDS:
        raise ConfigError(f"{key}: unknown type {kind!r} (one of {', '.join(KINDS)})")
    fields = {"values"} if kind == "choice" else {"low", "high"}
    extra = sorted(set(spec) - fields - {"type"}, key=str)
    if extra:
        raise ConfigError(f"{key}: unknown field {extra[0]!r} for {kind} (it takes {', '.join(sorted(fields))})")
    missing = sorted(fields - set(spec))
    if missing:
        raise ConfigError(f"{key}: {kind} needs {' and '.join(missing)}")
    if kind == "choice":
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{key}: choice values must be a non-empty list, got {values!r}")
        texts = tuple(value_text(v) for v in values)
        if len(set(texts)) < len(texts):
            raise ConfigError(f"{key}: choice values repeat a value: {values!r}")
        return Param(key, kind, choices=texts)
    low = _number(key, kind, "low", spec["low"], kind == "randint")
    high = _number(key, kind, "high", spec["high"], kind == "randint")
    if low >= high:
        raise ConfigError(f"{key}: empty range: low {low!r} >= high {high!r}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{key}: loguniform needs low > 0, got {low!r}")
    return Param(key, kind, low, high)


def _fraction_inside(low: float, high: float) -> float:
    """A value strictly between low and high that is not an integer."""
    for x in (math.floor(low) + 0.5, math.floor(low) + 1.5, low + (high - low) / 3):
        if low < x < high and not float(x).is_integer():
            return x
    return (low + high) / 2


def _leaves(tree: dict, prefix: str = "") -> set:
    out = set()
    for k, v in tree.items():
        out |= _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


def check_param(param: Param, base_config: Optional[str], base: Config) -> None:
    """Every kind of value ``param`` draws must be one the config takes over ``base_config``."""
    key = param.key
    leaves = _leaves(base.to_dict())
    if key not in leaves:
        inside = sorted(k for k in leaves if k.startswith(key + "."))
        if inside:
            raise ConfigError(f"{key}: is a section, not a key; name one of its keys, e.g. {inside[0]}")
        try:
            load_config(base_config, [f"{key}=0"])
        except ConfigError as exc:  # the config's own line, with its "did you mean"
            raise ConfigError(str(exc) if str(exc).startswith(key + ":") else f"{key}: unknown key ({exc})") from None
        raise ConfigError(f"{key}: unknown key")
    if param.kind == "choice":
        probes = [(f"value {t}", t) for t in param.choices]
    else:
        probes = [
            (f"low {value_text(param.low)}", value_text(param.low)),
            (f"high {value_text(param.high)}", value_text(param.high)),
        ]
    for what, text in probes:
        try:
            load_config(base_config, [f"{key}={text}"])
        except ConfigError as exc:
            raise ConfigError(f"{key}: {param.kind} {what} is refused by the config ({exc})") from None
    if param.kind in ("uniform", "loguniform") and param.low is not None and param.high is not None:
        x = _fraction_inside(param.low, param.high)
        try:
            load_config(base_config, [f"{key}={value_text(x)}"])
        except ConfigError as exc:
            raise ConfigError(
                f"{key}: {param.kind} draws fractional values such as {x:g}, which the config "
                f"refuses ({exc}); use randint or choice"
            ) from None


def load_space(path: str | Path, base_config: Optional[str]) -> list[Param]:
    """The parameters of the space file at ``path``, each checked against ``base_config``."""
    where = f"--space {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(f"{where}:{mark.line + 1 if mark else '?'} is not valid YAML") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{where}: expected a mapping of config keys to ranges, e.g. learner.lr: {EXAMPLE}")
    base = load_config(base_config)
    params = []
    for key, spec in data.items():
        try:
            param = parse_param(key, spec)
            check_param(param, base_config, base)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        params.append(param)
    return params


def _flat(tree: Any, prefix: str = "") -> dict:
    """A config tree as ``{dotted key: value}`` (lists stay values)."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def inside(param: Param, value: Any) -> Any:
    """``value`` (as the config holds it) as ``param`` would draw it; ValueError if it cannot."""
    if param.kind == "choice":
        text = value_text(value)
        if text not in param.choices:
            raise ValueError(f"{text} is not one of the choices {', '.join(param.choices)}")
        return text
    assert param.low is not None and param.high is not None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{value!r} is not a number")
    if param.kind == "randint" and not float(value).is_integer():
        raise ValueError(f"{value!r} is not an integer")
    if not param.low <= value <= param.high:
        raise ValueError(
            f"{value_text(value)} is outside the {param.kind} range {value_text(param.low)} .. {value_text(param.high)}"
        )
    return int(value) if param.kind == "randint" else float(value)


def load_start_point(path: str | Path, params: list[Param], base_config: Optional[str]) -> dict:
    """``--start-at FILE``: a config overlay (such as a hand-set config, or another search's best.yaml)
    read over ``base_config``, as the values the search's first trials draw: ``{key: drawn}`` for
    every searched key (a key the file leaves out has the base config's value, or, where the space
    cannot draw that, the one value a one-value choice fixes it to). Each value must be
    one the space can draw, and the file may not change a key the space does not search (the trials
    would not run it). A problem is one :class:`~.config.ConfigError` line naming the file and key."""
    from .config import _overlay, _read_yaml_file

    where = f"--start-at {path}"
    base_data = _read_yaml_file(Path(base_config), f"--config {base_config}") if base_config else {}
    over = _read_yaml_file(Path(path), where)
    if over is not None and not isinstance(over, dict):
        raise ConfigError(f"{where}: expected a config overlay (a mapping such as learner: {{lr: 0.001}})")
    try:
        point = _flat(load_config(base=_overlay(base_data or {}, over)).to_dict())
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    base = _flat(load_config(base_config).to_dict())
    searched = {p.key for p in params}
    for key, value in point.items():
        if key not in searched and value != base.get(key):
            raise ConfigError(
                f"{where}: {key} is {value_text(value)} there but {value_text(base.get(key))} in the base "
                f"config, and the space does not search it (a trial runs the base config with the searched keys only)"
            )
    in_file = set(_flat(over or {}))
    drawn = {}
    for p in params:
        try:
            drawn[p.key] = inside(p, point[p.key])
        except ValueError as exc:
            if p.key not in in_file and p.kind == "choice" and len(p.choices) == 1:
                drawn[p.key] = p.choices[0]  # the key the space fixes for every trial, which FILE leaves to it
                continue
            raise ConfigError(f"{where}: {p.key}: {exc}; the space cannot draw it") from None
    return drawn
