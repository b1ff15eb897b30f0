"""The messages of ``apexq replay-server``, and the one parser every received message goes through.

A message is ``MAGIC | uint32 header length | JSON header | raw little-endian arrays``; the
arrays' dtypes and shapes follow from the header and are checked exactly, so nothing is
unpickled. Whoever holds the Redis password can push anything onto a shard's lists, so the
parser assumes nothing and raises only :class:`RpcError` (its ``reason`` is a metric label):

* bounded before parsing: the raw size (a request has no payload, a priority update exactly
  ``n`` keys and priorities, ``n <= max_items``), the header length (``MAX_HEADER``), strict
  UTF-8, and the JSON nesting depth (``MAX_DEPTH``), counted by a scan over the brackets
  outside strings, without recursion, so 4 KB of ``[[[[...`` never reaches ``json.loads``;
* checked after parsing: exactly the known fields, exact types (a bool is not an int), ints in
  range, floats finite and in range (``0 <= timeout <= MAX_TIMEOUT``), ``1 <= n <= max_items``
  (the server's limit per request, from the config: the learner asks for ``batch_size *
  batches_per_request``), and a reply key of this shard's pattern in the run's namespace;
* priorities finite and >= 0 (the shard clamps those above ``codec.MAX_PRIORITY``).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"AQR1"
MAX_HEADER = 4096  # bytes of JSON header
MAX_DEPTH = 8  # nesting of JSON objects/arrays in a header (a stats reply uses 3)
MAX_ITEMS = 1 << 20  # absolute cap on items in one request, reply or priority update
MAX_TIMEOUT = 10.0  # seconds a sample request may wait for the rate limiter
MAX_ID = 64  # characters of a request id and of a reply list's client part
_CLIENT = re.compile(r"[0-9A-Za-z_-]{1,%d}" % MAX_ID)
REQUEST_FIELDS = {"sample": {"op", "id", "reply", "expires", "n", "timeout"}, "stats": {"op", "id", "reply", "expires"}}


class RpcError(ValueError):
    """A message that does not decode or check; ``reason`` is a short tag for counting. ``answer``
    is ``(reply key, request id)`` when those checked out, so the requester can be told why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.answer: tuple[str, str] | None = None


@dataclass(frozen=True)
class Request:
    op: str  # "sample" or "stats"
    id: str
    reply: str  # the requester's reply list
    expires: float  # wall-clock time after which the requester no longer waits
    n: int = 0  # items to sample
    timeout: float = 0.0  # seconds the sample may wait for the rate limiter


def encode(header: dict, arrays: tuple = ()) -> bytes:
    h = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return b"".join([MAGIC, struct.pack("<I", len(h)), h] + [np.ascontiguousarray(a).tobytes() for a in arrays])


def too_deep(raw: bytes, limit: int = MAX_DEPTH) -> bool:
    """Do the JSON text's arrays/objects nest more than ``limit`` deep? (UTF-8: a byte below 0x80
    is always the ASCII character itself, so quotes and brackets can be scanned bytewise.)"""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    depth, in_str, esc = 0, False, False
    for c in raw:
        if in_str:
            if esc:
                esc = False
            elif c == 0x5C:  # backslash
                esc = True
            elif c == 0x22:  # closing quote
                in_str = False
        elif c == 0x22:
            in_str = True
        elif c == 0x5B or c == 0x7B:
            depth += 1
            if depth > limit:
                return True
        elif c == 0x5D or c == 0x7D:
            depth -= 1
    return False


