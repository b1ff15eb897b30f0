"""The learner's whole update as one CUDA graph (``learner.cuda_graphs``).

The Q-networks here are small, so an update on a GPU is dozens of tiny kernels, and what limits it
is launching them from Python, not the device: on an H200 machine the eager update ran at 550-650
updates/s, slower than on a 2-core CPU. A CUDA graph records the kernels of one update (forward,
Double-DQN targets, loss, backward, gradient clipping, Adam) once; each later update copies its
minibatch into the graph's input tensors and replays the whole graph with one launch.

What stays outside the graph, because it changes between updates in ways a graph cannot follow:
the target network's sync (every K updates, or Polyak averaging), the update counter and
everything else on the host. The optimizer's step count lives on the device (see
``FlatAdam.graph_step``). The graph's outputs (loss, TD errors, Q of the taken actions) are
overwritten by the next replay: read or clone them before that.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .prefetch import UPDATE_COLUMNS


class UpdateGraph:
    """``update(batch) -> (loss, extra)`` captured on minibatches shaped like ``example``.

    Capturing needs the kernels' first runs done beforehand (cuBLAS workspaces, autograd's
    buffers): ``warmup`` updates run on a side stream on the example batch and are then undone
    (``FlatAdam.snapshot``/``restore``), so capturing changes no weights.
    """

    def __init__(self, update: Callable[[dict], tuple], opt, example: dict, warmup: int = 3):
        self.inputs = {k: example[k].clone() for k in UPDATE_COLUMNS}
        saved = opt.snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    update(self.inputs)
        finally:
            torch.cuda.current_stream().wait_stream(side)
            opt.restore(saved)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = update(self.inputs)

    def fits(self, batch: dict) -> bool:
        return all(
            batch[k].shape == self.inputs[k].shape and batch[k].dtype == self.inputs[k].dtype for k in UPDATE_COLUMNS
        )

    def replay(self, batch: dict) -> tuple:
        """One update on ``batch`` (tensors on the device, shaped as the example)."""
        for k in UPDATE_COLUMNS:
            self.inputs[k].copy_(batch[k], non_blocking=True)
        self.graph.replay()
        return self.outputs
