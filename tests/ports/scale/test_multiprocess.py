"""Two real processes under jax.distributed (CPU, two simulated devices each) write their shares of
a dataset and process 0 merges: the folder equals a one-process run's, byte for byte."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from tests.ports.store._items import snapshot

ROOT = Path(__file__).resolve().parents[3]
TOTAL = 11


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_processes(out, process_count, batch_size):
    port = free_port()
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "PYTHONPATH": str(ROOT),
    }
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.ports.scale._worker", str(out), str(p)]
            + [str(process_count), str(port), str(batch_size), str(TOTAL)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for p in range(process_count)
    ]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=120)[0].decode())
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output


def test_two_processes_make_the_same_dataset_as_one(tmp_path):
    one = tmp_path / "one"
    run_processes(one, 1, batch_size=4)
    two = tmp_path / "two"
    run_processes(two, 2, batch_size=2)
    files = snapshot(one)
    assert files == snapshot(two)

    names = [f"{i:08d}" for i in range(TOTAL)]
    assert files["ImageSets/Segmentation/train.txt"].decode().split() == names
    assert sum(p.startswith("JPEGImages/") for p in files) == TOTAL
    records = [json.loads(line) for line in files["manifest.jsonl"].splitlines()]
    assert [r["global_index"] for r in records] == list(range(TOTAL))
    # each item's key is fold_in(key(seed), global_index), computed here independently
    for record in records:
        expected = jax.random.key_data(
            jax.random.fold_in(jax.random.key(1234), record["global_index"])
        )
        np.testing.assert_array_equal(record["seed"]["value"], np.asarray(expected))
    assert not any(p.startswith("manifest-") for p in files)
