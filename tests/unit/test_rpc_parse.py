"""The replay-server's message parser: every field bounded and typed, and nothing but RpcError escapes."""

import json
import struct
import threading
import time
import tracemalloc

import numpy as np
import pytest
from default_components import shard_spec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apexq.replay_server.codec import MAX_PRIORITY, Block
from apexq.replay_server.keys import Keys
from apexq.replay_server.rpc_messages import (
    MAGIC,
    MAX_DEPTH,
    MAX_HEADER,
    MAX_TIMEOUT,
    Request,
    RpcError,
    encode,
    parse_priorities,
    parse_request,
    too_deep,
)
from apexq.replay_server.shard import ReplayShard
from apexq.replay_server.sum_tree import STRATA_CACHED, SumTree

PREFIX = Keys("ns").reply(0, "")
MAX = 512


def raw(header_json: str, payload: bytes = b"") -> bytes:
    """A message with the header exactly as written (json.dumps would refuse NaN)."""
    h = header_json.encode()
    return MAGIC + struct.pack("<I", len(h)) + h + payload


def req_json(**fields) -> str:
    base = {"op": "sample", "id": "r1", "reply": PREFIX + "c1", "expires": time.time() + 60, "n": 4, "timeout": 1.0}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...})


def reason(data, parse=lambda d: parse_request(d, PREFIX, MAX)) -> str:
    with pytest.raises(RpcError) as err:
        parse(data)
    return err.value.reason


def test_a_valid_request_parses():
    r = parse_request(raw(req_json(n=512, timeout=10)), PREFIX, MAX)
    assert (r.op, r.id, r.reply, r.n, r.timeout) == ("sample", "r1", PREFIX + "c1", 512, 10.0)
    assert parse_request(raw(req_json(op="stats", n=..., timeout=...)), PREFIX, MAX).op == "stats"


@pytest.mark.parametrize(
    "header, why",
    [
        (req_json().replace('"timeout": 1.0', '"timeout": NaN'), "bad_timeout"),
        (req_json().replace('"timeout": 1.0', '"timeout": Infinity'), "bad_timeout"),
        (req_json().replace('"timeout": 1.0', '"timeout": 1e999'), "bad_timeout"),  # parses to inf
        (req_json().replace('"timeout": 1.0', '"timeout": ' + "1" + "0" * 400), "bad_timeout"),  # 10**400
        (req_json(timeout=-0.5), "bad_timeout"),
        (req_json(timeout=MAX_TIMEOUT + 0.01), "bad_timeout"),
        (req_json(timeout=True), "bad_timeout"),
        (req_json(timeout="1"), "bad_timeout"),
        (req_json(timeout=...), "bad_fields"),
        (req_json(n=0), "bad_n"),
        (req_json(n=MAX + 1), "bad_n"),
        (req_json(n=10**9), "bad_n"),
        (req_json(n=True), "bad_n"),
        (req_json(n=4.0), "bad_n"),
        (req_json(expires=float("nan")), "bad_expires"),
        (req_json(expires=1e13), "bad_expires"),
        (req_json(op="flushall"), "bad_op"),
        (req_json(extra=1), "bad_fields"),
        (req_json(op="stats"), "bad_fields"),
        (req_json(reply="apexq:elsewhere"), "bad_reply_key"),
        (req_json(reply=Keys("other").reply(0, "c1")), "bad_reply_key"),
        (req_json(reply=PREFIX + "c1:x"), "bad_reply_key"),
        (req_json(reply=PREFIX), "bad_reply_key"),
        (req_json(reply=PREFIX + "c" * 65), "bad_reply_key"),
        (req_json(reply=7), "bad_reply_key"),
        (req_json(id=""), "bad_id"),
        (req_json(id="x" * 65), "bad_id"),
        (req_json(id=5), "bad_id"),
        ("[" * 2000 + "]" * 2000, "too_deep"),
        ('{"a":' * 9 + "1" + "}" * 9, "too_deep"),
        ('{"n": ' + "9" * 5000 + "}", "too_large"),
        ("[1, 2]", "bad_header_json"),
        ("{'op': 1}", "bad_header_json"),
    ],
)
def test_bad_fields_are_refused_by_name(header, why):
    assert reason(raw(header)) == why


