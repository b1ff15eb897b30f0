"""`apexq evaluate` as a user runs it: on a real short run, on each kind of path, and on hostile files.

Nothing it is given may run code: a ``policy.pt2`` that ``torch.export.load`` would unpickle (the
test first shows that it does) leaves no marker behind, whatever path leads to it.
"""

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from procs import run_cli

ROOT = Path(__file__).resolve().parents[2]
SPEC = {"obs_dim": 2, "num_actions": 3, "obs_low": [-1.2, -0.07], "obs_high": [0.6, 0.07]}


def apexq(*args, timeout=120):
    return run_cli(*args, timeout=timeout)


def one_error_line(r, prefix="apexq: error: "):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(prefix), (r.returncode, r.stderr[-2000:])
    assert r.stdout == ""
    return lines[0]


# -- a real short run ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """CartPole-v1 for 20 s: a mean that says something (an untrained MountainCar policy scores -200)."""
    run = tmp_path_factory.mktemp("evaluate") / "run"
    r = apexq(
        "train",
        "--run-dir",
        str(run),
        "--set",
        "env.id=CartPole-v1",
        "--set",
        "train.max_seconds=20",
        "--set",
        "eval.every_seconds=4",
        "--set",
        "eval.episodes=10",
        "--set",
        "replay.min_size_to_sample=500",
        "--set",
        "replay.capacity=50000",
        "--set",
        "actors.envs_per_actor=16",
        "--set",
        "learner.checkpoint_every_s=5",
        timeout=240,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run


def evaluate_json(*args):
    r = apexq("evaluate", *args, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r


@pytest.mark.slow
def test_evaluate_reproduces_the_runs_own_evaluation(trained_run):
    desc = json.loads((trained_run / "policy.json").read_text())
    records = [json.loads(l) for l in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert desc["eval_return"] is not None and desc["eval_return"] in {r.get("eval_return") for r in records}
    # the run evaluated with cfg.seed (0) on eval.episodes (10) episodes: the same weights, the same numpy
    # forward pass and the same episode seeds give the same mean, exactly
    res, _ = evaluate_json(str(trained_run), "--episodes", "10", "--seed", "0")
    assert res["mean"] == desc["eval_return"], (res, desc)
    assert res["weights_version"] == desc["weights_version"] and res["source"] == str(trained_run / "policy.json")
    assert len(res["returns"]) == 10 and res["mean"] == pytest.approx(sum(res["returns"]) / 10)
    assert res["env"] == "CartPole-v1" and res["updates"] is None
    text = apexq("evaluate", str(trained_run), "--episodes", "10")
    assert text.returncode == 0 and text.stdout.strip() == (
        f"CartPole-v1: 10 greedy episodes | mean {res['mean']:.2f} | std {res['std']:.2f} | "
        f"min {res['min']:.0f} | max {res['max']:.0f}"
    ), text.stdout


@pytest.mark.slow
def test_evaluate_each_path_to_a_run_policy(trained_run):
    import torch

    base, _ = evaluate_json(str(trained_run), "--episodes", "5")
    for name in ("policy.json", "policy.safetensors"):
        res, r = evaluate_json(str(trained_run / name), "--episodes", "5")
        assert res["returns"] == base["returns"] and r.stderr == ""
    for name in ("policy.pt2", "policy.onnx"):  # read from the safe files beside them, and said so
        res, r = evaluate_json(str(trained_run / name), "--episodes", "5")
        assert res["returns"] == base["returns"] and res["source"] == str(trained_run / "policy.json")
        assert r.stderr.strip() == (
            f"apexq: evaluating policy.json + policy.safetensors beside {name} (the same "
            f"weights; apexq never loads {Path(name).suffix} files)"
        )
    res, _ = evaluate_json(str(trained_run / "checkpoint.pt"), "--episodes", "5")
    saved = torch.load(trained_run / "checkpoint.pt", weights_only=True)
    assert res["updates"] == saved["updates"] > 0 and res["env"] == "CartPole-v1" and res["eval_return"] is None
    line = one_error_line(apexq("evaluate", str(trained_run), "--env", "MountainCar-v0"))
    assert line.endswith("the policy takes 4 observation values and has 2 actions; MountainCar-v0 has 2 and 3")


@pytest.mark.slow
def test_evaluate_gif_records_one_greedy_episode(trained_run, tmp_path):
    from needs import require_module

    require_module("pygame")  # in the test extra; `apexq[render]` for users
    from PIL import Image

    gif = tmp_path / "cart.gif"
    res, r = evaluate_json(str(trained_run), "--episodes", "3", "--gif", str(gif))
    assert len(r.stdout.splitlines()) == 1  # --json is one line: no pygame greeting before it
    with Image.open(gif) as im:  # (PIL's optimize drops a frame identical to the one before)
        assert 1 < im.n_frames <= res["gif"]["frames"] and im.size == (600, 400)
    assert res["gif"]["return"] == res["gif"]["frames"] - 1  # CartPole pays 1 a step: the reset frame + one a step


# -- hostile and broken files (no training) --------------------------------------------------------------


class Payload:
    """Unpickling this creates the marker directory: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def hostile_pt2(genuine: Path, out: Path, marker: Path) -> None:
    """A copy of a genuine policy.pt2 whose first weight is a pickle that torch.export.load unpickles."""
    with zipfile.ZipFile(genuine) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("model_weights_config.json"):
                cfg = json.loads(data)
                cfg["config"]["body.0.weight"]["use_pickle"] = True
                data = json.dumps(cfg).encode()
            elif info.filename.endswith("data/weights/weight_0"):
                data = pickle.dumps(Payload(marker))
            dst.writestr(info.filename, data)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A genuine policy's four files, exported from a small network (as a run writes them)."""
    import torch

    from apexq.learner.export import export_policy
    from apexq.learner.network import build_network

    d = tmp_path_factory.mktemp("policy")
    torch.manual_seed(0)
    export_policy(
        build_network(SPEC, [16], False),
        d / "policy.pt2",
        {"env_id": "MountainCar-v0", "weights_version": 3, "eval_return": -200.0},
    )
    return d


def test_seed_picks_the_episodes(tmp_path):
    """A random CartPole network: its greedy episodes end at steps that depend on the start state."""
    import torch

    from apexq.learner.export import export_policy
    from apexq.learner.network import build_network

    torch.manual_seed(3)
    export_policy(
        build_network({"obs_dim": 4, "num_actions": 2}, [8], False), tmp_path / "policy.pt2", {"env_id": "CartPole-v1"}
    )
    first, other, again = (
        evaluate_json(str(tmp_path), "--episodes", "8", "--seed", seed)[0]["returns"] for seed in ("0", "1", "0")
    )
    assert len(set(first)) > 1 and other != first and again == first, (first, other, again)


def test_episodes_out_of_range_is_one_line(tmp_path):
    """Episode i of --seed S plays start seed base + S * 100000 + i: more than 100000 episodes would
    run into the next seed's starts."""
    for n in ("0", "100001"):
        line = one_error_line(apexq("evaluate", str(tmp_path), "--episodes", n))
        assert line == f"apexq: error: --episodes: must be between 1 and 100000, got {n}", line


def copy_policy(src: Path, dst: Path, names=("policy.json", "policy.safetensors")) -> Path:
    dst.mkdir()
    for n in names:
        (dst / n).write_bytes((src / n).read_bytes())
    return dst


def test_a_hostile_policy_pt2_runs_nothing(exported, tmp_path):
    marker = tmp_path / "marker"
    hostile_pt2(exported / "policy.pt2", tmp_path / "hostile.pt2", marker)
    # the file is really hostile: torch.export.load runs its payload
    subprocess.run(
        [sys.executable, "-c", f"import torch; torch.export.load({str(tmp_path / 'hostile.pt2')!r})"],
        capture_output=True,
        timeout=120,
    )
    assert marker.is_dir()
    marker.rmdir()

    with_safe = copy_policy(exported, tmp_path / "with-safe-files")
    (with_safe / "policy.pt2").write_bytes((tmp_path / "hostile.pt2").read_bytes())
    alone = copy_policy(exported, tmp_path / "alone", names=())
    (alone / "policy.pt2").write_bytes((tmp_path / "hostile.pt2").read_bytes())
    # a run directory holding it evaluates the safe files; a direct path reads them beside it
    for target in (with_safe, with_safe / "policy.pt2"):
        res, _ = evaluate_json(str(target), "--episodes", "3")
        assert res["source"] == str(with_safe / "policy.json") and res["weights_version"] == 3
        assert not marker.exists(), target
    # nothing safe beside it: one line, nothing run
    line = one_error_line(apexq("evaluate", str(alone / "policy.pt2")))
    assert "apexq never loads .pt2 files" in line and not marker.exists()
    line = one_error_line(apexq("evaluate", str(alone)))
    assert line.endswith("no policy.json or checkpoint.pt there (only policy.pt2, which apexq never loads)")
    # the same payload as a checkpoint: torch.load(weights_only=True) refuses it
    (alone / "checkpoint.pt").write_bytes(pickle.dumps(Payload(marker)))
    one_error_line(apexq("evaluate", str(alone / "checkpoint.pt")), f"apexq: error: {alone / 'checkpoint.pt'}: not a")
    assert not marker.exists()


def spoil_json(d: Path, **fields) -> None:
    desc = json.loads((d / "policy.json").read_text())
    (d / "policy.json").write_text(json.dumps({**desc, **fields}))


def test_broken_policy_files_and_checkpoints_are_one_line_exit_2(exported, tmp_path):
    import torch

    from apexq.learner.network import build_network

    cases = []
    d = copy_policy(exported, tmp_path / "garbage-weights")
    (d / "policy.safetensors").write_bytes(os.urandom(300))
    cases.append((d, f"{d / 'policy.safetensors'}: not a readable safetensors file"))
    d = copy_policy(exported, tmp_path / "wrong-shape")
    spoil_json(d, hidden_sizes=[17])
    cases.append((d, "body.0.weight: shape (16, 2), expected (17, 2)"))
    d = copy_policy(exported, tmp_path / "absurd")
    spoil_json(d, hidden_sizes=[2**40])
    cases.append((d, f"{d / 'policy.json'}: hidden_sizes: expected a list"))
    d = copy_policy(exported, tmp_path / "nan")
    (d / "policy.json").write_text(
        (d / "policy.json").read_text().replace('"eval_return": -200.0', '"eval_return": NaN')
    )
    cases.append((d, f"{d / 'policy.json'}: not readable JSON"))
    d = copy_policy(exported, tmp_path / "garbage-pt2", names=())
    (d / "policy.pt2").write_bytes(b"PK\x03\x04" + os.urandom(500))
    cases.append((d / "policy.pt2", "apexq never loads .pt2 files"))
    d = copy_policy(exported, tmp_path / "format-only", names=())
    torch.save({"format": "apexq-checkpoint-v1"}, d / "checkpoint.pt")
    cases.append((d, f"{d / 'checkpoint.pt'}: settings: expected dict, got NoneType"))
    good = {
        "format": "apexq-checkpoint-v1",
        "settings": {"hidden_sizes": [16], "dueling": False},
        "spec": SPEC,
        "online": build_network(SPEC, [16], False).state_dict(),
        "config": {"env": {"id": "MountainCar-v0"}},
        "updates": 7,
    }
    d = copy_policy(exported, tmp_path / "good-checkpoint", names=())
    torch.save(good, d / "checkpoint.pt")
    res, _ = evaluate_json(str(d / "checkpoint.pt"), "--episodes", "2")  # the crafted form itself is sound
    assert res["updates"] == 7 and res["env"] == "MountainCar-v0"
    d = copy_policy(exported, tmp_path / "wrong-shape-checkpoint", names=())
    torch.save({**good, "online": {**good["online"], "head.bias": torch.zeros(4)}}, d / "checkpoint.pt")
    cases.append((d / "checkpoint.pt", f"{d / 'checkpoint.pt'}: online: head.bias: shape (4,), expected (3,)"))
    d = copy_policy(exported, tmp_path / "renamed-checkpoint", names=())
    torch.save({**good, "online": {("w" + k): v for k, v in good["online"].items()}}, d / "checkpoint.pt")
    cases.append((d / "checkpoint.pt", "online: tensors do not fit the network described: missing ['body.0.bias'"))
    for target, message in cases:
        line = one_error_line(apexq("evaluate", str(target)))
        assert message in line, (target, line)
