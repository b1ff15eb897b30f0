"""One-buffer gradients and fused Adam: same numbers as the textbook torch calls."""
import copy

import pytest
import torch

from learner.network import QNetwork
from learner.optim import FlatGradients, make_adam


def test_clip_by_hand():
    # loss = 3a + 4b: gradients (3, 4), global norm 5; clipping to 1 gives (0.6, 0.8)
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1, 1))
    g = FlatGradients([a, b])
    g.zero_()
    (3 * a.sum() + 4 * b.sum()).backward()
    assert g.buffer.tolist() == [3.0, 4.0]
    norm = g.clip_(1.0)
    assert float(norm) == 5.0
    torch.testing.assert_close(a.grad, torch.tensor([0.6]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, torch.tensor([[0.8]]), rtol=1e-5, atol=1e-6)
    # under the limit nothing changes
    g.zero_()
    (0.3 * a.sum()).backward()
    g.clip_(1.0)
    assert a.grad.tolist() == pytest.approx([0.3]) and b.grad.tolist() == [[0.0]]


def test_backward_accumulates_into_the_buffer_in_place():
    net = QNetwork(2, 3, (8, 8))
    g = FlatGradients(net.parameters())
    for _ in range(2):  # a second update must still write into the same buffer
        g.zero_()
        net(torch.randn(5, 2)).pow(2).sum().backward()
        start, end = g.buffer.data_ptr(), g.buffer.data_ptr() + g.buffer.numel() * g.buffer.element_size()
        assert all(start <= p.grad.data_ptr() < end for p in net.parameters())  # still views of the buffer
        assert float(g.buffer.abs().sum()) > 0
        assert torch.equal(torch.cat([p.grad.reshape(-1) for p in net.parameters()]), g.buffer)


def test_update_matches_foreach_adam_with_clip_grad_norm():
    torch.manual_seed(0)
    ref = QNetwork(2, 3, (16, 16))
    new = copy.deepcopy(ref)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=0.01, foreach=True)
    opt_new = make_adam(new.parameters(), 0.01)
    grads = FlatGradients(new.parameters())
    for step in range(5):
        x = torch.randn(32, 2) * 3
        opt_ref.zero_grad(set_to_none=True)
        (ref(x) ** 2).mean().backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5, foreach=True)
        opt_ref.step()
        grads.zero_()
        (new(x) ** 2).mean().backward()
        grads.clip_(0.5)
        opt_new.step()
    for p, q in zip(ref.parameters(), new.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_mixed_devices_or_dtypes_are_refused():
    with pytest.raises(ValueError, match="one device with one dtype"):
        FlatGradients([torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))])
