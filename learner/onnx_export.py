"""``policy.onnx``: the greedy policy for any language with onnxruntime; loading it runs no Python.

Input ``obs`` float32[batch, obs_dim] (raw observations: the scaling is in the graph), output
``q`` float32[batch, num_actions]; the batch axis is dynamic. Needs the ``onnx`` package
(``pip install 'apexq[onnx]'``); without it the file is skipped with one log line, since
training never depends on it.

It uses torch's TorchScript-based exporter (``dynamo=False``), which torch 2.13 still ships and
marks deprecated: here it took 0.9 s and needs only ``onnx``, and writes one self-contained file.
The torch.export-based exporter took 4.5-5 s, needs ``onnxscript`` (with ``onnx_ir`` and
``ml_dtypes``), writes the weights to a second ``.onnx.data`` file by default and prints its
progress on stdout, which the export helper's protocol uses.
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from pathlib import Path

import torch

from .policy_file import write_atomic

log = logging.getLogger(__name__)
OPSET = 17


class OnnxExporter:
    """Traces once; later exports put the current weights into the kept graph's initializers.

    The graph's initializers carry the state-dict names (``body.0.weight``, ``obs_center``...);
    if a later torch renames or folds them, every export traces afresh instead.
    """

    def __init__(self):
        self.model = None  # the onnx ModelProto of the first export
        self.reusable = False  # every initializer is a state-dict entry of the same shape
        self.unavailable = False

    def save(self, net: torch.nn.Module, path: str | Path) -> Path | None:
        """Write ``path`` atomically; None (after one log line per exporter) without ``onnx``."""
        if self.unavailable:
            return None
        try:
            import onnx
            from onnx import numpy_helper
        except ImportError:
            self.unavailable = True
            log.warning("policy.onnx not written: the onnx package is not installed (pip install 'apexq[onnx]')")
            return None
        path = Path(path)
        state = {k: v.detach().to("cpu", torch.float32).numpy() for k, v in net.state_dict().items()}
        if self.model is None or not self.reusable:
            self.model = onnx.load_from_string(trace(net))
            inits = self.model.graph.initializer
            self.reusable = all(i.name in state and tuple(i.dims) == state[i.name].shape for i in inits)
        else:
            for init in self.model.graph.initializer:
                init.CopyFrom(numpy_helper.from_array(state[init.name], init.name))
        write_atomic(path, self.model.SerializeToString())
        return path


def trace(net: torch.nn.Module) -> bytes:
    """The serialized ONNX model of a CPU copy of ``net``."""
    model = copy.deepcopy(net).to("cpu").eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the exporter's own deprecation notice (see the module docstring)
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(2, int(model.state_dict()["obs_center"].shape[0])),),
            buf,  # type: ignore[arg-type]  # torch.onnx.export writes to a file-like object too
            input_names=["obs"],
            output_names=["q"],
            dynamic_axes={"obs": {0: "batch"}, "q": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    return buf.getvalue()
