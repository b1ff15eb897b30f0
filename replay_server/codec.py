"""The replay wire format: versioned binary blocks of transitions. No pickle anywhere.

A block is a 36-byte little-endian header followed by columnar little-endian arrays::

    magic      4s   b"APXB"
    version    u8   1
    obs_dtype  u8   1 = float32
    obs_dim    u16  features per observation
    count      u32  transitions in the block
    actor_id   u32
    flags      u32  reserved, 0
    weights_version u64  version of the weights that acted
    block_seq  u64  per-actor sequence number of the block
    -- columns, each `count` long --
    obs        f32[count, obs_dim]
    action     i32[count]
    ret        f32[count]   n-step discounted return
    discount   f32[count]   bootstrap discount (gamma**k, 0 after a termination)
    next_obs   f32[count, obs_dim]
    priority   f32[count]   initial priority (> 0)

Decoding validates everything a forged block could get wrong and raises :class:`BlockError`
with a short machine-readable ``reason`` (used as a metric label) and a human ``detail``.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"APXB"
VERSION = 1
OBS_FLOAT32 = 1
HEADER = struct.Struct("<4sBBHIIIQQ")
HEADER_SIZE = HEADER.size  # 36
MAX_OBS_DIM = 4096
MAX_COUNT = 1 << 20

REASONS = ("missing_field", "too_short", "bad_magic", "bad_version", "bad_dtype", "bad_shape",
           "bad_length", "non_finite", "bad_action", "bad_discount", "bad_priority")


class BlockError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Block:
    obs: np.ndarray        # float32 [count, obs_dim]
    action: np.ndarray     # int32 [count]
    ret: np.ndarray        # float32 [count]
    discount: np.ndarray   # float32 [count]
    next_obs: np.ndarray   # float32 [count, obs_dim]
    priority: np.ndarray   # float32 [count]
    actor_id: int = 0
    weights_version: int = 0
    block_seq: int = 0

    def __len__(self) -> int:
        return int(self.action.shape[0])


def block_nbytes(count: int, obs_dim: int) -> int:
    return HEADER_SIZE + count * (8 * obs_dim + 16)


def encode_block(block: Block) -> bytes:
    count = len(block)
    obs = np.ascontiguousarray(block.obs, dtype="<f4")
    if obs.ndim != 2 or obs.shape[0] != count:
        raise ValueError(f"obs must be [count, obs_dim], got {obs.shape}")
    obs_dim = obs.shape[1]
    header = HEADER.pack(MAGIC, VERSION, OBS_FLOAT32, obs_dim, count, block.actor_id, 0,
                         block.weights_version, block.block_seq)
    parts = [header, obs.tobytes(),
             np.ascontiguousarray(block.action, dtype="<i4").tobytes(),
             np.ascontiguousarray(block.ret, dtype="<f4").tobytes(),
             np.ascontiguousarray(block.discount, dtype="<f4").tobytes(),
             np.ascontiguousarray(block.next_obs, dtype="<f4").reshape(count, obs_dim).tobytes(),
             np.ascontiguousarray(block.priority, dtype="<f4").tobytes()]
    return b"".join(parts)


def decode_block(data: bytes, obs_dim: int | None = None, num_actions: int | None = None) -> Block:
    """Parse and validate one block; arrays are read-only views into ``data``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BlockError("missing_field", "entry has no block payload")
    if len(data) < HEADER_SIZE:
        raise BlockError("too_short", f"{len(data)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, dtype, dim, count, actor_id, _flags, wver, seq = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise BlockError("bad_magic", f"magic {magic!r} is not {MAGIC!r}")
    if version != VERSION:
        raise BlockError("bad_version", f"format version {version} is not supported (expected {VERSION})")
    if dtype != OBS_FLOAT32:
        raise BlockError("bad_dtype", f"observation dtype code {dtype} is not float32 (1)")
    if dim < 1 or dim > MAX_OBS_DIM or (obs_dim is not None and dim != obs_dim):
        want = obs_dim if obs_dim is not None else f"1..{MAX_OBS_DIM}"
        raise BlockError("bad_shape", f"obs_dim {dim}, expected {want}")
    if count < 1 or count > MAX_COUNT:
        raise BlockError("bad_shape", f"count {count} outside 1..{MAX_COUNT}")
    expected = block_nbytes(count, dim)
    if len(data) != expected:
        raise BlockError("bad_length", f"{len(data)} bytes, header says {expected} "
                                       f"({count} transitions of obs_dim {dim})")
    buf = memoryview(data)
    off = HEADER_SIZE

    def take(dt: str, n: int) -> np.ndarray:
        nonlocal off
        arr = np.frombuffer(buf, dtype=dt, count=n, offset=off)
        off += arr.nbytes
        return arr

    obs = take("<f4", count * dim).reshape(count, dim)
    action = take("<i4", count)
    ret = take("<f4", count)
    discount = take("<f4", count)
    next_obs = take("<f4", count * dim).reshape(count, dim)
    priority = take("<f4", count)
    # One pass over all float columns for NaN/inf: the sum of a finite array is finite unless it
    # overflows, in which case the slow exact check decides.
    floats = (obs, ret, discount, next_obs, priority)
    if not all(np.isfinite(a.sum(dtype=np.float64)) or np.isfinite(a).all() for a in floats):
        bad = [n for n, a in zip(("obs", "ret", "discount", "next_obs", "priority"), floats)
               if not np.isfinite(a).all()]
        if bad:
            raise BlockError("non_finite", f"NaN or infinity in {', '.join(bad)}")
    lo, hi = int(action.min()), int(action.max())
    if lo < 0 or (num_actions is not None and hi >= num_actions):
        raise BlockError("bad_action", f"actions span {lo}..{hi}, valid is 0..{(num_actions or 1) - 1}")
    if float(discount.min()) < 0.0 or float(discount.max()) > 1.0:
        raise BlockError("bad_discount", "bootstrap discounts must lie in [0, 1]")
    if not float(priority.min()) > 0.0:
        raise BlockError("bad_priority", "initial priorities must be > 0")
    return Block(obs, action, ret, discount, next_obs, priority, actor_id, wver, seq)
