"""decode_batch (what a shard uses) accepts and rejects exactly what decode_block does."""

import numpy as np
import pytest

from apexq.replay_server.codec import Block, BlockError, decode_batch, decode_block, encode_block
from apexq.replay_server.sum_tree import SumTree


def make_block(n, seed, dim=2):
    rng = np.random.default_rng(seed)
    return Block(
        obs=rng.normal(size=(n, dim)).astype(np.float32),
        action=rng.integers(0, 3, n).astype(np.int32),
        ret=rng.normal(size=n).astype(np.float32),
        discount=rng.uniform(0, 1, n).astype(np.float32),
        next_obs=rng.normal(size=(n, dim)).astype(np.float32),
        priority=rng.uniform(0.1, 2, n).astype(np.float32),
        block_seq=seed,
    )


def forge(data: bytes, kind: int, rng) -> object:
    """A damaged copy of an encoded block (kind 0 leaves it intact)."""
    b = bytearray(data)
    if kind == 1:  # a NaN / inf / out-of-range value somewhere in the columns
        i = 36 + 4 * int(rng.integers(0, (len(b) - 36) // 4))
        b[i : i + 4] = np.array([rng.choice([np.nan, np.inf, -np.inf, -1.0, 7.0, 1e38])], "<f4").tobytes()
    elif kind == 2:  # a random byte flipped anywhere, header included
        b[int(rng.integers(0, len(b)))] ^= 0xFF
    elif kind == 3:
        return bytes(b[: int(rng.integers(0, len(b)))])
    elif kind == 4:
        return None  # entry without a payload
    elif kind == 5:  # an action outside 0..2 (or negative), in a block of 8
        i = 36 + 4 * 2 * 8 + 4 * int(rng.integers(0, 8))
        b[i : i + 4] = np.array([rng.choice([-1, 3, 1 << 30])], "<i4").tobytes()
    elif kind == 6:  # float32 overflow in a sum, every value finite and valid
        obs = np.frombuffer(b, "<f4", count=16, offset=36).copy()
        obs[:] = 3e38
        b[36 : 36 + 64] = obs.tobytes()
    elif kind == 7:  # a reserved flag set in the header
        b[16 + int(rng.integers(0, 4))] |= 1 << int(rng.integers(0, 8))
    elif kind == 8:  # a finite priority above MAX_PRIORITY (the last column: the block's last values)
        i = len(b) - 4 * int(rng.integers(1, (len(b) - 36) // 32 + 1))
        b[i : i + 4] = np.array([rng.choice([1.5e6, 3.4e38])], "<f4").tobytes()
    return bytes(b)


def reference(payloads, dim=2, num_actions=3):
    ok, errors = [], []
    for p in payloads:
        try:
            ok.append(decode_block(p, dim, num_actions))
        except BlockError as err:
            errors.append(err.reason)
    return ok, errors


SEEDS = range(40)


def case(seed: int) -> list:
    """The entries of one case: mostly intact blocks of one size, about 40% forged."""
    rng = np.random.default_rng(seed)
    payloads = []
    for i in range(int(rng.integers(1, 40))):
        n = 8 if rng.random() < 0.85 else int(rng.integers(1, 20))  # mostly one size, some others
        data = encode_block(make_block(n, seed * 100 + i))
        payloads.append(forge(data, int(rng.integers(0, 9)) if rng.random() < 0.4 else 0, rng))
    return payloads


@pytest.mark.parametrize("seed", SEEDS)
def test_batch_matches_block_by_block(seed):
    payloads = case(seed)
    want_blocks, want_errors = reference(payloads)
    blocks, errors = decode_batch(payloads, 2, 3)
    assert [e.reason for e in errors] == want_errors
    for name in ("obs", "action", "ret", "discount", "next_obs", "priority"):
        got = np.concatenate([getattr(b, name) for b in blocks]) if blocks else np.zeros(0)
        want = np.concatenate([getattr(b, name) for b in want_blocks]) if want_blocks else np.zeros(0)
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert sum(len(b) for b in blocks) == sum(len(b) for b in want_blocks)


def test_the_forgeries_above_cover_every_rejection_reason():
    """Computed here from the same cases, so it holds alone, with -k or under xdist."""
    seen = {reason for seed in SEEDS for reason in reference(case(seed))[1]}
    assert {
        "non_finite",
        "bad_length",
        "missing_field",
        "bad_action",
        "bad_discount",
        "too_short",
        "bad_flags",
        "priority_too_large",
    } <= seen


def test_all_valid_entries_of_one_size_become_one_block():
    payloads = [encode_block(make_block(16, i)) for i in range(10)]
    blocks, errors = decode_batch(payloads, 2, 3)
    assert errors == [] and len(blocks) == 1 and len(blocks[0]) == 160
    np.testing.assert_array_equal(blocks[0].obs[16:32], make_block(16, 1).obs)


def test_a_rejected_entry_in_the_middle_keeps_the_order_of_the_rest():
    payloads = [encode_block(make_block(4, i)) for i in range(5)]
    payloads[2] = payloads[2][:-4]
    blocks, errors = decode_batch(payloads, 2, 3)
    assert [e.reason for e in errors] == ["bad_length"]
    got = np.concatenate([b.ret for b in blocks])
    np.testing.assert_array_equal(got, np.concatenate([make_block(4, i).ret for i in (0, 1, 3, 4)]))


def test_sum_tree_range_update_and_sampled_values():
    t = SumTree(1000)
    vals = np.random.default_rng(0).uniform(0.1, 2, 700)
    t.set_range(100, vals)
    np.testing.assert_array_equal(t.get(np.arange(100, 800)), vals)
    assert t.total == pytest.approx(vals.sum())
    leaves, leaf_vals = t.sample_with_values(64, np.random.default_rng(1))
    assert ((leaves >= 100) & (leaves < 800)).all()
    np.testing.assert_array_equal(leaf_vals, t.get(leaves))
    with pytest.raises(IndexError):
        t.set_range(900, vals[:200])
    with pytest.raises(ValueError):
        t.set_range(0, [-1.0])