def decode(data, layout=None, header_only: bool = False, max_bytes: int | None = None) -> tuple[dict, list]:
    """``(header, arrays)``. ``layout(header)`` gives the expected ``[(dtype, shape), ...]`` of the payload
    (none without it); ``header_only`` skips the payload; ``max_bytes`` bounds the whole message."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < 8 or data[:4] != MAGIC:
        raise RpcError("bad_magic")
    if max_bytes is not None and len(data) > max_bytes:
        raise RpcError("too_large", f"{len(data)} bytes, at most {max_bytes}")
    (hlen,) = struct.unpack_from("<I", data, 4)
    if hlen > MAX_HEADER or 8 + hlen > len(data):
        raise RpcError("bad_header_length", str(hlen))
    raw = bytes(data[8 : 8 + hlen])
    if too_deep(raw):
        raise RpcError("too_deep", f"JSON nested more than {MAX_DEPTH} deep")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, a 5000-digit int
        raise RpcError("bad_header_json") from None
    if not isinstance(header, dict):
        raise RpcError("bad_header_json", "not an object")
    if header_only:
        return header, []
    spec = layout(header) if layout else []
    need = sum(int(np.dtype(dt).itemsize * np.prod(shape)) for dt, shape in spec)
    if len(data) - 8 - hlen != need:
        raise RpcError("bad_payload_length", f"{len(data) - 8 - hlen} bytes, expected {need}")
    arrays, off = [], 8 + hlen
    for dt, shape in spec:
        a = np.frombuffer(data, dtype=dt, count=int(np.prod(shape)), offset=off).reshape(shape)
        arrays.append(a)
        off += a.nbytes
    return header, arrays


def int_field(header: dict, name: str, lo: int, hi: int) -> int:
    v = header.get(name)
    if type(v) is not int or not lo <= v <= hi:  # type(True) is bool, not int
        raise RpcError(f"bad_{name}", repr(v)[:40])
    return v


def number_field(header: dict, name: str, lo: float, hi: float) -> float:
    """A finite number in ``[lo, hi]`` (int or float, never bool); compared before any conversion,
    so a 400-digit int is refused rather than overflowing ``float()``."""
    v = header.get(name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:  # NaN fails the comparison
        raise RpcError(f"bad_{name}", repr(v)[:40])
    return float(v)


def sample_layout(obs_dim: int):
    """The arrays of a sample reply: the :data:`SAMPLE_COLUMNS` of a ``SampleBatch``, in that order."""

    def layout(h: dict):
        n = int_field(h, "n", 0, MAX_ITEMS) if h.get("ok", True) else 0
        return [
            ("<i8", (n,)),
            ("<f4", (n, obs_dim)),
            ("<i4", (n,)),
            ("<f4", (n,)),
            ("<f4", (n,)),
            ("<f4", (n, obs_dim)),
            ("<f8", (n,)),
        ]

    return layout


def prio_layout(h: dict, max_items: int = MAX_ITEMS):
    n = int_field(h, "n", 0, max_items)
    return [("<i8", (n,)), ("<f4", (n,))]


def parse_request(data, reply_prefix: str, max_items: int) -> Request:
    """A sample or stats request, checked field by field (see the module docstring)."""
    h, _ = decode(data, max_bytes=8 + MAX_HEADER)
    reply = h.get("reply")
    if (
        not isinstance(reply, str)
        or not reply.startswith(reply_prefix)
        or not _CLIENT.fullmatch(reply[len(reply_prefix) :])
    ):
        raise RpcError("bad_reply_key", repr(reply)[:80])
    rid = h.get("id")
    if not isinstance(rid, str) or not 1 <= len(rid) <= MAX_ID:
        raise RpcError("bad_id", repr(rid)[:40])
    try:
        return check_request(h, max_items)
    except RpcError as exc:
        exc.answer = (reply, rid)
        raise


def check_request(h: dict, max_items: int) -> Request:
    """The fields other than the reply key and id (whose errors the requester can be told of)."""
    op = h.get("op")
    if not isinstance(op, str) or op not in REQUEST_FIELDS:
        raise RpcError("bad_op", repr(op)[:40])
    if set(h) != REQUEST_FIELDS[op]:
        raise RpcError("bad_fields", ",".join(sorted(set(h) ^ REQUEST_FIELDS[op]))[:80])
    expires = number_field(h, "expires", 0.0, 1e12)  # a Unix time
    if op == "stats":
        return Request(op, h["id"], h["reply"], expires)
    return Request(
        op, h["id"], h["reply"], expires, int_field(h, "n", 1, max_items), number_field(h, "timeout", 0.0, MAX_TIMEOUT)
    )


def parse_priorities(data, max_items: int) -> tuple[np.ndarray, np.ndarray]:
    """``(keys int64[n], priorities float32[n])`` of a priority update; priorities finite and >= 0."""
    h, (keys, pr) = decode(data, lambda h: prio_layout(h, max_items), max_bytes=8 + MAX_HEADER + 12 * max_items)
    if set(h) != {"n"}:
        raise RpcError("bad_fields", ",".join(sorted(set(h) - {"n"}))[:80])
    if pr.size and not (np.isfinite(pr).all() and pr.min() >= 0):
        raise RpcError("bad_priority", "NaN, infinite or negative priorities")
    return keys, pr
