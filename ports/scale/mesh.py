"""A one-axis device mesh for data parallelism, and putting a batch on it.

Each host jits the sampler over a mesh of its *local* devices with one axis, ``"data"``; a batch's
leading axis is split over it. No cross-host collectives: see ``ports.scale.hosts``.
"""

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with one axis ``"data"`` over ``devices`` (default: this process's local devices)."""
    devices = list(jax.local_devices() if devices is None else devices)
    if not devices:
        raise ValueError("data_mesh needs at least one device")
    return Mesh(np.array(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding that splits a leading batch axis over ``"data"`` and replicates the rest."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def shard_batch(tree, mesh: Mesh):
    """Put every leaf of ``tree`` on ``mesh`` with its leading (batch) axis split over ``"data"``.

    Raises:
      ValueError: a leaf has no leading axis, the leaves' batch sizes differ, or the batch size is
        not a multiple of the number of devices on ``"data"``.
    """
    devices = mesh.shape[DATA_AXIS]
    leaves = jax.tree_util.tree_leaves(tree)
    sizes = set()
    for leaf in leaves:
        shape = np.shape(leaf)
        if not shape:
            raise ValueError("shard_batch needs arrays with a leading batch axis; got a scalar")
        sizes.add(shape[0])
    if len(sizes) > 1:
        raise ValueError(f"the leaves' batch sizes differ: {sorted(sizes)}; give one batch size")
    for size in sizes:
        if size % devices:
            multiple = max(devices, size // devices * devices)
            raise ValueError(
                f"batch size {size} is not a multiple of the {devices} devices on the "
                f"{DATA_AXIS!r} axis; use a batch size that is a multiple of {devices} "
                f"(e.g. {multiple})"
            )
    sharding = batch_sharding(mesh)
    return jax.tree_util.tree_map(lambda leaf: jax.device_put(leaf, sharding), tree)
