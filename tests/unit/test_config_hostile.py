"""Broken and hostile config files get one line naming the file and what was wrong, exit 2, no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from apexq.cluster.config import MAX_CONFIG_DEPTH, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


def laughs(levels: int) -> str:
    """Each level an alias list of nine of the one before: 9**levels leaves, a few hundred bytes."""
    lines = ["l0: &l0 [1, 2]"]
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


CASES = {
    "integer of 5,000 digits": ("seed: " + "9" * 5000 + "\n", "an integer has too many digits"),
    "flow nesting 5,000 deep": ("seed: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than"),
    "block nesting 200 deep": (
        "".join("  " * i + f"k{i}:\n" for i in range(200)) + "  " * 200 + "x: 1\n",
        "nested more than",
    ),
    "not UTF-8 on line 3": (b"seed: 1\nenv:\n  id: \xff\xfeCar\n", "line 3 is not UTF-8 text (byte 0xff)"),
    "2 MiB file": ("#" * (2 << 20) + "\n", "larger than 1048576 bytes"),
    "billion laughs": (laughs(40), "nested more than"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_config_is_one_config_error(tmp_path, name):
    text, expected = CASES[name]
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert expected in str(err.value)
    assert str(err.value).startswith(f"--config {path}")
    assert "\n" not in str(err.value)


def test_depth_limit_is_exactly_the_documented_one(tmp_path):
    # MAX_CONFIG_DEPTH levels of lists under a key parse (and then fail validation on the key), one more does not
    ok = tmp_path / "ok.yaml"
    ok.write_text("x: " + "[" * (MAX_CONFIG_DEPTH - 1) + "]" * (MAX_CONFIG_DEPTH - 1) + "\n")
    with pytest.raises(ConfigError, match="x: unknown key"):
        load_config(ok)
    deep = tmp_path / "deep.yaml"
    deep.write_text("x: " + "[" * (MAX_CONFIG_DEPTH + 1) + "]" * (MAX_CONFIG_DEPTH + 1) + "\n")
    with pytest.raises(ConfigError, match="nested more than"):
        load_config(deep)


def test_huge_integer_in_set_is_one_line():
    with pytest.raises(ConfigError, match=r"^--set seed: a value cannot be read \(an integer has too many digits\)$"):
        load_config(overrides=["seed=" + "9" * 5000])


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "apexq.cluster.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("name", ["integer of 5,000 digits", "flow nesting 5,000 deep", "not UTF-8 on line 3"])
def test_cli_prints_one_line_and_exits_2(tmp_path, name):
    text, expected = CASES[name]
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    r = run_cli("train", "--config", str(path), "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("apexq: error: ") and expected in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "run").exists()


def test_capacity_beyond_memory_is_refused_before_anything_starts(tmp_path):
    from apexq.cluster.components import physical_memory

    # 10**12 transitions of MountainCar (2-dim obs: 32 bytes raw, ~84 bytes in a shard) need ~78 TiB
    assert physical_memory() < 10**12 * 84
    r = run_cli("train", "--set", "replay.capacity=1000000000000", "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert line.startswith("apexq: error: replay.capacity: 1000000000000 transitions need about "), line
    assert "more than this machine's" in line and len(line.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_replay_memory_estimate_by_hand():
    from apexq.cluster.components import replay_memory_bytes

    cfg = load_config(
        overrides=[
            "replay.capacity=1000",
            "replay.min_size_to_sample=100",
            "learner.batch_size=64",
            "actors.block_size=100",
            "actors.max_backlog_blocks=4",
        ]
    )
    shard, stream = replay_memory_bytes(cfg, obs_dim=2)
    # shard: 1000 items x (2 obs x 2 dims x 4 B + action, return, discount 12 B + key 8 B + tree 32 B)
    assert shard == 1000 * (16 + 12 + 8 + 32)
    # stream: ceil(1000/100) + 4 backlog + 16 spare = 30 blocks of 100 transitions (32 B each) + header
    from apexq.replay_server.codec import HEADER_SIZE

    assert stream == 30 * (HEADER_SIZE + 100 * 32)
