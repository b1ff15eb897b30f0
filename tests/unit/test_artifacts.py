"""The learner's files as bytes: the outbox's versions, the run directory's writes, a checkpoint's round trip."""

import numpy as np
import pytest
import torch
from default_components import learner_settings

from apexq.cluster.run_dir import RunDir
from apexq.learner.artifacts import Outbox
from apexq.learner.checkpoint import CheckpointError, dumps, loads
from apexq.learner.learner import Learner

SPEC = {"obs_dim": 2, "num_actions": 3, "obs_low": [-1.2, -0.07], "obs_high": [0.6, 0.07]}


def test_outbox_hands_over_only_what_is_newer_and_everything_to_another_process():
    box = Outbox()
    assert box.since("", 0) == (box.token, 0, {})
    assert box.put({"checkpoint.pt": b"c1"}) == 1
    assert box.put({"policy.json": b"j2", "policy.pt2": b"p2"}) == 2
    assert box.since(box.token, 0)[2] == {"checkpoint.pt": b"c1", "policy.json": b"j2", "policy.pt2": b"p2"}
    assert box.since(box.token, 1) == (box.token, 2, {"policy.json": b"j2", "policy.pt2": b"p2"})
    assert box.since(box.token, 2)[2] == {}
    box.put({"checkpoint.pt": b"c3"})
    assert box.since(box.token, 2)[2] == {"checkpoint.pt": b"c3"}
    # a driver that last took version 9 from an earlier learner process gets all of this one's
    assert box.since("another-process", 9) == (
        box.token,
        3,
        {"checkpoint.pt": b"c3", "policy.json": b"j2", "policy.pt2": b"p2"},
    )
    assert box.mark() == (box.token, 3) and Outbox().token != box.token
    with pytest.raises(ValueError, match="not a file of a run"):
        box.put({"../config.yaml": b"x"})


def test_run_dir_writes_only_run_files_each_replacing_the_old_one(tmp_path):
    rd = RunDir(tmp_path)
    rd.write_files({"checkpoint.pt": b"one", "policy.json": b"{}"})
    rd.write_files({"checkpoint.pt": b"two"})
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"two" and (tmp_path / "policy.json").read_bytes() == b"{}"
    for bad in ({"config.yaml": b"x"}, {"../escape.pt": b"x"}, {"checkpoint.pt": "not bytes"}):
        with pytest.raises(ValueError, match="not a file of a run"):
            rd.write_files(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "policy.json"]


def test_checkpoint_bytes_round_trip_and_garbage_is_refused():
    state = {"format": "apexq-checkpoint-v1", "updates": 7, "w": torch.arange(3.0)}
    back = loads(dumps(state), "here")
    assert back["updates"] == 7 and torch.equal(back["w"], torch.arange(3.0))
    with pytest.raises(CheckpointError, match="here: not a readable apexq checkpoint"):
        loads(b"garbage", "here")
    with pytest.raises(CheckpointError, match="here: not an apexq checkpoint"):
        loads(dumps({"format": "other"}), "here")
    with pytest.raises(CheckpointError, match="here: expected bytes, got str"):
        loads("text", "here")


def test_learner_without_a_path_puts_checkpoint_and_policy_in_its_outbox_and_restores_from_them(tmp_path, monkeypatch):
    import tempfile

    private = tmp_path / "node-tmp"  # the learner node's temporary folder
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    s = learner_settings(batch_size=8, device="cpu", checkpoint_every_s=1e9)
    a = Learner(s, SPEC, [], config={"env": {"id": "MountainCar-v0"}})
    with torch.no_grad():
        for p in a.online.parameters():
            p.add_(0.5)
    a.updates, a.weights_version = 41, 9
    assert a.save_checkpoint({"env_steps": 1234}) == "outbox"  # waits for the export
    token, version, files = a.artifacts("", 0)
    # the export's files are in the outbox by the time save_checkpoint returns
    assert {"checkpoint.pt", "policy.safetensors", "policy.json", "policy.pt2"} <= set(files), sorted(files)
    assert a.artifacts(token, version)[2] == {}
    assert [p.name for p in tmp_path.iterdir()] == ["node-tmp"]  # nothing written but the export's folder,
    assert not list(private.iterdir())  # which is gone once its files were read
    b = Learner(s, SPEC, [], config={"env": {"id": "MountainCar-v0"}})
    b.restore(files["checkpoint.pt"])
    x = torch.tensor([[-0.5, 0.01], [0.3, -0.05]])
    assert torch.equal(a.online(x), b.online(x)) and b.updates == 41 and b.extra["env_steps"] == 1234
    # published versions keep rising past both the checkpoint's and this process's own
    assert b.weights_version == 10
    rd = RunDir(tmp_path)
    rd.write_files(files)
    # the files the driver wrote are the policy apexq evaluate reads: the same Q values
    from apexq.actors.policy import NumpyQPolicy
    from apexq.learner.policy_file import read_policy_files

    desc, weights = read_policy_files(tmp_path / "policy")
    assert desc["env_id"] == "MountainCar-v0" and desc["weights_version"] == 9
    policy = NumpyQPolicy(SPEC, desc["hidden_sizes"], desc["dueling"])
    policy.load_state(weights)
    np.testing.assert_allclose(policy.q_values(x.numpy()), a.online(x).detach().numpy(), rtol=1e-5, atol=1e-5)
