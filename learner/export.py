"""The exported greedy policy: a ``torch.export`` program that loads with torch alone.

Usage, without apexq installed::

    import torch
    policy = torch.export.load("runs/<id>/policy.pt2").module()
    q = policy(obs)              # obs: float32 [B, obs_dim] raw observations -> Q: float32 [B, A]
    action = q.argmax(dim=1)     # the greedy action

Observation scaling is inside the program, so it takes observations exactly as the env gives them.
"""
from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch


def export_policy(net: torch.nn.Module, path: str | Path) -> Path:
    """Export a CPU copy of ``net`` to ``path`` atomically (write a temporary file, then rename)."""
    path = Path(path)
    model = copy.deepcopy(net).to("cpu").eval()
    obs_dim = int(model.obs_center.shape[0])
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    program = torch.export.export(model, (torch.zeros(2, obs_dim),), dynamic_shapes={"obs": {0: batch}})
    fd, tmp = tempfile.mkstemp(prefix="." + path.stem + ".", suffix=".tmp.pt2", dir=path.parent)
    os.close(fd)
    try:
        torch.export.save(program, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_policy(path: str | Path) -> torch.nn.Module:
    return torch.export.load(str(path)).module()
