"""The policy as data: ``policy.safetensors`` (the weights) and ``policy.json`` (what network they fit).

Neither format can carry code: safetensors is a JSON header plus raw little-endian tensors, and
the description is plain JSON. ``apexq evaluate`` rebuilds the network from these two and never
loads ``policy.pt2`` (``torch.export.load`` unpickles parts of its archive, so a crafted file runs
its payload). Everything read is checked before anything is allocated from it: the description's
fields for type and range, then every tensor's name, dtype and shape in the safetensors header
against the description, then the values for being finite. Any mismatch is a
:class:`PolicyFileError` whose message is one line naming the file and the field.

Reading needs numpy and safetensors only (no torch), so evaluation runs the same numpy forward
pass (:class:`actors.policy.NumpyQPolicy`) as the run's own evaluations and reproduces them exactly.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from apexq.core.network_layout import parameter_shapes

FORMAT = "apexq-policy-v1"
MAX_WIDTH = 65_536  # observation size, action count and each hidden layer at most this
MAX_LAYERS = 64
MAX_PARAMETERS = 100_000_000
MAX_JSON_BYTES = 1 << 20
FORWARD = (
    "x = (obs - obs_center) / obs_half_range; x = relu(body.{2i}.weight @ x + body.{2i}.bias) for each "
    "hidden layer i; q = head(x), or value(x) + advantage(x) - mean(advantage(x)) when dueling"
)


class PolicyFileError(ValueError):
    """A policy file that cannot be used; the message is one line naming the file and the field."""


def describe(
    net, env_id: str | None = None, weights_version: int | None = None, eval_return: float | None = None
) -> dict:
    """The ``policy.json`` description of a :class:`learner.network.QNetwork` (and its scaling)."""
    return {
        "format": FORMAT,
        "env_id": env_id,
        "obs_dim": int(net.obs_center.shape[0]),
        "num_actions": int(net.num_actions),
        "hidden_sizes": [int(m.out_features) for m in net._hidden],
        "dueling": bool(net.dueling),
        "obs_center": [float(v) for v in net.obs_center.cpu()],
        "obs_half_range": [float(v) for v in net.obs_half_range.cpu()],
        "dtype": "float32",
        "weights_version": None if weights_version is None else int(weights_version),
        "eval_return": None if eval_return is None else float(eval_return),
        "forward": FORWARD,
    }


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync, then rename over it: all or nothing."""
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # as any file written with open(): others may read a policy
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_policy_files(net, stem: str | Path, **info) -> tuple[Path, Path]:
    """Write ``<stem>.safetensors`` then ``<stem>.json`` for ``net`` (``info``: see :func:`describe`)."""
    from safetensors.torch import save

    stem = Path(stem)
    state = {k: v.detach().to("cpu", dtype=v.dtype).contiguous() for k, v in net.state_dict().items()}
    weights, desc = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    write_atomic(weights, save(state, metadata={"format": FORMAT}))
    write_atomic(desc, (json.dumps(describe(net, **info), indent=1) + "\n").encode())
    return weights, desc


def _int(d: dict, key: str, lo: int, hi: int, where: str) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise PolicyFileError(f"{where}: {key}: expected an integer between {lo} and {hi}, got {v!r:.60}")
    return v


def _floats(d: dict, key: str, n: int, where: str, positive: bool = False) -> np.ndarray:
    v = d.get(key)
    ok = (
        isinstance(v, list)
        and len(v) == n
        and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and (x > 0 or not positive)
            for x in v
        )
    )
    if not ok:
        what = "positive" if positive else "finite"
        raise PolicyFileError(f"{where}: {key}: expected a list of {n} {what} numbers, got {v!r:.60}")
    return np.asarray(v, np.float32)


def check_architecture(d: dict, where: str) -> dict:
    """The network fields of a description or checkpoint, checked for type and range; name -> shape."""
    obs_dim = _int(d, "obs_dim", 1, MAX_WIDTH, where)
    num_actions = _int(d, "num_actions", 1, MAX_WIDTH, where)
    hidden = d.get("hidden_sizes")
    if (
        not isinstance(hidden, list)
        or len(hidden) > MAX_LAYERS
        or not all(isinstance(h, int) and not isinstance(h, bool) and 1 <= h <= MAX_WIDTH for h in hidden)
    ):
        raise PolicyFileError(
            f"{where}: hidden_sizes: expected a list of at most {MAX_LAYERS} integers between 1 "
            f"and {MAX_WIDTH}, got {hidden!r:.60}"
        )
    if not isinstance(d.get("dueling"), bool):
        raise PolicyFileError(f"{where}: dueling: expected true or false, got {d.get('dueling')!r:.60}")
    shapes = parameter_shapes(obs_dim, num_actions, hidden, d["dueling"])
    if sum(math.prod(s) for s in shapes.values()) > MAX_PARAMETERS:
        raise PolicyFileError(f"{where}: hidden_sizes: {hidden} makes more than {MAX_PARAMETERS} parameters")
    return shapes


