"""The work split: every item made once, by a known process, with a key that depends on its global
index only."""

import jax
import numpy as np
import pytest

from ports.scale import hosts
from ports.scale.mesh import data_mesh, shard_batch


@pytest.mark.parametrize(("total", "count"), [(0, 1), (1, 3), (10, 1), (10, 3), (17, 4), (5, 8)])
def test_global_indices_partition_the_items(total, count):
    shares = [hosts.global_indices(total, p, count) for p in range(count)]
    flat = sorted(i for share in shares for i in share)
    assert flat == list(range(total))  # every item exactly once
    sizes = [len(share) for share in shares]
    assert max(sizes) - min(sizes) <= 1  # balanced
    for p, share in enumerate(shares):
        assert share == sorted(share)
        assert all(hosts.owner(i, count) == p for i in share)


def test_global_indices_are_strided():
    assert hosts.global_indices(10, 1, 3) == [1, 4, 7]
    assert hosts.global_indices(10, 0, 3) == [0, 3, 6, 9]


def test_bad_split_arguments():
    with pytest.raises(ValueError, match="process_index"):
        hosts.global_indices(10, 3, 3)
    with pytest.raises(ValueError, match="process_index"):
        hosts.global_indices(10, 0, 0)
    with pytest.raises(ValueError, match="total"):
        hosts.global_indices(-1, 0, 1)
    with pytest.raises(ValueError, match="batch_size"):
        list(hosts.batches([1, 2], 0))


def test_batches_pad_the_last_one_and_mark_it():
    got = list(hosts.batches([4, 7, 9, 12, 15], 2))
    assert [b.indices.tolist() for b in got] == [[4, 7], [9, 12], [15, 15]]
    assert [b.valid.tolist() for b in got] == [[True, True], [True, True], [True, False]]
    assert all(b.indices.shape == (2,) and b.valid.shape == (2,) for b in got)
    assert list(hosts.batches([], 4)) == []
    exact = list(hosts.batches(range(6), 3))
    assert len(exact) == 2 and all(b.valid.all() for b in exact)


def test_item_key_is_fold_in_of_the_global_index():
    base = jax.random.key(42)
    for index in (0, 1, 7, 123456):
        expected = jax.random.fold_in(jax.random.key(42), index)
        np.testing.assert_array_equal(
            jax.random.key_data(hosts.item_key(base, index)), jax.random.key_data(expected)
        )
    keys = [jax.random.key_data(hosts.item_key(base, i)) for i in range(5)]
    assert len({tuple(np.asarray(k).tolist()) for k in keys}) == 5


@pytest.mark.parametrize("batch_size", [4, 8])
def test_keys_do_not_depend_on_batch_size_or_devices(batch_size):
    base = jax.random.key(3)
    indices = hosts.global_indices(11, 1, 2)  # [1, 3, 5, 7, 9]
    one_by_one = {i: np.asarray(jax.random.key_data(hosts.item_key(base, i))) for i in indices}
    mesh = data_mesh()
    draw = jax.jit(jax.vmap(lambda key: jax.random.uniform(key, (3,))))
    for batch in hosts.batches(indices, batch_size):
        keys = shard_batch(hosts.item_keys(base, batch.indices), mesh)
        values = np.asarray(draw(keys))
        data = np.asarray(jax.random.key_data(keys))
        for index, valid, key_data, value in zip(
            batch.indices, batch.valid, data, values, strict=True
        ):
            np.testing.assert_array_equal(key_data, one_by_one[int(index)])
            expected = jax.random.uniform(hosts.item_key(base, int(index)), (3,))
            np.testing.assert_array_equal(value, np.asarray(expected))
            assert valid or int(index) == indices[-1]


def test_item_key_takes_a_traced_index_without_recompiling():
    base = jax.random.key(0)
    traces = []

    @jax.jit
    def draw(key, index):
        traces.append(None)
        return jax.random.uniform(hosts.item_key(key, index))

    first = draw(base, 3)
    second = draw(base, 4)
    draw(jax.random.key(1), 5)  # a new seed is an argument, not a constant
    assert len(traces) == 1 and first != second


def test_one_process_needs_no_distributed_start():
    assert hosts.initialize_distributed() is False
    assert hosts.initialize_distributed("127.0.0.1:1", num_processes=1, process_id=0) is False
    assert not jax.distributed.is_initialized()
    hosts.barrier("one process: returns at once")
