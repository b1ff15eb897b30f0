"""The learner's CUDA path: the same updates as on the CPU, CUDA graphs, pinned prefetch, checkpoints.

Skipped where torch sees no CUDA device (CI, this project's machines); run on a GPU machine with
``python -m pytest tests/unit/test_learner_cuda.py``. Needs torch, numpy and redis-py (imported
by the replay shard), no Redis server and no Ray.
"""

import threading

import numpy as np
import pytest
import torch
from default_components import learner_settings, shard_spec
from test_learner import Remote  # a shard seen as another process's

from apexq.learner.checkpoint import load
from apexq.learner.learner import Learner
from apexq.learner.prefetch import PrefetchSampler
from apexq.replay_server.codec import Block
from apexq.replay_server.shard import ReplayShard

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SPEC = {"obs_dim": 2, "num_actions": 3, "obs_low": [-1.2, -0.07], "obs_high": [0.6, 0.07]}
B = 64


def shard_with(n=4000, seed=0):
    sh = ReplayShard(
        shard_spec(capacity=n, min_size_to_sample=10, samples_per_insert=1.0, error_buffer=1e9), "", "t", seed
    )
    rng = np.random.default_rng(seed)
    obs = np.stack([rng.uniform(-1.2, 0.6, n), rng.uniform(-0.07, 0.07, n)], 1).astype(np.float32)
    sh.insert(
        Block(
            obs,
            rng.integers(0, 3, n).astype(np.int32),
            rng.normal(-2, 1, n).astype(np.float32),
            np.where(rng.random(n) < 0.1, 0.0, 0.99**3).astype(np.float32),
            obs + 0.01,
            np.ones(n, np.float32),
        )
    )
    return sh


def make(tmp_path, device, shards=(), **kw):
    kw.setdefault("cuda_graphs", False)  # the eager update is the reference
    s = learner_settings(
        batch_size=B,
        device=device,
        publish_every=10**9,
        checkpoint_every_s=1e9,
        prefetch=4,
        target_update_period=3,
        **kw,
    )
    return Learner(s, SPEC, list(shards), checkpoint_path=str(tmp_path / f"{device}.pt"))


def batches(n, seed=0, sizes=None):
    """n different minibatches on the CPU (a graph replay that read stale inputs would show)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        b = sizes[i] if sizes else B
        obs = torch.rand(b, 2, generator=g) * torch.tensor([1.8, 0.14]) - torch.tensor([1.2, 0.07])
        out.append(
            {
                "obs": obs,
                "next_obs": obs + 0.01,
                "action": torch.randint(0, 3, (b,), generator=g),
                "ret": torch.randn(b, generator=g),
                "discount": torch.where(torch.rand(b, generator=g) < 0.2, 0.0, 0.97**3),
                "weights": torch.rand(b, generator=g) * 0.9 + 0.1,
            }
        )
    return out


def on(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def assert_same_update(a: Learner, b: Learner, steps: int, sizes=None) -> None:
    b.online.load_state_dict(a.online.state_dict())
    b.target.load_state_dict(a.target.state_dict())
    for i, batch in enumerate(batches(steps, sizes=sizes)):
        ea, eb = a.step(on(batch, a.device)), b.step(on(batch, b.device))
        torch.testing.assert_close(eb["td"].cpu(), ea["td"].cpu(), rtol=1e-4, atol=1e-5, msg=f"td of update {i}")
        torch.testing.assert_close(eb["loss"].cpu(), ea["loss"].cpu(), rtol=1e-4, atol=1e-6)
    for pa, pb in zip(a.online.parameters(), b.online.parameters()):
        torch.testing.assert_close(pb.detach().cpu(), pa.detach().cpu(), rtol=1e-4, atol=1e-5)
    for pa, pb in zip(a.target.parameters(), b.target.parameters()):
        torch.testing.assert_close(pb.cpu(), pa.cpu(), rtol=1e-4, atol=1e-5)
    sa, sb = a.opt.state_dict(), b.opt.state_dict()
    assert a.opt.steps == b.opt.steps == steps
    for k in sa["state"]:
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sb["state"][k][name].cpu(), sa["state"][k][name].cpu(), rtol=1e-4, atol=1e-6)


def test_cuda_update_matches_cpu(tmp_path):
    """Ten updates (target syncs every 3, terminal transitions, importance weights) on both devices."""
    assert_same_update(make(tmp_path, "cpu"), make(tmp_path, "cuda"), 10)


@pytest.mark.parametrize("tau", [0.0, 0.05], ids=["hard_sync", "polyak"])
def test_cuda_graphs_update_matches_eager(tmp_path, tau):
    """learner.cuda_graphs: the captured update, replayed on fresh minibatches, gives the eager
    updates; capturing changes no weights; a minibatch of another size runs eagerly in between."""
    graphs = make(tmp_path, "cuda", cuda_graphs=True, target_tau=tau)
    assert graphs._graphs and graphs._graph is None
    sizes = [B] * 6 + [B // 2] + [B] * 5
    assert_same_update(make(tmp_path, "cuda", target_tau=tau), graphs, 12, sizes)
    assert graphs._graph is not None and graphs.updates == 12 and float(graphs.opt.t) == 12.0


def test_compiled_forward_inside_the_cuda_graph_matches_eager(tmp_path):
    """learner.compile and learner.cuda_graphs together: inductor's kernels captured in the graph."""
    both = make(tmp_path, "cuda", cuda_graphs=True, compile=True)
    assert_same_update(make(tmp_path, "cuda"), both, 6)
    assert both._graph is not None


