"""Atomic, complete checkpoints, loaded with ``weights_only=True`` (no arbitrary unpickling).

A distributed learner never writes one to disk: it hands :func:`dumps`' bytes to the driver,
which writes them into the run directory (see :mod:`learner.artifacts`), and a resumed or
restarted learner is handed the bytes back and reads them with :func:`loads`.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    pass


def save_atomic(obj: dict, path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def dumps(obj: dict) -> bytes:
    """The checkpoint file's bytes (what :func:`save_atomic` writes)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there")
    return loads(path.read_bytes(), str(path))


def loads(data: bytes, where: str) -> dict:
    """A checkpoint from its bytes, checked to be an apexq checkpoint; ``where`` names it in errors."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CheckpointError(f"{where}: expected bytes, got {type(data).__name__}")
    try:
        with warnings.catch_warnings():  # a garbage file is one error line, not torch's warnings first
            warnings.simplefilter("ignore")
            obj = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{where}: not a readable apexq checkpoint ({type(exc).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != "apexq-checkpoint-v1":
        raise CheckpointError(f"{where}: not an apexq checkpoint")
    return obj


def policy_weights(state: dict, path: str | Path) -> tuple[dict, dict]:
    """(architecture, name -> float32 numpy array) of a loaded checkpoint's online network, checked.

    A checkpoint is a dict of what :meth:`learner.learner.Learner.state` wrote; one with missing
    keys, odd types or weights of the wrong names or shapes gives a :class:`CheckpointError`
    naming the key, rather than a ``KeyError`` from deep inside ``load_state_dict``.
    """
    from .policy_file import PolicyFileError, check_architecture, check_finite, check_tensors

    where = str(path)
    for key, kind in (("settings", dict), ("spec", dict), ("online", dict), ("config", dict), ("updates", int)):
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise CheckpointError(f"{where}: {key}: expected {kind.__name__}, got {type(state.get(key)).__name__}")
    s, spec, online = state["settings"], state["spec"], state["online"]
    arch = {
        "obs_dim": spec.get("obs_dim"),
        "num_actions": spec.get("num_actions"),
        "hidden_sizes": list(s["hidden_sizes"]) if isinstance(s.get("hidden_sizes"), (list, tuple)) else None,
        "dueling": s.get("dueling"),
    }
    env = state["config"].get("env")
    arch["env_id"] = env.get("id") if isinstance(env, dict) and isinstance(env.get("id"), str) else None
    try:
        shapes = check_architecture(arch, where)
        if not all(isinstance(v, torch.Tensor) for v in online.values()):
            raise PolicyFileError(f"{where}: online: holds something other than tensors")
        check_tensors({k: (str(v.dtype), tuple(v.shape)) for k, v in online.items()}, shapes, f"{where}: online")
        weights = {k: online[k].numpy() for k in shapes}
        check_finite(weights, f"{where}: online")
    except PolicyFileError as exc:
        raise CheckpointError(str(exc)) from None
    return arch, weights
