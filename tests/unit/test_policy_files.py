"""The exported policy's files: ONNX and safetensors + JSON give torch's Q-values; bad files are one line."""

import json
import logging
import sys

import numpy as np
import pytest
import torch

from apexq.actors.policy import NumpyQPolicy
from apexq.learner.export import export_policy
from apexq.learner.network import build_network
from apexq.learner.policy_file import PolicyFileError, read_policy_files

SPEC = {"obs_dim": 2, "num_actions": 3, "obs_low": [-1.2, -0.07], "obs_high": [0.6, 0.07]}
INFO = {"env_id": "MountainCar-v0", "weights_version": 41, "eval_return": -123.5}


def net_with_random_weights(dueling: bool, seed: int = 0, hidden=(16, 8)):
    torch.manual_seed(seed)
    net = build_network(SPEC, list(hidden), dueling)
    with torch.no_grad():
        for p in net.parameters():
            p.uniform_(-1, 1)
    return net


def observations(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(-1.2, 0.6, n), rng.uniform(-0.07, 0.07, n)], 1).astype(np.float32)


def torch_q(net, obs: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(obs)).numpy()


def onnx_q(path, obs: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type, i.shape[1]) for i in session.get_inputs()] == [("obs", "tensor(float)", 2)]
    assert [o.name for o in session.get_outputs()] == ["q"]
    return session.run(["q"], {"obs": obs})[0]


@pytest.mark.parametrize("dueling", [False, True])
def test_export_writes_files_that_give_torchs_q_values(tmp_path, dueling):
    net = net_with_random_weights(dueling)
    export_policy(net, tmp_path / "policy.pt2", INFO)
    assert {p.name for p in tmp_path.iterdir()} == {"policy.pt2", "policy.safetensors", "policy.json", "policy.onnx"}
    for n in (1, 37):  # the batch axis is dynamic
        obs = observations(n)
        np.testing.assert_allclose(onnx_q(tmp_path / "policy.onnx", obs), torch_q(net, obs), atol=1e-5, rtol=0)
    desc, weights = read_policy_files(tmp_path / "policy")
    # the description, by hand: MountainCar's bounds map to [-1, 1] around their middle
    assert desc["obs_center"] == pytest.approx([-0.3, 0.0]) and desc["obs_half_range"] == pytest.approx([0.9, 0.07])
    assert (desc["obs_dim"], desc["num_actions"], desc["hidden_sizes"], desc["dueling"]) == (2, 3, [16, 8], dueling)
    assert (desc["env_id"], desc["weights_version"], desc["eval_return"]) == ("MountainCar-v0", 41, -123.5)
    # rebuilt from safetensors + JSON: identical Q-values, in torch and in the numpy forward evaluate runs
    rebuilt = build_network(desc, desc["hidden_sizes"], desc["dueling"])
    rebuilt.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    obs = observations(64)
    assert np.array_equal(torch_q(rebuilt, obs), torch_q(net, obs))
    policy = NumpyQPolicy(desc, desc["hidden_sizes"], desc["dueling"])
    policy.load_state(weights)
    np.testing.assert_allclose(policy.q_values(obs), torch_q(net, obs), atol=1e-5, rtol=0)


def test_repeated_exports_carry_the_current_weights_into_every_file(tmp_path):
    from apexq.learner.export import PolicyExporter

    exporter, obs = PolicyExporter(), observations(20)
    net = net_with_random_weights(False, seed=0)
    exporter.save(net, tmp_path / "policy.pt2", INFO)
    first = onnx_q(tmp_path / "policy.onnx", obs)
    net.load_state_dict(net_with_random_weights(False, seed=1).state_dict())
    exporter.save(net, tmp_path / "policy.pt2", {**INFO, "weights_version": 42})
    assert not np.allclose(first, torch_q(net, obs))
    np.testing.assert_allclose(onnx_q(tmp_path / "policy.onnx", obs), torch_q(net, obs), atol=1e-5, rtol=0)
    desc, weights = read_policy_files(tmp_path / "policy")
    assert desc["weights_version"] == 42
    assert all(np.array_equal(weights[k], v.numpy()) for k, v in net.state_dict().items())


def test_without_onnx_the_export_skips_policy_onnx_with_one_log_line(tmp_path, monkeypatch, caplog):
    from apexq.learner.export import PolicyExporter

    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    exporter, net = PolicyExporter(), net_with_random_weights(False)
    with caplog.at_level(logging.WARNING, logger="apexq.learner.onnx_export"):
        exporter.save(net, tmp_path / "policy.pt2", INFO)
        exporter.save(net, tmp_path / "policy.pt2", INFO)
    assert {p.name for p in tmp_path.iterdir()} == {"policy.pt2", "policy.safetensors", "policy.json"}
    lines = [r.getMessage() for r in caplog.records if r.name == "apexq.learner.onnx_export"]
    assert len(lines) == 1 and "pip install 'apexq[onnx]'" in lines[0] and caplog.records[0].levelname == "WARNING"


