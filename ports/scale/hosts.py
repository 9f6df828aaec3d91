"""The work split across hosts: which process makes which items, and with which key.

Items are numbered by a global index ``0 .. total-1``. Everything about an item derives from that
index: its key is ``fold_in(base_key, global_index)`` (:func:`item_key`), its file names come from
it, and the process that makes it is ``global_index % process_count`` (:func:`global_indices`). So
the same items come out whatever the batch size, the device count or the host count, and a run
resumed with a different number of hosts finishes the same dataset.

The split is *strided* (process ``p`` takes ``p, p + n, p + 2n, ...``), not contiguous, because

- shares differ by at most one item, and stay balanced when the cost of an item varies along the
  index (prompts grouped by class, longer prompts later);
- a run stopped early has made roughly the first ``m`` items on every host, not the first ``m/n``
  of each host's block, so a partial dataset still covers all prompts;
- it is the rule multi-host JAX pipelines use (``index % process_count == process_index``), and it
  needs no knowledge of the total to decide who owns an item (:func:`owner`), which is what resume
  uses to decide which leftovers a process may delete.

Each host then works alone (no cross-host collectives in the sampler): a straggler does not stall
the others. Processes meet only at :func:`barrier`, when the dataset is opened and before process 0
merges the manifests.
"""

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ports.errors import bad_arg, flag, with_cli

#: How an item's key is made; record it in the manifest with the base seed.
SEED_RULE = "jax.random.fold_in(jax.random.key(base_seed), global_index)"


def _check_process(process_index: int, process_count: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index must be in [0, process_count), got {process_index} of {process_count}"
        )


def global_indices(total: int, process_index: int, process_count: int) -> list[int]:
    """The global indices process ``process_index`` of ``process_count`` makes, in order.

    Strided: ``range(process_index, total, process_count)``. Together the processes cover
    ``range(total)`` exactly once.

    >>> global_indices(7, 1, 3)
    [1, 4]
    """
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    _check_process(process_index, process_count)
    return list(range(process_index, total, process_count))


def owner(global_index: int, process_count: int) -> int:
    """The process that makes item ``global_index`` under :func:`global_indices`.

    >>> owner(10, 3)
    1
    """
    return global_index % process_count


def item_key(base_key: jax.Array, global_index) -> jax.Array:
    """The key of item ``global_index``: ``jax.random.fold_in(base_key, global_index)``.

    Jit-able and vmap-able (``global_index`` may be traced), so a batch's keys are
    ``jax.vmap(item_key, in_axes=(None, 0))(base_key, indices)`` and equal the keys made one by one.
    Keys are arguments of the jitted sampler, never closed over (a new seed must not recompile).
    """
    return jax.random.fold_in(base_key, global_index)


def item_keys(base_key: jax.Array, indices) -> jax.Array:
    """:func:`item_key` for each of ``indices`` (b,): keys of shape (b,) (or (b, 2) raw keys)."""
    indices = jnp.asarray(np.asarray(indices, np.uint32))
    return jax.vmap(item_key, in_axes=(None, 0))(base_key, indices)


class Batch(NamedTuple):
    """A fixed-size batch of global indices.

    Attributes:
      indices: (b,) int64; padded at the end by repeating the last real index.
      valid: (b,) bool; False on padding, whose results are to be dropped.
    """

    indices: np.ndarray
    valid: np.ndarray


def batches(indices: Sequence[int], batch_size: int) -> Iterator[Batch]:
    """Cut ``indices`` into batches of exactly ``batch_size``, padding the last one.

    Fixed shapes mean one compilation for the whole run. Padding repeats the last real index (a real
    item, so the padded computation is well defined) and is marked invalid.

    >>> [b.indices.tolist() for b in batches([3, 5, 7], 2)]
    [[3, 5], [7, 7]]
    >>> [b.valid.tolist() for b in batches([3, 5, 7], 2)]
    [[True, True], [True, False]]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    indices = np.asarray(indices, np.int64).reshape(-1)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        valid = np.zeros(batch_size, bool)
        valid[: len(chunk)] = True
        padded = np.concatenate([chunk, np.full(batch_size - len(chunk), chunk[-1], np.int64)])
        yield Batch(padded, valid)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
    *,
    auto: bool = False,
    **kwargs,
) -> bool:
    """Start multi-process JAX (``jax.distributed.initialize``) unless this is a one-process run.

    A no-op when ``num_processes == 1``, or when nothing is given and ``auto`` is False (a laptop,
    one GPU). Pass the coordinator, count and id explicitly (CPU or GPU clusters), or ``auto=True``
    to let JAX detect the cluster (TPU pods, Slurm, Open MPI). Call before any other JAX work.
    Every process writes only its own items, so CPU runs need no cross-process collectives except
    for :func:`barrier` (gloo, JAX's default CPU implementation).

    Returns:
      Whether JAX now runs with several processes' coordination.
    """
    if num_processes == 1:
        return False
    if not auto and coordinator_address is None and num_processes is None and process_id is None:
        return False
    if not auto:
        check_cluster(coordinator_address, num_processes, process_id)
    if jax.distributed.is_initialized():
        return True
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        **kwargs,
    )
    return True


def check_cluster(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """The explicit multi-process arguments go together: all three, each well formed.

    Raises:
      ValueError: naming the missing or bad argument (in CLI terms via ``errors.for_cli``).
    """
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    missing = [name for name, value in given.items() if value is None]
    if missing and num_processes != 1:
        flags = {"coordinator_address": "--coordinator"}
        text = (
            "a multi-process run needs {} as well (every process gets the same coordinator "
            "host:port and process count, and its own id from 0)"
        )
        raise with_cli(
            ValueError(text.format(", ".join(missing))),
            text.format(", ".join(flags.get(m, flag(m)) for m in missing)),
        )
    if not isinstance(num_processes, int) or num_processes < 1:
        raise bad_arg("num_processes", f"{{}} must be an integer >= 1, got {num_processes!r}")
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise bad_arg(
            "process_id", f"{{}} must lie in [0, {num_processes - 1}], got {process_id!r}"
        )
    host, _, port = str(coordinator_address).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise bad_arg(
            "coordinator_address",
            f"{{}} must be host:port, e.g. 10.0.0.1:1234, got {coordinator_address!r}",
            cli="--coordinator",
        )


def agree(ok: bool) -> bool:
    """Process 0's ``ok``, on every process (every process must call it); ``ok`` for one process.

    Lets all processes act on a decision only process 0 can make (taking the dataset's lock)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name``; a no-op for one process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
