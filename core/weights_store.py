"""Versioned weights in Redis, serialized with safetensors (plain tensors, never pickle).

The learner publishes; actors and the driver's evaluation fetch. Importing this module does not
import torch: they read the weights as numpy arrays (``fetch_if_newer(..., as_numpy=True)``);
only the learner encodes them from tensors.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class WeightsKeys:
    """The Redis keys of one run's weights (the namespace is the run id, as for the replay keys)."""

    namespace: str

    @property
    def blob(self) -> str:
        """The newest weights, as safetensors bytes."""
        return f"apexq:{self.namespace}:weights"

    @property
    def version(self) -> str:
        """Their version: read first, so a reader fetches the blob only when it is news."""
        return f"apexq:{self.namespace}:weights_version"


def encode_weights(state_dict: dict, version: int) -> bytes:
    from safetensors.torch import save as st_save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    return st_save(tensors, metadata={"version": str(int(version))})


def decode_weights(blob: bytes, as_numpy: bool = False) -> tuple[int, dict]:
    """(version, state dict of torch tensors, or of numpy arrays with ``as_numpy``)."""
    if len(blob) < 8:
        raise ValueError("weights blob is truncated")
    (n,) = struct.unpack_from("<Q", blob, 0)
    header = json.loads(blob[8 : 8 + n])
    version = int(header.get("__metadata__", {}).get("version", "0"))
    if as_numpy:
        from safetensors.numpy import load as st_load_numpy

        return version, st_load_numpy(blob)
    from safetensors.torch import load as st_load

    return version, st_load(blob)


def publish(redis_client, keys: WeightsKeys, state_dict: dict, version: int) -> int:
    blob = encode_weights(state_dict, version)
    pipe = redis_client.pipeline(transaction=True)
    pipe.set(keys.blob, blob)
    pipe.set(keys.version, int(version))
    pipe.execute()
    return len(blob)


def published_version(redis_client, keys: WeightsKeys) -> int:
    v = redis_client.get(keys.version)
    return int(v) if v is not None else -1


def fetch_if_newer(redis_client, keys: WeightsKeys, have: int, as_numpy: bool = False) -> Optional[tuple[int, dict]]:
    """(version, state_dict) when Redis holds a version newer than ``have``; else None."""
    if published_version(redis_client, keys) <= have:
        return None
    blob = redis_client.get(keys.blob)
    if blob is None:
        return None
    version, state = decode_weights(blob, as_numpy)
    if version <= have:
        return None
    return version, state