# -- hostile files: each is one PolicyFileError line naming the file and the field ----------------------


def edit_json(tmp_path, **fields):
    path = tmp_path / "policy.json"
    d = json.loads(path.read_text())
    d.update(fields)
    path.write_text(json.dumps(d))


def swap_weights(tmp_path, change):
    from safetensors.numpy import load_file, save_file

    state = load_file(tmp_path / "policy.safetensors")
    change(state)
    save_file(state, tmp_path / "policy.safetensors")


CASES = {
    "hidden size absurd": (lambda t: edit_json(t, hidden_sizes=[10**12]), "policy.json: hidden_sizes: expected"),
    "too many parameters": (lambda t: edit_json(t, hidden_sizes=[60_000] * 40), "more than 100000000 parameters"),
    "hidden size a string": (lambda t: edit_json(t, hidden_sizes=["16", 8]), "policy.json: hidden_sizes:"),
    "obs_dim a bool": (lambda t: edit_json(t, obs_dim=True), "policy.json: obs_dim: expected an integer"),
    "num_actions zero": (lambda t: edit_json(t, num_actions=0), "policy.json: num_actions: expected an integer"),
    "dueling a string": (lambda t: edit_json(t, dueling="yes"), "policy.json: dueling: expected true or false"),
    "half range zero": (lambda t: edit_json(t, obs_half_range=[0.9, 0.0]), "policy.json: obs_half_range: expected"),
    "center infinite": (
        lambda t: (t / "policy.json").write_text(
            (t / "policy.json")
            .read_text()
            .replace('"obs_center": [\n  -0.30000001192092896', '"obs_center": [\n  Infinity')
        ),
        "policy.json: not readable JSON",
    ),
    "eval_return a string": (lambda t: edit_json(t, eval_return="-100"), "policy.json: eval_return: expected"),
    "env_id a number": (lambda t: edit_json(t, env_id=7), "policy.json: env_id: expected"),
    "wrong format": (lambda t: edit_json(t, format="apexq-policy-v9"), "policy.json: format: expected"),
    "json not an object": (lambda t: (t / "policy.json").write_text("[1, 2]"), "policy.json: format: expected"),
    "json garbage": (lambda t: (t / "policy.json").write_bytes(b"\x00\xff{{"), "policy.json: not readable JSON"),
    "json huge": (lambda t: (t / "policy.json").write_text(" " * (2 << 20)), "policy.json: larger than"),
    "json missing": (lambda t: (t / "policy.json").unlink(), "policy.json: missing"),
    "scaling disagrees": (lambda t: edit_json(t, obs_center=[-0.25, 0.0]), "obs_center: differs from"),
    "wider than described": (
        lambda t: edit_json(t, hidden_sizes=[32, 8]),
        "body.0.weight: shape (16, 2), expected (32, 2)",
    ),
    "a tensor renamed": (
        lambda t: swap_weights(t, lambda s: s.update(extra=s.pop("head.bias"))),
        "missing ['head.bias'], unexpected ['extra']",
    ),
    "a tensor reshaped": (
        lambda t: swap_weights(t, lambda s: s.update({"head.bias": np.zeros(4, np.float32)})),
        "head.bias: shape (4,), expected (3,)",
    ),
    "a tensor float64": (
        lambda t: swap_weights(t, lambda s: s.update({"head.bias": np.zeros(3)})),
        "head.bias: dtype F64, expected float32",
    ),
    "a NaN weight": (
        lambda t: swap_weights(t, lambda s: s["body.0.weight"].__setitem__((0, 0), np.nan)),
        "policy.safetensors: body.0.weight: holds NaN",
    ),
    "safetensors garbage": (
        lambda t: (t / "policy.safetensors").write_bytes(b"garbage" * 50),
        "policy.safetensors: not a readable safetensors file",
    ),
    "safetensors cut short": (
        lambda t: (t / "policy.safetensors").write_bytes((t / "policy.safetensors").read_bytes()[:-20]),
        "policy.safetensors: not a readable safetensors file",
    ),
}


@pytest.fixture
def exported(tmp_path):
    export_policy(net_with_random_weights(False), tmp_path / "policy.pt2", INFO)
    read_policy_files(tmp_path / "policy")  # sound as written
    return tmp_path


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_policy_file_is_one_line_naming_the_file_and_field(exported, case):
    spoil, message = CASES[case]
    spoil(exported)
    with pytest.raises(PolicyFileError) as err:
        read_policy_files(exported / "policy")
    text = str(err.value)
    assert message in text and str(exported) in text and "\n" not in text, text