def test_parse_refuses_bytes_before_json():
    assert reason(b"garbage") == "bad_magic"
    assert reason(MAGIC + struct.pack("<I", 2**32 - 1)) == "bad_header_length"
    assert reason(raw(req_json(), b"\0")) == "bad_payload_length"  # a request carries no payload
    assert reason(raw(req_json(), b"\0" * 5000)) == "too_large"
    assert reason(raw(req_json()).replace(b'"r1"', b'"\xff1"')) == "bad_header_json"  # not UTF-8


def test_errors_after_the_reply_key_can_be_answered():
    with pytest.raises(RpcError) as err:
        parse_request(raw(req_json(n=10**6)), PREFIX, MAX)
    assert err.value.answer == (PREFIX + "c1", "r1")
    with pytest.raises(RpcError) as err:
        parse_request(raw(req_json(reply="apexq:elsewhere", n=10**6)), PREFIX, MAX)
    assert err.value.answer is None  # never write to a key outside this shard's reply lists


def test_depth_scan_counts_brackets_outside_strings_only():
    assert not too_deep(b'{"a": [[1], {"b": [2]}]}', 4) and too_deep(b'{"a": [[1], {"b": [2]}]}', 3)
    assert not too_deep(b'{"s": "[[[[[[[[[[[[\\"[[[[[["}', 1)  # brackets in a string, escaped quote too
    assert too_deep(b'{"s": "\\\\", "t": [[[[[[[[[1]]]]]]]]]}', MAX_DEPTH)  # an escaped backslash ends the escape
    assert parse_request(raw(req_json(id="[[[[[[[[[[[[[[[[")), PREFIX, MAX).id == "[" * 16


def prio_msg(keys, pr, n=None) -> bytes:
    return encode({"n": len(keys) if n is None else n}, (np.asarray(keys, "<i8"), np.asarray(pr, "<f4")))


def test_priority_messages():
    keys, pr = parse_priorities(prio_msg([1, 2], [0.5, 3.4e38]), MAX)
    assert keys.tolist() == [1, 2] and pr[1] == np.float32(3.4e38)  # finite: the shard clamps it
    bad = lambda d: reason(d, lambda x: parse_priorities(x, MAX))  # noqa: E731
    assert bad(prio_msg([1], [np.nan])) == "bad_priority" and bad(prio_msg([1], [-1.0])) == "bad_priority"
    assert bad(prio_msg([1], [np.inf])) == "bad_priority"
    assert bad(prio_msg(range(MAX + 1), np.ones(MAX + 1))) == "bad_n"
    assert bad(prio_msg(range(2 * MAX), np.ones(2 * MAX))) == "too_large"  # refused before its header is read
    assert bad(prio_msg([1, 2], [1, 1], n=3)) == "bad_payload_length"
    assert bad(raw('{"n": 1, "x": 0}', b"\0" * 12)) == "bad_fields"
    assert bad(raw('{"n": true}')) == "bad_n"
    assert bad(raw('{"n": ' + "[" * 3000)) == "too_deep"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=30,
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "op": st.sampled_from(["sample", "stats", "x"]) | json_values,
        "id": st.text(max_size=70) | json_values,
        "reply": st.sampled_from([PREFIX + "c", PREFIX, "k"]) | json_values,
        "expires": json_values,
        "n": st.integers(-5, 2 * MAX) | json_values,
        "timeout": st.floats() | json_values,
        "extra": json_values,
    },
)

# a good reply key and id, so that the checks of every other field are reached
envelope = st.fixed_dictionaries(
    {"id": st.just("r"), "reply": st.just(PREFIX + "c")},
    optional={
        "op": st.sampled_from(["sample", "stats"]) | json_values,
        "expires": st.floats(0, 2e12) | json_values,
        "n": st.integers(-5, 2 * MAX) | json_values,
        "timeout": st.floats() | json_values,
        "x": json_values,
    },
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300) | st.binary(max_size=300).map(lambda b: MAGIC + b))
def test_arbitrary_bytes_raise_only_rpc_error(data):
    for parse in (lambda d: parse_request(d, PREFIX, MAX), lambda d: parse_priorities(d, MAX)):
        try:
            parse(data)
        except RpcError:
            pass


