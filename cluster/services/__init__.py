"""The components as run by the composition root: the plain classes plus a metrics endpoint.

One module per kind, so a shard process never imports torch and starts faster.
"""


def current_node_id() -> str:
    """The Ray node this process runs on (the composition root records where things landed)."""
    import ray
    return ray.get_runtime_context().get_node_id()
