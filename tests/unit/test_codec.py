import numpy as np
import pytest

from apexq.replay_server.codec import (
    HEADER_SIZE,
    MAX_PRIORITY,
    Block,
    BlockError,
    block_nbytes,
    decode_block,
    encode_block,
)


def make_block(n=5, dim=2, seed=0):
    rng = np.random.default_rng(seed)
    return Block(
        obs=rng.normal(size=(n, dim)).astype(np.float32),
        action=rng.integers(0, 3, n).astype(np.int32),
        ret=rng.normal(size=n).astype(np.float32),
        discount=np.full(n, 0.97, np.float32),
        next_obs=rng.normal(size=(n, dim)).astype(np.float32),
        priority=rng.uniform(0.1, 2, n).astype(np.float32),
        actor_id=7,
        weights_version=42,
        block_seq=3,
    )


def test_round_trip_is_exact():
    b = make_block()
    data = encode_block(b)
    assert len(data) == block_nbytes(5, 2) == HEADER_SIZE + 5 * (8 * 2 + 16)
    d = decode_block(data, obs_dim=2, num_actions=3)
    for name in ("obs", "action", "ret", "discount", "next_obs", "priority"):
        np.testing.assert_array_equal(getattr(d, name), getattr(b, name))
    assert (d.actor_id, d.weights_version, d.block_seq) == (7, 42, 3)


def test_header_layout_is_little_endian_and_versioned():
    data = encode_block(make_block(n=1))
    assert data[:4] == b"APXB" and data[4] == 1 and data[5] == 1
    assert int.from_bytes(data[6:8], "little") == 2 and int.from_bytes(data[8:12], "little") == 1


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda d: d[:10], "too_short"),
        (lambda d: d[:-1], "bad_length"),
        (lambda d: d + b"\0\0\0\0", "bad_length"),
        (lambda d: b"XXXX" + d[4:], "bad_magic"),
        (lambda d: d[:4] + bytes([2]) + d[5:], "bad_version"),
        (lambda d: d[:5] + bytes([9]) + d[6:], "bad_dtype"),
        (lambda d: d[:6] + (3).to_bytes(2, "little") + d[8:], "bad_length"),
        (lambda d: d[:16] + (1).to_bytes(4, "little") + d[20:], "bad_flags"),  # reserved flags must be 0
        (lambda d: d[:16] + (1 << 31).to_bytes(4, "little") + d[20:], "bad_flags"),
        (lambda d: None, "missing_field"),
    ],
)
def test_rejects_malformed_blocks_with_a_reason(mutate, reason):
    data = encode_block(make_block())
    with pytest.raises(BlockError) as err:
        decode_block(mutate(data), obs_dim=None, num_actions=3)
    assert err.value.reason == reason
    assert err.value.detail


def test_rejects_wrong_obs_dim_for_the_shard():
    with pytest.raises(BlockError) as err:
        decode_block(encode_block(make_block(dim=3)), obs_dim=2)
    assert err.value.reason == "bad_shape" and "obs_dim 3" in err.value.detail


@pytest.mark.parametrize(
    "field, value, reason",
    [
        ("obs", np.nan, "non_finite"),
        ("ret", np.inf, "non_finite"),
        ("priority", 0.0, "bad_priority"),
        ("priority", -1.0, "bad_priority"),
        ("discount", 1.5, "bad_discount"),
        ("action", 3, "bad_action"),
        ("action", -1, "bad_action"),
        ("priority", 3.4e38, "priority_too_large"),
        ("priority", np.nextafter(np.float32(MAX_PRIORITY), np.float32(np.inf)), "priority_too_large"),
    ],
)
def test_rejects_forged_values(field, value, reason):
    b = make_block()
    arr = getattr(b, field).copy()
    arr.flat[2] = value
    setattr(b, field, arr)
    with pytest.raises(BlockError) as err:
        decode_block(encode_block(b), obs_dim=2, num_actions=3)
    assert err.value.reason == reason


def test_writer_sets_flags_to_zero_and_the_largest_priority_is_accepted():
    b = make_block()
    b.priority = b.priority.copy()
    b.priority[0] = MAX_PRIORITY  # 1e6 is exact in float32: the bound itself is allowed
    data = encode_block(b)
    assert data[16:20] == b"\0\0\0\0"
    assert decode_block(data, obs_dim=2, num_actions=3).priority[0] == 1e6
