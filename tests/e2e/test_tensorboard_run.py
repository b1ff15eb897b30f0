"""`apexq train --tensorboard` as a user runs it; the event files read back with TensorBoard's own reader."""

import json
from pathlib import Path

import pytest
from procs import run_cli

from apexq.cluster.tensorboard import LAG_TAGS, TAGS, scalars

ROOT = Path(__file__).resolve().parents[2]


def apexq(*args, env=None, timeout=240):
    return run_cli(*args, env=env, timeout=timeout)


def short(env_steps):
    """Sized in env steps, so a loaded machine gives a longer run rather than fewer ticks (max_seconds: a cap)."""
    return [
        "--set",
        f"train.max_env_steps={env_steps}",
        "--set",
        "train.max_seconds=240",
        "--set",
        "train.progress_every_s=2",
        "--set",
        "eval.every_seconds=3",
        "--set",
        "eval.episodes=10",
        "--set",
        "replay.min_size_to_sample=500",
        "--set",
        "actors.envs_per_actor=16",
        "--set",
        "learner.checkpoint_every_s=5",
    ]


def read_events(tb: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_events_match(run_dir: Path) -> tuple[list, dict]:
    """Every scalar of every metrics.jsonl record is an event at step env_steps, in the same order."""
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    events = read_events(run_dir / "tb")
    for tag, key in TAGS.items():
        want = [(r["env_steps"], r[key]) for r in records if r.get(key) is not None]
        got = events.get(tag, [])
        assert [s for s, _ in got] == [s for s, _ in want], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6, abs=1e-6), tag  # float32
    for tag in (
        "train/episode_return",
        "eval/return",
        "throughput/env_steps_per_s",
        "learner/loss",
        "learner/td_error_abs",
        "learner/q_mean",
        "replay/size",
        *LAG_TAGS,
    ):
        assert events.get(tag), f"{tag}: no events"
    return records, events


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, steps", [(["--single-process"], 200_000), ([], 200_000)], ids=["single-process", "distributed"]
)  # some 6 and 15 s of stepping here
def test_run_writes_tensorboard_curves_and_resume_continues_them(tmp_path, mode, steps):
    run_dir = tmp_path / "run"
    r = apexq("train", "--tensorboard", *mode, "--run-dir", str(run_dir), *short(steps))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    first, before = assert_events_match(run_dir)
    assert len(list((run_dir / "tb").iterdir())) == 1
    # no --tensorboard on the resume: the run's config.yaml has logging.tensorboard: true
    r = apexq("train", "--resume", str(run_dir), *mode, *short(first[-1]["env_steps"] + steps))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert len(list((run_dir / "tb").iterdir())) == 2  # a new event file in the same directory
    records, after = assert_events_match(run_dir)
    resumed = records[len(first) :]
    assert resumed and resumed[-1]["env_steps"] > first[-1]["env_steps"]
    # the first part is still there, and every curve the resumed records carry goes on after it (a
    # short resumed part may have had no evaluation or a single tick, so not every tag need continue)
    continued = {tag for r in resumed for tag in scalars(r)}
    assert {"train/episode_return", "learner/loss", "replay/size", "learner/updates"} <= continued, continued
    for tag, points in before.items():
        assert after[tag][: len(points)] == points, tag
        if tag in continued:
            assert max(s for s, _ in after[tag][len(points) :]) > max(s for s, _ in points), tag


def test_tensorboard_without_the_package_is_one_line_exit_2(tmp_path):
    shim = tmp_path / "shim" / "tensorboard"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named tensorboard')\n")
    run_dir = tmp_path / "run"
    r = apexq(
        "train",
        "--tensorboard",
        "--single-process",
        "--run-dir",
        str(run_dir),
        env={"PYTHONPATH": str(tmp_path / "shim")},
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "apexq: error: logging.tensorboard: needs the tensorboard package: pip install 'apexq[tensorboard]'"
    ]
    assert not run_dir.exists()  # refused before anything started
    r = apexq(
        "train",
        "--set",
        "logging.tensorboard=true",
        "--run-dir",
        str(run_dir),
        env={"PYTHONPATH": str(tmp_path / "shim")},
        timeout=60,
    )
    assert r.returncode == 2 and "pip install 'apexq[tensorboard]'" in r.stderr and "Traceback" not in r.stderr
