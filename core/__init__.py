"""What the actors, the learner and the replay service share, and nothing else.

The weights' format and Redis keys (``weights_store``), the Redis connection (``connection``),
the Q-network's parameter layout (``network_layout``), the batch a shard samples (``batch``) and
the interfaces between the parts (``interfaces``). This package imports no other apexq package,
so ``actors`` and ``learner`` can both depend on it without depending on each other
(tests/unit/test_layout.py checks the directions).
"""
