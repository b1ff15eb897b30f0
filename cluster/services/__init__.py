"""The components as run by the composition root: the plain classes plus a metrics endpoint.

One module per kind, so a shard process never imports torch and starts faster.
"""


def current_node_id() -> str:
    """The Ray node this process runs on (the composition root records where things landed)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def new_incarnation() -> str:
    """An id for one life of a component's process: its counters start again when it changes."""
    import os
    import uuid

    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
