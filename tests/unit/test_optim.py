"""FlatAdam: parameters and gradients in one buffer each, torch.optim.Adam's numbers."""

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apexq.learner.network import QNetwork
from apexq.learner.optim import FlatAdam

TESTS = str(Path(__file__).resolve().parents[1])  # tests/default_components.py, for a fresh process


def test_adam_steps_by_hand():
    # one scalar parameter p = 1.0, lr 0.1, default betas/eps; gradients 0.5 then -1.0
    p = torch.nn.Parameter(torch.tensor([1.0]))
    opt = FlatAdam([p], lr=0.1)
    # step 1: m = 0.1*0.5 = 0.05, v = 0.001*0.25 = 0.00025; m_hat = 0.5, v_hat = 0.25 -> p -= 0.1*0.5/(0.5+1e-8)
    p.grad.fill_(0.5)
    opt.step()
    assert p.item() == pytest.approx(1.0 - 0.1 * 0.5 / (0.5 + 1e-8), abs=1e-7)
    assert p.item() == pytest.approx(0.9, abs=1e-7)
    # step 2: m = 0.9*0.05 - 0.1 = -0.055, v = 0.999*0.00025 + 0.001 = 0.00124975
    #         p += 0.1 * (0.055/0.19) / (sqrt(0.00124975/0.001999) + 1e-8) = 0.9 + 0.0366102...
    opt.zero_grad()
    p.grad.fill_(-1.0)
    opt.step()
    expected = 0.9 + 0.1 * (0.055 / 0.19) / (math.sqrt(0.00124975 / 0.001999) + 1e-8)
    assert expected == pytest.approx(0.93661, abs=1e-5)
    assert p.item() == pytest.approx(expected, abs=1e-6)


def test_clip_by_hand():
    # loss = 3a + 4b: gradients (3, 4), global norm 5; clipping to 1 gives (0.6, 0.8)
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1, 1))
    opt = FlatAdam([a, b], lr=0.1)
    opt.zero_grad()
    (3 * a.sum() + 4 * b.sum()).backward()
    assert opt.grad.tolist() == [3.0, 4.0]
    norm = opt.clip_grad_norm_(1.0)
    assert float(norm) == 5.0
    torch.testing.assert_close(a.grad, torch.tensor([0.6]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, torch.tensor([[0.8]]), rtol=1e-5, atol=1e-6)
    # under the limit nothing changes
    opt.zero_grad()
    (0.3 * a.sum()).backward()
    opt.clip_grad_norm_(1.0)
    assert a.grad.tolist() == pytest.approx([0.3]) and b.grad.tolist() == [[0.0]]


def test_parameters_and_gradients_stay_views_of_the_buffers():
    net = QNetwork(2, 3, (8, 8), False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = FlatAdam(net.parameters(), lr=0.01)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # values kept

    def inside(t, buf):
        start = buf.data_ptr()
        return start <= t.data_ptr() < start + buf.numel() * buf.element_size()

    for _ in range(2):  # a second update must still write into the same buffers
        opt.zero_grad()
        net(torch.randn(5, 2)).pow(2).sum().backward()
        assert all(inside(p.grad, opt.grad) and inside(p, opt.flat) for p in net.parameters())
        assert float(opt.grad.abs().sum()) > 0
        assert torch.equal(torch.cat([p.grad.reshape(-1) for p in net.parameters()]), opt.grad)
        opt.step()
        assert torch.equal(torch.cat([p.detach().reshape(-1) for p in net.parameters()]), opt.flat)
    # loading the module's state writes into the buffer too
    net.load_state_dict(before)
    assert torch.equal(torch.cat([before[name].reshape(-1) for name, _ in net.named_parameters()]), opt.flat)


def test_updates_match_torch_adam_with_clip_grad_norm():
    torch.manual_seed(0)
    ref = QNetwork(2, 3, (16, 16), False)
    new = copy.deepcopy(ref)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=0.01, foreach=False)
    opt_new = FlatAdam(new.parameters(), 0.01)
    for _ in range(5):
        x = torch.randn(32, 2) * 3
        opt_ref.zero_grad(set_to_none=True)
        (ref(x) ** 2).mean().backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5, foreach=False)
        opt_ref.step()
        opt_new.zero_grad()
        (new(x) ** 2).mean().backward()
        opt_new.clip_grad_norm_(0.5)
        opt_new.step()
    for p, q in zip(ref.parameters(), new.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # the state is in torch.optim.Adam's format, with the same moments
    sr, sn = opt_ref.state_dict(), opt_new.state_dict()
    assert sorted(sr["state"]) == sorted(sn["state"])
    for k in sr["state"]:
        assert float(sn["state"][k]["step"]) == 5.0
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sr["state"][k][name], sn["state"][k][name], rtol=1e-5, atol=1e-7)


