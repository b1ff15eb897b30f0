"""The replay wire format: versioned binary blocks of transitions. No pickle anywhere.

A block is a 36-byte little-endian header followed by columnar little-endian arrays::

    magic      4s   b"APXB"
    version    u8   1
    obs_dtype  u8   1 = float32
    obs_dim    u16  features per observation
    count      u32  transitions in the block
    actor_id   u32
    flags      u32  reserved: must be 0 (a block with any flag set is rejected)
    weights_version u64  version of the weights that acted
    block_seq  u64  per-actor sequence number of the block
    -- columns, each `count` long --
    obs        f32[count, obs_dim]
    action     i32[count]
    ret        f32[count]   n-step discounted return
    discount   f32[count]   bootstrap discount (gamma**k, 0 after a termination)
    next_obs   f32[count, obs_dim]
    priority   f32[count]   initial priority, 0 < p <= MAX_PRIORITY

Decoding validates everything a forged block could get wrong and raises :class:`BlockError`
with a short machine-readable ``reason`` (used as a metric label) and a human ``detail``.

``MAX_PRIORITY`` bounds every priority a shard holds. A |TD error| of a million is far beyond
what a working run produces, while a forged 3.4e38 would draw nearly every sample to one item
and leave the other leaves below the sum-tree's float64 resolution: blocks carrying larger
priorities are rejected (``priority_too_large``), priority updates are clamped to it.
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
MAX_PRIORITY = 1e6

REASONS = (
    "missing_field",
    "too_short",
    "bad_magic",
    "bad_version",
    "bad_dtype",
    "bad_shape",
    "bad_length",
    "non_finite",
    "bad_action",
    "bad_discount",
    "bad_priority",
    "bad_flags",
    "priority_too_large",
)


class BlockError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Block:
    obs: np.ndarray  # float32 [count, obs_dim]
    action: np.ndarray  # int32 [count]
    ret: np.ndarray  # float32 [count]
    discount: np.ndarray  # float32 [count]
    next_obs: np.ndarray  # float32 [count, obs_dim]
    priority: np.ndarray  # float32 [count]
    actor_id: int = 0
    weights_version: int = 0
    block_seq: int = 0

    def __len__(self) -> int:
        return int(self.action.shape[0])


def transition_nbytes(obs_dim: int) -> int:
    """Bytes of one transition in a block: obs and next_obs (float32[obs_dim] each), then action,
    ret, discount and priority (4 bytes each)."""
    return 8 * obs_dim + 16


def block_nbytes(count: int, obs_dim: int) -> int:
    return HEADER_SIZE + count * transition_nbytes(obs_dim)


def encode_block(block: Block) -> bytes:
    count = len(block)
    obs = np.ascontiguousarray(block.obs, dtype="<f4")
    if obs.ndim != 2 or obs.shape[0] != count:
        raise ValueError(f"obs must be [count, obs_dim], got {obs.shape}")
    obs_dim = obs.shape[1]
    header = HEADER.pack(
        MAGIC, VERSION, OBS_FLOAT32, obs_dim, count, block.actor_id, 0, block.weights_version, block.block_seq
    )
    parts = [
        header,
        obs.tobytes(),
        np.ascontiguousarray(block.action, dtype="<i4").tobytes(),
        np.ascontiguousarray(block.ret, dtype="<f4").tobytes(),
        np.ascontiguousarray(block.discount, dtype="<f4").tobytes(),
        np.ascontiguousarray(block.next_obs, dtype="<f4").reshape(count, obs_dim).tobytes(),
        np.ascontiguousarray(block.priority, dtype="<f4").tobytes(),
    ]
    return b"".join(parts)


def decode_block(data: object, obs_dim: int | None = None, num_actions: int | None = None) -> Block:
    """Parse and validate one block (whatever a stream entry held); arrays are read-only views into ``data``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BlockError("missing_field", "entry has no block payload")
    if len(data) < HEADER_SIZE:
        raise BlockError("too_short", f"{len(data)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, dtype, dim, count, actor_id, flags, wver, seq = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise BlockError("bad_magic", f"magic {magic!r} is not {MAGIC!r}")
    if version != VERSION:
        raise BlockError("bad_version", f"format version {version} is not supported (expected {VERSION})")
    if dtype != OBS_FLOAT32:
        raise BlockError("bad_dtype", f"observation dtype code {dtype} is not float32 (1)")
    if flags != 0:
        raise BlockError("bad_flags", f"reserved flags {flags:#x} are not 0")
    if dim < 1 or dim > MAX_OBS_DIM or (obs_dim is not None and dim != obs_dim):
        want = obs_dim if obs_dim is not None else f"1..{MAX_OBS_DIM}"
        raise BlockError("bad_shape", f"obs_dim {dim}, expected {want}")
    if count < 1 or count > MAX_COUNT:
        raise BlockError("bad_shape", f"count {count} outside 1..{MAX_COUNT}")
    expected = block_nbytes(count, dim)
    if len(data) != expected:
        raise BlockError(
            "bad_length", f"{len(data)} bytes, header says {expected} ({count} transitions of obs_dim {dim})"
        )
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
        bad = [
            n for n, a in zip(("obs", "ret", "discount", "next_obs", "priority"), floats) if not np.isfinite(a).all()
        ]
        if bad:
            raise BlockError("non_finite", f"NaN or infinity in {', '.join(bad)}")
    lo, hi = int(action.min()), int(action.max())
    if lo < 0 or (num_actions is not None and hi >= num_actions):
        raise BlockError("bad_action", f"actions span {lo}..{hi}, valid is 0..{(num_actions or 1) - 1}")
    if float(discount.min()) < 0.0 or float(discount.max()) > 1.0:
        raise BlockError("bad_discount", "bootstrap discounts must lie in [0, 1]")
    if not float(priority.min()) > 0.0:
        raise BlockError("bad_priority", "initial priorities must be > 0")
    if float(priority.max()) > MAX_PRIORITY:
        raise BlockError(
            "priority_too_large", f"initial priority {float(priority.max()):.3g} exceeds the maximum {MAX_PRIORITY:g}"
        )
    return Block(obs, action, ret, discount, next_obs, priority, actor_id, wver, seq)


def decode_batch(payloads, obs_dim: int, num_actions: int | None = None) -> tuple[list[Block], list[BlockError]]:
    """Decode and validate the payloads of many stream entries at once (what a shard reads in one go).

    Returns the valid blocks in entry order, each run of consecutive valid entries merged into
    one :class:`Block` (their header fields -- actor id, weights version, sequence -- are not
    kept), and one :class:`BlockError` per rejected entry, in entry order. It accepts and
    rejects exactly what :func:`decode_block` does: the entries of the common block size are
    checked together with a few numpy reductions, and any entry that check cannot vouch for
    goes through :func:`decode_block`, which gives the exact reason (or accepts it after all).
    The arrays may be read-only views (into the payloads or a joined copy of them).
    """
    k = len(payloads)
    dim = int(obs_dim)
    per = transition_nbytes(dim)
    length = 0
    if 1 <= dim <= MAX_OBS_DIM:
        for p in payloads:
            if type(p) is bytes and len(p) > HEADER_SIZE and (len(p) - HEADER_SIZE) % per == 0:
                length = len(p)
                break
    count = (length - HEADER_SIZE) // per if length else 0
    if not 1 <= count <= MAX_COUNT:
        length = count = 0
    row_of = [-1] * k
    rows: list = []
    if length:
        for i, p in enumerate(payloads):
            if type(p) is bytes and len(p) == length:
                row_of[i] = len(rows)
                rows.append(p)
    good = np.zeros(0, bool)
    cols: tuple = ()
    if rows:
        arr = np.frombuffer(b"".join(rows), np.uint8).reshape(len(rows), length)
        cols = _columns(arr, dim, count)
        good = _valid_rows(arr, cols, dim, count, num_actions)

    blocks: list[Block] = []
    errors: list[BlockError] = []
    run: list[int] = []
    for i in range(k):
        r = row_of[i]
        if r >= 0 and good[r]:
            run.append(r)
            continue
        try:
            single = decode_block(payloads[i], dim, num_actions)
        except BlockError as err:
            errors.append(err)
            continue
        if run:
            blocks.append(_run_block(cols, run, count))
            run = []
        blocks.append(single)
    if run:
        blocks.append(_run_block(cols, run, count))
    return blocks, errors


def _offsets(dim: int, count: int) -> tuple[int, int, int, int, int, int]:
    o_obs = HEADER_SIZE
    o_act = o_obs + 4 * count * dim
    o_ret = o_act + 4 * count
    o_disc = o_ret + 4 * count
    o_next = o_disc + 4 * count
    o_prio = o_next + 4 * count * dim
    return o_obs, o_act, o_ret, o_disc, o_next, o_prio


def _columns(arr: np.ndarray, dim: int, count: int) -> tuple[np.ndarray, ...]:
    """The six columns of all rows (encoded blocks of one length) of ``arr``, each one contiguous
    array in row order: obs, action, ret, discount, next_obs, priority."""
    o_obs, o_act, o_ret, o_disc, o_next, o_prio = _offsets(dim, count)

    def col(a: int, b: int, dt: str) -> np.ndarray:
        return np.ascontiguousarray(arr[:, a:b].view(dt)).reshape(-1)

    return (
        col(o_obs, o_act, "<f4").reshape(-1, dim),
        col(o_act, o_ret, "<i4"),
        col(o_ret, o_disc, "<f4"),
        col(o_disc, o_next, "<f4"),
        col(o_next, o_prio, "<f4").reshape(-1, dim),
        col(o_prio, arr.shape[1], "<f4"),
    )


def _valid_rows(arr: np.ndarray, cols: tuple, dim: int, count: int, num_actions: int | None) -> np.ndarray:
    """Which rows :func:`decode_block` would surely accept (same header, same checks).

    A handful of reductions over all rows at once decide the common case (every row valid);
    only when one fails are the same checks made row by row.
    """
    obs, act, ret, disc, nxt, prio = cols
    act = act.view("<u4")  # negative actions are huge unsigned
    # magic, version, dtype, obs_dim and count: the first 12 header bytes are fixed; the
    # reserved flags (bytes 16-20) must be 0
    want = np.frombuffer(HEADER.pack(MAGIC, VERSION, OBS_FLOAT32, dim, count, 0, 0, 0, 0)[:12], "<u4")
    head = np.concatenate([arr[:, :12], arr[:, 16:20]], axis=1).view("<u4")
    want = np.append(want, np.uint32(0))
    limit = num_actions if num_actions is not None else 1 << 31
    # a float32 sum is finite only if every term is (an overflowing sum sends the rows to the
    # exact check in decode_block)
    with np.errstate(all="ignore"):
        if (
            (head == want).all()
            and np.isfinite(obs.sum() + nxt.sum() + ret.sum() + disc.sum() + prio.sum())
            and int(act.max()) < limit
            and disc.min() >= 0.0
            and disc.max() <= 1.0
            and prio.min() > 0.0
            and prio.max() <= MAX_PRIORITY
        ):
            return np.ones(arr.shape[0], dtype=bool)
        r = arr.shape[0]
        obs, nxt = obs.reshape(r, -1), nxt.reshape(r, -1)
        act, ret, disc, prio = (a.reshape(r, count) for a in (act, ret, disc, prio))
        ok = (head == want).all(axis=1)
        ok &= np.isfinite(obs.sum(axis=1) + nxt.sum(axis=1) + ret.sum(axis=1) + disc.sum(axis=1) + prio.sum(axis=1))
        ok &= act.max(axis=1) < limit
        ok &= disc.min(axis=1) >= 0.0
        ok &= disc.max(axis=1) <= 1.0
        ok &= prio.min(axis=1) > 0.0
        ok &= prio.max(axis=1) <= MAX_PRIORITY
    return ok


def _run_block(cols: tuple, run: list[int], count: int) -> Block:
    """One block of the given rows (consecutive valid entries) out of the batch's columns."""
    lo, hi = run[0], run[-1] + 1
    if hi - lo == len(run):
        sl = slice(lo * count, hi * count)
        return Block(*(c[sl] for c in cols))
    idx = (np.asarray(run, np.int64)[:, None] * count + np.arange(count)).ravel()
    return Block(*(c.take(idx, axis=0) for c in cols))