def test_cuda_graphs_priorities_are_not_overwritten_by_later_replays(tmp_path):
    sh = shard_with()
    eager = make(tmp_path, "cuda", [sh], batches_per_request=4)
    graphs = make(tmp_path, "cuda", [sh], batches_per_request=4, cuda_graphs=True)
    graphs.online.load_state_dict(eager.online.state_dict())
    graphs.target.load_state_dict(eager.target.state_dict())
    sent = {"eager": [], "graphs": []}
    for name, lr in (("eager", eager), ("graphs", graphs)):
        lr.shards = [type("S", (), {"update_priorities": lambda self, k, p, out=sent[name]: out.append((k, p))})()]
        lr.inline_priorities = True
        for i, batch in enumerate(batches(8, seed=1)):
            keys = np.arange(i * B, (i + 1) * B)
            lr.send_priorities(keys, np.zeros(B, np.int32), lr.step(on(batch, "cuda"))["td"])
        lr.flush_priorities()  # the last request's copy to the host may not have landed yet
    assert len(sent["eager"]) == len(sent["graphs"]) == 2
    for (ka, pa), (kb, pb) in zip(sent["eager"], sent["graphs"]):
        assert np.array_equal(ka, kb)
        np.testing.assert_allclose(pb, pa, rtol=1e-4, atol=1e-5)


def test_prefetch_thread_pins_and_copies_to_the_device():
    sampler = PrefetchSampler(
        [Remote(shard_with(), nonblocking=True)], B, 4, torch.device("cuda"), lambda: 0.5, batches_per_request=4
    ).start()
    try:
        assert not sampler.prepare_on_get
        got = [sampler.get(timeout=10) for _ in range(8)]
    finally:
        sampler.stop()
    for b in got:
        assert b["obs"].is_cuda and b["obs"].shape == (B, 2) and b["action"].dtype == torch.int64
        assert float(b["weights"].max()) == 1.0 and float(b["weights"].min()) > 0


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda_graphs"])
@pytest.mark.parametrize("remote", [False, True], ids=["in_process", "remote"])
def test_cuda_run_loop_trains_and_its_checkpoint_loads_on_the_cpu(tmp_path, remote, graphs):
    sh = shard_with()
    shard = Remote(sh, nonblocking=True) if remote else sh
    lr = make(tmp_path, "cuda", [shard], batches_per_request=4, cuda_graphs=graphs)
    before = sh.stats()["priority_updates"]
    t = threading.Thread(target=lr.run, kwargs={"max_updates": 200})
    t.start()
    t.join(timeout=120)
    assert not t.is_alive() and lr.updates == 200
    assert (lr._graph is not None) == graphs  # captured before the prefetch thread started, not given up
    assert lr.stats()["cuda_graph"] == graphs and lr.stats()["device"].startswith("cuda")
    assert sh.stats()["priority_updates"] > before
    assert np.isfinite(lr.metrics["loss"])
    lr.save_checkpoint()
    cpu = Learner(learner_settings(batch_size=B, device="cpu"), SPEC, [], resume=load(lr.checkpoint_path))
    x = torch.rand(256, 2) * torch.tensor([1.8, 0.14]) - torch.tensor([1.2, 0.07])
    torch.testing.assert_close(cpu.online(x), lr.online(x.cuda()).detach().cpu(), rtol=1e-5, atol=1e-6)
    assert cpu.updates == 200 and cpu.opt.steps == 200
