"""The platform choice and the learner's GPU request (cluster/ray_platform.py): pure decisions."""

import pytest

from apexq.cluster.ray_platform import RayChoice, RayUnreachable, choose, learner_gpu


def test_address_beats_ray_address_which_beats_a_local_ray():
    assert choose("auto", {"RAY_ADDRESS": "10.0.0.5:6379"}) == RayChoice("auto", "--address")
    assert choose(None, {"RAY_ADDRESS": "10.0.0.5:6379"}) == RayChoice("10.0.0.5:6379", "RAY_ADDRESS")
    assert choose(None, {"RAY_ADDRESS": "  "}) == RayChoice(None, "local")
    assert not choose(None, {}).joins


def test_a_job_server_address_in_ray_address_is_one_line():
    with pytest.raises(RayUnreachable, match=r"^RAY_ADDRESS=http://127.0.0.1:8265 is a job server's address"):
        choose(None, {"RAY_ADDRESS": "http://127.0.0.1:8265"})


@pytest.mark.parametrize(
    "device,gpus,want",
    [
        ("cuda", 0, (1, "cuda")),  # asked for even with none: the autoscaler's demand
        ("cuda", 2, (1, "cuda")),
        ("auto", 1, (1, "auto")),
        ("auto", 0, (0, "cpu")),  # pinned, so the line is what runs
        ("cpu", 4, (0, "cpu")),
    ],
)
def test_learner_gpu_request(device, gpus, want):
    num_gpus, torch_device, line = learner_gpu(device, gpus)
    assert (num_gpus, torch_device) == want
    assert line.startswith("apexq: ") and f"learner.device={device}" in line and "\n" not in line
