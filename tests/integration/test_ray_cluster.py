"""A two-node Ray cluster on this machine: the learner lands on the node with the stand-in resource,
and its checkpoint and policy end up in the driver's run directory."""

import io
import json

import pytest

from apexq.cluster.config import load_config
from apexq.cluster.run_dir import RunDir


@pytest.mark.slow
def test_two_node_cluster_places_learner_and_spreads_actors(tmp_path, redis_server):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    gpu_like = cluster.add_node(num_cpus=2, resources={"learner_node": 1})
    cluster.wait_for_nodes()
    try:
        from apexq.cluster.launch import train

        cfg = load_config(
            overrides=[
                "train.max_seconds=35",
                "learner.custom_resource=learner_node",
                "eval.every_seconds=0",
                "metrics.port=0",
                "replay.min_size_to_sample=500",
                "actors.envs_per_actor=8",
                "train.progress_every_s=2",
            ]
        )
        rd = RunDir(tmp_path / "run")
        rd.create(cfg)
        out = io.StringIO()
        summary = train(cfg, rd, address=cluster.address, redis_url=redis_server.url, out=out)
        assert summary.get("checkpoint"), out.getvalue()[-2000:]
        placement = json.loads((rd.path / "placement.json").read_text())
        learner = [p for p in placement if p["kind"] == "learner"][0]
        assert learner["node_id"] == gpu_like.node_id
        actor_nodes = {p["node_id"] for p in placement if p["kind"] == "actor"}
        assert len(actor_nodes) == 2, placement  # SPREAD: one actor on each node
        records = rd.read_metrics()
        assert records[-1]["updates"] > 0 and records[-1]["env_steps"] > 0
        assert summary["accounting"]["balanced"]
        # the learner's node wrote nothing here: its final checkpoint and policy came to the driver as bytes
        assert summary["checkpoint"] == str(rd.checkpoint)
        import torch

        ckpt = torch.load(rd.checkpoint, weights_only=True)
        assert ckpt["updates"] == records[-1]["updates"] and ckpt["extra"]["env_steps"] == records[-1]["env_steps"]
        policy = json.loads(rd.policy.with_suffix(".json").read_text())
        assert policy["env_id"] == "MountainCar-v0"
        assert rd.policy.with_suffix(".safetensors").stat().st_size > 0 and rd.policy.with_suffix(".pt2").is_file()
        assert not list(rd.path.glob("*.tmp"))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