def check_tensors(found: dict, shapes: dict, where: str) -> None:
    """``found``: name -> (dtype name, shape). Names, dtypes and shapes must be exactly ``shapes``'."""
    missing, extra = sorted(set(shapes) - set(found)), sorted(map(str, set(found) - set(shapes)))
    if missing or extra:
        raise PolicyFileError(
            f"{where}: tensors do not fit the network described: missing {missing[:4]}, "
            f"unexpected {str(extra[:4])[:200]}"
        )
    for name, shape in shapes.items():
        dtype, got = found[name]
        if dtype not in ("F32", "float32", "torch.float32"):
            raise PolicyFileError(f"{where}: {name}: dtype {dtype}, expected float32")
        if tuple(got) != tuple(shape):
            raise PolicyFileError(f"{where}: {name}: shape {tuple(got)}, expected {tuple(shape)}")


def check_finite(state: dict, where: str) -> None:
    for name, a in state.items():
        if not np.isfinite(a).all():
            raise PolicyFileError(f"{where}: {name}: holds NaN or infinite values")


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def read_description(path: Path) -> tuple[dict, dict]:
    """``policy.json`` checked field by field: (description, name -> expected shape)."""
    where = str(path)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise PolicyFileError(f"{where}: larger than {MAX_JSON_BYTES} bytes; not a policy description")
        d = json.loads(path.read_bytes(), parse_constant=_no_constant)
    except (OSError, ValueError, RecursionError) as exc:
        if isinstance(exc, PolicyFileError):
            raise
        raise PolicyFileError(f"{where}: not readable JSON ({type(exc).__name__})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise PolicyFileError(f"{where}: format: expected {FORMAT!r}; not an apexq policy description")
    shapes = check_architecture(d, where)
    for key in ("obs_center", "obs_half_range"):
        _floats(d, key, d["obs_dim"], where, positive=key == "obs_half_range")
    env_id = d.get("env_id")
    if env_id is not None and not (isinstance(env_id, str) and 0 < len(env_id) <= 200):
        raise PolicyFileError(f"{where}: env_id: expected a gymnasium id or null, got {env_id!r:.60}")
    if d.get("weights_version") is not None:
        _int(d, "weights_version", 0, 2**62, where)
    ev = d.get("eval_return")
    if ev is not None and (isinstance(ev, bool) or not isinstance(ev, (int, float)) or not math.isfinite(ev)):
        raise PolicyFileError(f"{where}: eval_return: expected a finite number or null, got {ev!r:.60}")
    return d, shapes


def read_policy_files(stem: str | Path) -> tuple[dict, dict]:
    """(description, name -> float32 numpy array) from ``<stem>.json`` and ``<stem>.safetensors``."""
    from safetensors import safe_open

    stem = Path(stem)
    desc_path, weights_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    for p in (desc_path, weights_path):
        if not p.is_file():
            raise PolicyFileError(f"{p}: missing (a policy is {desc_path.name} and {weights_path.name} together)")
    desc, shapes = read_description(desc_path)
    where = str(weights_path)
    try:
        with safe_open(str(weights_path), framework="np") as f:
            check_tensors(
                {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()},
                shapes,
                f"{where} (against {desc_path.name})",
            )
            state = {k: f.get_tensor(k) for k in shapes}
    except PolicyFileError:
        raise
    except Exception as exc:  # SafetensorError and whatever a truncated or garbage file makes it raise
        raise PolicyFileError(f"{where}: not a readable safetensors file ({type(exc).__name__})") from None
    check_finite(state, where)
    for key in ("obs_center", "obs_half_range"):
        if not np.array_equal(state[key], np.asarray(desc[key], np.float32)):
            raise PolicyFileError(f"{desc_path}: {key}: differs from the {key} tensor in {weights_path.name}")
    return desc, state
