"""The components as run by the composition root: the plain classes plus a metrics endpoint.

One module per kind, so a shard process never imports torch and starts faster.
"""
