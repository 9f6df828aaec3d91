"""Devices and hosts: the data-parallel mesh and the multi-host work split.

``ports.scale.hosts``: which process makes which global indices, item keys, fixed-size batches,
``jax.distributed`` start-up and barriers. ``ports.scale.mesh``: a ``"data"`` mesh over local
devices and batch sharding.
"""

from ports.scale.hosts import (
    SEED_RULE,
    Batch,
    barrier,
    batches,
    global_indices,
    initialize_distributed,
    item_key,
    item_keys,
    owner,
)
from ports.scale.mesh import DATA_AXIS, batch_sharding, data_mesh, shard_batch

__all__ = [
    "DATA_AXIS",
    "SEED_RULE",
    "Batch",
    "barrier",
    "batch_sharding",
    "batches",
    "data_mesh",
    "global_indices",
    "initialize_distributed",
    "item_key",
    "item_keys",
    "owner",
    "shard_batch",
]
