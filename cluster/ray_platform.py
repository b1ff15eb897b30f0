"""Which Ray a run uses and what the learner asks of it, decided in one place; Ray token authentication.

Ray's own ``ray.init()`` guesses: given nothing it joins whatever ``RAY_ADDRESS`` or the address
file of the last ``ray start`` (``ray_current_cluster`` in Ray's temp folder) names, and then
refuses the ``num_cpus`` a local run passes; a file left by a killed Ray made every plain run
fail. apexq decides instead, and says which in the run's first line:

1. ``--address`` given: join that cluster (``auto`` is Ray's lookup of a local ``ray start``).
2. else ``RAY_ADDRESS`` set (inside ``ray job submit`` Ray sets it): join that cluster.
3. else start a private local Ray (``ray.init(address="local")``, which reads no address file).

Joining a cluster with token authentication (the default of ``ray start --head`` since Ray 2.59
when a token exists) needs ``RAY_AUTH_MODE=token`` and the token. Ray turns token mode on by
itself only for an address it found (``auto``), never for an explicit ``HOST:PORT``, and a
refused connection surfaces after 20 s of retries as a bare ``ConnectionError``. So before
``ray.init`` one RPC to the cluster's GCS asks whether it wants a token: if so and Ray finds one
where it looks (``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``),
token mode is turned on for this process; if none is found or the cluster rejects it, one line
says what to set. The token itself is never printed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

TOKEN_HELP = (
    "put the cluster's token (`ray get-auth-token` on its head prints it) in ~/.ray/auth_token, or in "
    "RAY_AUTH_TOKEN or a file named by RAY_AUTH_TOKEN_PATH, and set RAY_AUTH_MODE=token"
)


class RayUnreachable(ConnectionError):
    """The chosen cluster cannot be joined; the message says what to do (one line, exit 2)."""


@dataclass(frozen=True)
class RayChoice:
    """``address`` None: start a private local Ray; else join it. ``source`` says where it came from."""

    address: Optional[str]
    source: str

    @property
    def joins(self) -> bool:
        return self.address is not None


def choose(address: Optional[str], environ: Mapping[str, str] = os.environ) -> RayChoice:
    """The run's Ray: ``--address``, else ``RAY_ADDRESS``, else a local Ray of its own."""
    if address:
        return RayChoice(address, "--address")
    env = environ.get("RAY_ADDRESS", "").strip()
    if env:
        if env.startswith(("http://", "https://")):
            raise RayUnreachable(
                f"RAY_ADDRESS={env} is a job server's address (for `ray job submit`), not a cluster to join: "
                f"submit the run with `ray job submit -- apexq train ...`, pass --address HOST:PORT of the cluster's "
                f"GCS, or unset RAY_ADDRESS to train on a local Ray"
            )
        return RayChoice(env, "RAY_ADDRESS")
    return RayChoice(None, "local")


def address_file() -> Optional[tuple[str, str]]:
    """(path, address) of the address file a ``ray start`` left on this machine, if any."""
    try:
        from ray._common.utils import get_ray_address_file

        path = get_ray_address_file(None)
        with open(path) as f:
            return path, f.read().strip()
    except (ImportError, OSError):
        return None


def resolve(choice: RayChoice) -> Optional[str]:
    """HOST:PORT of the GCS the choice names (``auto`` looked up as Ray does), None if unknown."""
    if not choice.joins:
        return None
    try:
        from ray._private.services import canonicalize_bootstrap_address

        assert choice.address is not None  # a choice that joins names its address
        return canonicalize_bootstrap_address(choice.address)
    except Exception:  # Ray raises its own ConnectionError for a failed lookup: ray.init says it again
        return None


