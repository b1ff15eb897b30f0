"""The batch a replay shard samples. Its fields are the one list of the sample's columns.

A shard builds it (replay_server/shard.py), the standalone shard's wire format carries its item
columns in this order (replay_server/rpc_messages.py), Ray pickles it between processes, and the
learner's prefetch turns it into minibatches (learner/prefetch.py).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class SampleBatch(NamedTuple):
    """``n`` items drawn from one shard in proportion to priority**alpha.

    A NamedTuple: made once per sample request and read by attribute, as cheap as a dict.
    """

    keys: np.ndarray  # int64[n]: the items' stable keys, which priority updates name
    obs: np.ndarray  # float32[n, obs_dim]
    action: np.ndarray  # int32[n]
    ret: np.ndarray  # float32[n]: n-step discounted return
    discount: np.ndarray  # float32[n]: bootstrap discount (0 after a termination)
    next_obs: np.ndarray  # float32[n, obs_dim]
    prob: np.ndarray  # float64[n]: each item's probability within its shard
    total: float  # the shard's priority mass: prob * total / (all shards' mass) is global
    size: int  # items the shard holds
    shard: int  # the shard's id


SAMPLE_COLUMNS = SampleBatch._fields[:7]  # keys .. prob: one entry per item, in the wire format's order
TRANSITION_COLUMNS = SAMPLE_COLUMNS[1:6]  # obs, action, ret, discount, next_obs: what an update reads