def test_graph_step_by_hand():
    """graph_step(), the CUDA-graph form, takes the hand-computed steps of test_adam_steps_by_hand."""
    p = torch.nn.Parameter(torch.tensor([1.0]))
    opt = FlatAdam([p], lr=0.1)
    opt.enable_graph_step()
    p.grad.fill_(0.5)
    opt.graph_step()
    assert p.item() == pytest.approx(0.9, abs=1e-6) and float(opt.t) == 1.0
    assert opt.steps == 0  # the host count is the caller's (one per replay)
    opt.zero_grad()
    p.grad.fill_(-1.0)
    opt.graph_step()
    assert p.item() == pytest.approx(0.9 + 0.1 * (0.055 / 0.19) / (math.sqrt(0.00124975 / 0.001999) + 1e-8), abs=1e-6)


def test_graph_step_follows_step_and_resumes_at_the_saved_count():
    torch.manual_seed(2)
    a = QNetwork(2, 3, (8, 8), False)
    b = copy.deepcopy(a)
    oa, ob = FlatAdam(a.parameters(), 0.01), FlatAdam(b.parameters(), 0.01)
    ob.enable_graph_step()
    for _ in range(20):
        x = torch.randn(32, 2)
        for net, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.clip_grad_norm_(0.5)
            opt.step() if opt is oa else opt.graph_step()
        ob.steps += 1
    for p, q in zip(a.parameters(), b.parameters()):  # float32 bias corrections: rounding differs
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
    # a snapshot undoes steps in place; a loaded state sets the device count too
    before = [ob.flat.clone(), ob.exp_avg.clone(), ob.exp_avg_sq.clone()]
    snap = ob.snapshot()
    ptr = ob.flat.data_ptr()
    ob.graph_step()
    assert not torch.equal(ob.flat, before[0]) and float(ob.t) == 21.0
    ob.restore(snap)
    assert all(torch.equal(x, y) for x, y in zip((ob.flat, ob.exp_avg, ob.exp_avg_sq), before))
    assert ob.flat.data_ptr() == ptr and float(ob.t) == 20.0
    c = FlatAdam(copy.deepcopy(a).parameters(), 0.01)
    c.enable_graph_step()
    c.load_state_dict(oa.state_dict())
    assert c.steps == 20 and float(c.t) == 20.0


def test_resumes_from_a_torch_adam_state():
    """Checkpoints written with torch.optim.Adam (before FlatAdam) continue the same trajectory."""
    torch.manual_seed(1)
    ref = QNetwork(2, 3, (8,), False)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=0.01, fused=True)
    xs = [torch.randn(16, 2) for _ in range(6)]
    for x in xs[:3]:
        opt_ref.zero_grad()
        ref(x).pow(2).mean().backward()
        opt_ref.step()
    new = copy.deepcopy(ref)
    opt_new = FlatAdam(new.parameters(), 0.01)
    opt_new.load_state_dict(opt_ref.state_dict())
    assert opt_new.steps == 3
    for x in xs[3:]:
        for net, opt in ((ref, opt_ref), (new, opt_new)):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
    for p, q in zip(ref.parameters(), new.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # its own state round-trips
    again = FlatAdam(copy.deepcopy(new).parameters(), 0.01)
    again.load_state_dict(opt_new.state_dict())
    assert again.steps == 6 and torch.equal(again.exp_avg, opt_new.exp_avg)


def test_mismatched_state_is_refused():
    opt = FlatAdam(QNetwork(2, 3, (8,), False).parameters(), 0.01)
    other = torch.optim.Adam(QNetwork(2, 3, (8, 8), False).parameters())
    with pytest.raises(ValueError, match="6 parameters in 1 groups; this network has 4"):
        opt.load_state_dict(other.state_dict())
    wrong = FlatAdam(QNetwork(2, 3, (9,), False).parameters(), 0.01)
    wrong.step()
    with pytest.raises(ValueError, match=r"exp_avg of parameter 0 has shape \(9, 2\), expected \(8, 2\)"):
        opt.load_state_dict(wrong.state_dict())


def test_mixed_devices_or_dtypes_are_refused():
    with pytest.raises(ValueError, match="one device with one dtype"):
        FlatAdam([torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))], 0.1)


def test_learner_never_imports_torch_dynamo(tmp_path):
    """torch.optim and torch.export import torch._dynamo (1.5-2.4 s here): neither the learner's
    start-up nor its updates nor its checkpoints (the policy export runs in a helper) may."""
    code = (
        "import os, sys, torch\n"
        f"sys.path.insert(0, {TESTS!r})\n"
        "from apexq.learner.learner import Learner\n"
        "from default_components import learner_settings\n"
        "spec = {'obs_dim': 2, 'num_actions': 3, 'obs_low': [-1.2, -0.07], 'obs_high': [0.6, 0.07]}\n"
        f"lr = Learner(learner_settings(batch_size=8), spec, [], checkpoint_path={str(tmp_path / 'ck.pt')!r})\n"
        "b = {'obs': torch.zeros(8, 2), 'next_obs': torch.zeros(8, 2), 'action': torch.zeros(8, dtype=torch.long),\n"
        "     'ret': torch.zeros(8), 'discount': torch.ones(8), 'weights': torch.ones(8)}\n"
        "lr.step(b)\n"
        "lr.load_state(lr.state())\n"
        "lr.save_checkpoint()\n"
        f"assert os.path.exists({str(tmp_path / 'policy.pt2')!r})\n"
        "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
