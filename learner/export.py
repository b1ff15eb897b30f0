"""The exported greedy policy, written at every checkpoint as four files beside each other.

- ``policy.safetensors`` + ``policy.json``: the weights and the network they fit (see
  :mod:`learner.policy_file`). Neither can carry code; ``apexq evaluate`` reads only these.
- ``policy.onnx``: for onnxruntime in any language (see :mod:`learner.onnx_export`).
- ``policy.pt2``: a ``torch.export`` program that loads with torch alone, for users who trust it::

    import torch
    policy = torch.export.load("runs/<id>/policy.pt2").module()   # unpickles: trusted files only
    q = policy(obs)              # obs: float32 [B, obs_dim] raw observations -> Q: float32 [B, A]
    action = q.argmax(dim=1)     # the greedy action

Observation scaling is inside the programs, so they take observations exactly as the env gives them.
The learner writes them through :class:`BackgroundExporter`, from a helper process, so that
training never pauses to trace. A learner of a run exports into a private folder on its own node
and hands the files' bytes (:func:`read_policy_files`) to the driver, which writes them into the
run directory (learner/artifacts.py).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from .onnx_export import OnnxExporter
from .policy_file import write_policy_files

log = logging.getLogger(__name__)


def export_policy(net: torch.nn.Module, path: str | Path, info: dict | None = None) -> Path:
    """Export a CPU copy of ``net`` to ``path`` (``policy.pt2``) and its siblings, each atomically."""
    return PolicyExporter().save(net, path, info)


SUFFIXES = (".safetensors", ".json", ".pt2", ".onnx")  # in the order they are written


def read_policy_files(path: str | Path) -> dict[str, bytes]:
    """name -> bytes of the files an export to ``path`` (``policy.pt2``) wrote; ``.onnx`` only if there."""
    stem = Path(path).with_suffix("")
    return {
        stem.name + s: stem.with_suffix(s).read_bytes()
        for s in SUFFIXES
        if s != ".onnx" or stem.with_suffix(s).is_file()
    }


class PolicyExporter:
    """Exports the same network again and again (every checkpoint) without re-tracing it.

    The first call traces with :func:`torch.export.export`; later calls copy the current weights
    into that program's state and save it. Tracing each time cost 0.1-0.3 s and left about
    0.1-0.3 MB of torch.export caches behind per call, a slow leak over a long run.
    """

    def __init__(self):
        self.program = None
        self.onnx = OnnxExporter()

    def save(self, net: torch.nn.Module, path: str | Path, info: dict | None = None) -> Path:
        """Write ``path`` (.pt2) and, beside it, .safetensors + .json (first) and .onnx (last, optional).

        ``info``: ``env_id``, ``weights_version``, ``eval_return`` for ``policy.json``.
        """
        path = Path(path)
        write_policy_files(net, path.with_suffix(""), **(info or {}))
        if self.program is None:
            model = copy.deepcopy(net).to("cpu").eval()
            obs_dim = int(net.state_dict()["obs_center"].shape[0])
            batch = torch.export.Dim("batch", min=1, max=1 << 20)
            self.program = torch.export.export(model, (torch.zeros(2, obs_dim),), dynamic_shapes={"obs": {0: batch}})
        else:
            current = net.state_dict()
            with torch.no_grad():
                for name, tensor in self.program.state_dict.items():
                    tensor.copy_(current[name].detach().to("cpu"))
        fd, tmp = tempfile.mkstemp(prefix="." + path.stem + ".", suffix=".tmp.pt2", dir=path.parent)
        os.close(fd)
        try:
            torch.export.save(self.program, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        try:
            self.onnx.save(net, path.with_suffix(".onnx"))
        except Exception as exc:  # a convenience file: never worth failing the export
            log.warning("policy.onnx not written: %s: %s", type(exc).__name__, exc)
        return path


HELPER_NICE = 10  # the periodic exports' helper yields to the learner and the actors


class BackgroundExporter:
    """Exports from a helper process, so that the learner's training thread never traces.

    A learner's first export imports ``torch._dynamo`` and ``torch.export`` and traces: 2.3 s
    on an idle core here, more under load, during which training stopped. On a second thread
    of the learner's process it would not stop but crawl: tracing is pure Python, and the
    update gets the GIL back only at switch intervals (3,000 updates took 478 s instead of 2.4 s
    with tracing going on beside them). The helper (``python -m apexq.learner.export --serve``, at
    low priority) is started at the first export and keeps its traced program, so later exports
    only copy weights in and save. Weights travel as safetensors bytes over its stdin; nothing
    is pickled. If the helper fails, that export is done in this process instead.
    """

    def __init__(self, spec: dict, hidden_sizes, dueling: bool):
        self.spec, self.hidden_sizes, self.dueling = spec, [int(h) for h in hidden_sizes], bool(dueling)
        self.arch = {"spec": spec, "hidden_sizes": self.hidden_sizes, "dueling": self.dueling}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="learner-export")
        self._proc: subprocess.Popen | None = None
        self._fallback = PolicyExporter()
        self._finalizer: weakref.finalize | None = None

    def submit(
        self,
        state: dict,
        path: str | Path,
        info: dict | None = None,
        then: Callable[[str], None] | None = None,
        waited_on: bool = False,
    ) -> Future:
        """Export the network with weights ``state`` to ``path``; the snapshot is taken now.

        ``info`` (plain JSON: ``env_id``, ``weights_version``, ``eval_return``) goes into ``policy.json``.
        ``then(path)`` runs after a successful export, before the future is done (a done-callback
        could still be running when a waiter wakes up). ``waited_on``: the caller blocks on this
        export with training stopped (the final checkpoint); a helper started for it runs at normal
        priority, not at nice 10, which a busy machine can starve for minutes (a soak run's final
        checkpoint timed out that way).
        """
        snapshot = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state.items()}
        return self._pool.submit(self._job, snapshot, str(path), dict(info or {}), then, waited_on)

    def _job(self, state: dict, path: str, info: dict, then, waited_on: bool = False) -> str:
        out = self._export(state, path, info, waited_on)
        if then is not None:
            then(out)
        return out

    def _export(self, state: dict, path: str, info: dict, waited_on: bool = False) -> str:
        # runs on the one thread of self._pool: exports never overlap
        try:
            return self._export_in_helper(state, path, info, nice=0 if waited_on else HELPER_NICE)
        except Exception as exc:
            log.warning("policy export helper failed (%s); exporting in the learner's process", exc)
            self._stop_helper()
        try:
            from .network import build_network

            net = build_network(self.spec, self.hidden_sizes, self.dueling)
            net.load_state_dict(state)
            return str(self._fallback.save(net, path, info))
        except Exception as exc:  # nobody may wait on a periodic export: say so here
            log.warning("policy export to %s failed: %s", path, exc)
            raise

    def _export_in_helper(self, state: dict, path: str, info: dict, nice: int = HELPER_NICE) -> str:
        from safetensors.torch import save

        if self._proc is None or self._proc.poll() is not None:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "apexq.learner.export", "--serve", str(nice)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
            )
            self._finalizer = weakref.finalize(self, _close_helper, self._proc)
        proc = self._proc
        assert proc.stdin is not None and proc.stdout is not None  # both PIPE
        payload = save(state)
        header = {"path": path, "nbytes": len(payload), "info": info, **self.arch}
        proc.stdin.write(json.dumps(header).encode() + b"\n" + payload)
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"helper exited (status {proc.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply["path"]

    def _stop_helper(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._proc = None

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._stop_helper()


def _close_helper(proc: subprocess.Popen) -> None:
    try:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=10)
    except Exception:
        proc.kill()


def serve(inp, out, nice: int = HELPER_NICE) -> None:
    """The helper's loop: a JSON header line, then safetensors bytes; replies one JSON line each."""
    from safetensors.torch import load

    from .network import build_network

    try:
        if nice:
            os.nice(nice)  # the learner and the actors come first
    except OSError:
        pass
    torch.set_num_threads(1)
    exporter: PolicyExporter | None = None
    net: torch.nn.Module | None = None
    arch = None
    while True:
        line = inp.readline()
        if not line:
            return
        try:
            req = json.loads(line)
            payload = inp.read(int(req["nbytes"]))
            state = load(payload)
            key = (json.dumps(req["spec"], sort_keys=True), tuple(req["hidden_sizes"]), req["dueling"])
            if key != arch:  # a new shape of network: trace afresh
                net = build_network(req["spec"], req["hidden_sizes"], req["dueling"])
                exporter, arch = PolicyExporter(), key
            assert net is not None and exporter is not None
            net.load_state_dict(state)
            reply = {"path": str(exporter.save(net, req["path"], req.get("info")))}
        except Exception as exc:  # reported to the learner, which exports itself instead
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--serve" or not sys.argv[2].isdigit() or int(sys.argv[2]) > 19:
        raise SystemExit("usage: python -m apexq.learner.export --serve NICE  (the learner starts this itself)")
    # replies go to a private copy of stdout; whatever else writes to stdout (torch.onnx's progress
    # lines, C libraries) lands on stderr instead of in the middle of the protocol
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin.buffer, replies, int(sys.argv[2]))
