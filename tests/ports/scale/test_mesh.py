"""The data mesh and batch sharding (4 simulated CPU devices from tests/conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ports.scale.mesh import DATA_AXIS, data_mesh, shard_batch


def test_data_mesh_spans_the_local_devices():
    mesh = data_mesh()
    assert mesh.axis_names == (DATA_AXIS,)
    assert list(mesh.devices) == jax.local_devices() and mesh.shape[DATA_AXIS] == 4
    assert data_mesh(jax.local_devices()[:2]).shape[DATA_AXIS] == 2
    with pytest.raises(ValueError, match="at least one device"):
        data_mesh([])


@pytest.mark.parametrize("devices", [1, 2, 4])
def test_shard_batch_splits_the_leading_axis(devices):
    mesh = data_mesh(jax.local_devices()[:devices])
    batch = {
        "image": np.arange(8 * 3 * 2, dtype=np.float32).reshape(8, 3, 2),
        "index": np.arange(8, dtype=np.int32),
    }
    sharded = shard_batch(batch, mesh)
    for name, leaf in sharded.items():
        assert leaf.sharding.spec[0] == DATA_AXIS
        shards = sorted(leaf.addressable_shards, key=lambda s: s.index[0].start)
        assert len(shards) == devices
        rows = 8 // devices
        for n, shard in enumerate(shards):
            np.testing.assert_array_equal(
                np.asarray(shard.data), batch[name][n * rows : (n + 1) * rows]
            )
    doubled = jax.jit(lambda tree: jax.tree_util.tree_map(lambda x: x * 2, tree))(sharded)
    np.testing.assert_array_equal(np.asarray(doubled["image"]), batch["image"] * 2)
    assert doubled["image"].sharding.spec[0] == DATA_AXIS


def test_shard_batch_takes_key_arrays():
    keys = jax.random.split(jax.random.key(0), 4)
    sharded = shard_batch(keys, data_mesh())
    assert len(sharded.addressable_shards) == 4
    np.testing.assert_array_equal(jax.random.key_data(sharded), jax.random.key_data(keys))


def test_shard_batch_errors_say_what_to_do():
    mesh = data_mesh()
    with pytest.raises(
        ValueError, match=r"batch size 6 is not a multiple of the 4 devices.*multiple of 4"
    ):
        shard_batch(np.zeros((6, 2)), mesh)
    with pytest.raises(ValueError, match="scalar"):
        shard_batch({"a": np.zeros((4,)), "b": jnp.float32(1.0)}, mesh)
    with pytest.raises(ValueError, match="batch sizes differ"):
        shard_batch({"a": np.zeros((4,)), "b": np.zeros((8,))}, mesh)
