"""One process of a dataset run made with jax.distributed on CPU, for test_multiprocess.py:
``python -m tests.ports.scale._worker OUT PROCESS_ID PROCESS_COUNT PORT BATCH_SIZE TOTAL``.

Item content comes from ``item_key(base_key, global_index)`` through one jitted, vmapped function
over a mesh of this process's two local CPU devices, so the test checks the whole chain (split,
keys, batches, sharding, writer, merge) for independence from the host count and batch size.
"""

import sys

import jax

# the entry point pins the platform before anything else is imported
# ruff: noqa: E402
jax.config.update("jax_platforms", "cpu")

import jax.numpy as jnp
import numpy as np

from ports.scale import hosts
from ports.scale.mesh import data_mesh, shard_batch
from ports.store import open_dataset
from tests.ports.store._items import ID2LABEL, SIZE, make_record

BASE_SEED = 1234


@jax.jit
def make_items(keys):
    def one(key):
        image_key, label_key = jax.random.split(key)
        image = jax.random.randint(image_key, (*SIZE, 3), 0, 256).astype(jnp.uint8)
        label_map = jax.random.choice(label_key, jnp.array([0, 1, 2, 255], jnp.uint8), SIZE)
        return image, label_map

    return jax.vmap(one)(keys)


def main() -> None:
    out, process_id, process_count, port, batch_size, total = sys.argv[1:]
    process_id, process_count = int(process_id), int(process_count)
    batch_size, total = int(batch_size), int(total)
    hosts.initialize_distributed(f"127.0.0.1:{port}", process_count, process_id)
    assert jax.process_index() == process_id and jax.process_count() == process_count
    assert len(jax.local_devices()) == 2 and len(jax.devices()) == 2 * process_count
    mesh = data_mesh()
    dataset = open_dataset(
        out,
        {"format": "voc", "total": total, "base_seed": BASE_SEED},
        process_index=process_id,
        process_count=process_count,
        barrier=hosts.barrier,
    )
    base_key = jax.random.key(BASE_SEED)
    with dataset.writer(ID2LABEL) as writer:
        for batch in hosts.batches(dataset.todo(total), batch_size):
            keys = shard_batch(hosts.item_keys(base_key, batch.indices), mesh)
            images, label_maps = make_items(keys)
            key_data = np.asarray(jax.random.key_data(keys))
            for index, valid, image, label_map, seed in zip(
                batch.indices,
                batch.valid,
                np.asarray(images),
                np.asarray(label_maps),
                key_data,
                strict=True,
            ):
                if valid:
                    record = make_record(int(index), label_map, seed_value=seed.tolist())
                    writer.write(int(index), image, label_map, record)
    hosts.barrier("jaxmask-written")
    if process_id == 0:
        dataset.merge()
    print(f"process {process_id}: wrote {len(dataset.todo(total))} items")


if __name__ == "__main__":
    main()