def _ask_gcs(host_port: str, token: Optional[str]):
    """grpc status code of one small GCS call, with or without the token."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(host_port) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(),  # type: ignore[attr-defined]  # generated protobuf
                timeout=10,
                metadata=metadata,
            )
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code()


def _token() -> Optional[str]:
    """The token Ray would send, found where Ray looks for it (never printed)."""
    from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]  # a compiled module

    loader = AuthenticationTokenLoader.instance()
    return loader.get_raw_token(ignore_auth_mode=True) if loader.has_token(ignore_auth_mode=True) else None


def _token_place(environ: Mapping[str, str]) -> str:
    if environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH ({environ['RAY_AUTH_TOKEN_PATH']})"
    return "~/.ray/auth_token"


def prepare_auth(host_port: str, where: str) -> Optional[str]:
    """Make ``ray.init(address=host_port)`` authenticate as the cluster requires, or say what to set.

    Returns a note for the run's first line when token mode was turned on here. Raises
    :class:`RayUnreachable` when nothing answers at ``host_port`` or the token is missing or wrong.
    """
    try:
        import grpc

        first = _ask_gcs(host_port, None)
    except ImportError:  # without Ray's generated stubs, leave it to ray.init
        return None
    if first in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        raise RayUnreachable(
            f"no Ray cluster answers at {host_port} ({where}): start one (`ray start --head`), "
            f"or leave out --address and RAY_ADDRESS to train on a local Ray"
        )
    if first != grpc.StatusCode.UNAUTHENTICATED:
        return None  # no authentication asked for (or an error ray.init will name)
    mode = os.environ.get("RAY_AUTH_MODE")
    token = _token()
    if token is None:
        raise RayUnreachable(
            f"the Ray cluster at {host_port} ({where}) requires token authentication and no token "
            f"was found: {TOKEN_HELP}"
        )
    if _ask_gcs(host_port, token) == grpc.StatusCode.UNAUTHENTICATED:
        raise RayUnreachable(
            f"the Ray cluster at {host_port} ({where}) rejected the token in {_token_place(os.environ)}: {TOKEN_HELP}"
        )
    if mode == "token":
        return None
    if mode is not None and mode.lower() != "token":
        raise RayUnreachable(
            f"the Ray cluster at {host_port} ({where}) requires token authentication but "
            f"RAY_AUTH_MODE={mode}: set RAY_AUTH_MODE=token (the token in "
            f"{_token_place(os.environ)} is accepted)"
        )
    os.environ["RAY_AUTH_MODE"] = "token"  # read by Ray's C++ core; workers of this driver inherit it
    try:
        from ray._raylet import Config  # type: ignore[attr-defined]  # a compiled module

        Config.initialize("")  # Ray may have cached its config on import
    except Exception:
        pass
    return f"token authentication with the token in {_token_place(os.environ)}"


def learner_gpu(device: str, cluster_gpus: float) -> tuple[int, str, str]:
    """(GPUs the learner asks Ray for, the learner's torch device, the line that says why) for learner.device.

    ``cuda`` always asks: the pending request is what makes an autoscaler add a GPU node, and
    the README's flow (``ray up`` then ``ray job submit``) launches before that node exists.
    ``auto`` takes a GPU only when the cluster has one at launch and otherwise pins the
    learner to the CPU, so that what the line says is what runs.
    """
    if device == "cuda":
        return (
            1,
            "cuda",
            (f"apexq: the learner asks Ray for 1 GPU (learner.device=cuda); the cluster has {cluster_gpus:g} now"),
        )
    if device == "auto" and cluster_gpus >= 1:
        # "auto" still: torch picks the GPU Ray gives the actor (a GPU resource without CUDA falls back)
        return 1, "auto", f"apexq: learner on a GPU (learner.device=auto and the cluster has {cluster_gpus:g})"
    if device == "auto":
        return (
            0,
            "cpu",
            (
                "apexq: learner on the CPU (learner.device=auto and the cluster has no GPU at launch; "
                "learner.device=cuda asks Ray for one and waits for it)"
            ),
        )
    return 0, "cpu", "apexq: learner on the CPU (learner.device=cpu)"