@settings(max_examples=400, deadline=None)
@given(fields | envelope | json_values, st.binary(max_size=40))
def test_arbitrary_json_raises_only_rpc_error(header, payload):
    data = raw(json.dumps(header), payload)  # json.dumps writes NaN and Infinity as the literals
    for parse in (lambda d: parse_request(d, PREFIX, MAX), lambda d: parse_priorities(d, MAX)):
        try:
            r = parse(data)
        except RpcError:
            continue
        if isinstance(r, Request):  # what got through is in range
            assert r.op in ("sample", "stats") and 0 <= r.timeout <= MAX_TIMEOUT and 0 <= r.n <= MAX
        else:
            assert np.isfinite(r[1]).all() and len(r[0]) <= MAX


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, MAX),
    st.floats(0, MAX_TIMEOUT),
    st.from_regex(r"[0-9a-f]{1,64}", fullmatch=True),
    st.from_regex(r"[0-9A-Za-z_-]{1,64}", fullmatch=True),
    st.floats(0, 1e12),
)
def test_valid_requests_round_trip(n, timeout, rid, client, expires):
    h = {"op": "sample", "id": rid, "reply": PREFIX + client, "expires": expires, "n": n, "timeout": timeout}
    assert parse_request(encode(h), PREFIX, MAX) == Request("sample", rid, PREFIX + client, expires, n, timeout)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(-(2**63), 2**63 - 1), st.floats(0, float(np.float32(3.4e38)), width=32)), max_size=MAX
    )
)
def test_valid_priority_updates_round_trip(items):
    keys = [k for k, _ in items]
    pr = np.array([p for _, p in items], "<f4")
    got_keys, got_pr = parse_priorities(prio_msg(keys, pr), MAX)
    assert got_keys.tolist() == keys
    np.testing.assert_array_equal(got_pr, pr)


# -- the shard's side: no spin on an unservable sample, priorities clamped, bounded caches ----------


def small_shard(n=50) -> ReplayShard:
    shard = ReplayShard(
        shard_spec(capacity=100, priority_alpha=1.0, priority_eps=0.0, min_size_to_sample=10, error_buffer=1000.0),
        "redis://unused",
        "ns",
        seed=0,
    )
    obs = np.zeros((n, 2), np.float32)
    shard.insert(
        Block(obs, np.zeros(n, np.int32), np.zeros(n, np.float32), np.ones(n, np.float32), obs, np.ones(n, np.float32))
    )
    return shard


@pytest.mark.parametrize("timeout", [float("nan"), -1.0, 0.0, 0.3])
def test_an_unservable_sample_waits_its_timeout_at_most_and_does_not_spin(timeout):
    shard = small_shard()
    got = []
    t = threading.Thread(target=lambda: got.append(shard.sample(5000, timeout)))  # never allowed: 5000 > 1000
    t0, c0 = time.monotonic(), time.process_time()
    t.start()
    t.join(1.0)
    wall, cpu = time.monotonic() - t0, time.process_time() - c0
    shard.stop()  # releases a loop that would otherwise wait (or spin) forever
    t.join()
    assert got == [None] and wall < (0.3 if timeout == 0.3 else 0.05) + 0.2, f"still waiting after {wall:.1f}s"
    assert cpu < 0.1, f"{cpu:.2f}s of CPU in {wall:.2f}s: the wait loop spins"


def test_priorities_above_the_maximum_are_clamped_on_update_and_insert():
    shard = small_shard()
    keys = shard.sample(2, 0).keys
    assert shard.update_priorities(keys[:1], [3.4e38]) == 1
    leaf = int(keys[0]) & 0xFFFFFFFFFF
    assert shard.tree.get([leaf])[0] == MAX_PRIORITY  # alpha 1, eps 0: the clamped value itself
    assert shard.tree.total == pytest.approx(MAX_PRIORITY + 49)
    assert shard.stats()["priority_updates_clamped"] == 1
    assert shard.update_priorities(keys[:1], [np.nan]) == 0 and shard.tree.get([leaf])[0] == MAX_PRIORITY
    obs = np.zeros((1, 2), np.float32)
    shard.insert(
        Block(
            obs,
            np.zeros(1, np.int32),
            np.zeros(1, np.float32),
            np.ones(1, np.float32),
            obs,
            np.array([3e38], np.float32),
        )
    )
    assert shard.tree.get([50])[0] == MAX_PRIORITY


def test_sampling_2500_distinct_sizes_keeps_a_bounded_cache():
    tree = SumTree(4096)
    tree.set_range(0, np.ones(4096))
    rng = np.random.default_rng(0)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for n in range(1, 2501):
        tree.sample(n, rng)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(tree._strata) == STRATA_CACHED and set(tree._strata) == set(range(2493, 2501))
    # the 8 newest sizes: 8 * 2497 * 8 bytes = 160 KB (one entry per size kept 8 * 2500 * 2501 / 2 = 25 MB)
    assert grown < 400_000, grown
    assert MAX_HEADER == 4096
