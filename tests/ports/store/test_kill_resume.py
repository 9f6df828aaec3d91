"""A real crash: a writing process killed with SIGKILL mid-run, resumed by another process, gives
a folder byte-identical to an uninterrupted run."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ports.store import merge_manifests
from tests.ports.store import _items
from tests.ports.store._items import snapshot

ROOT = Path(__file__).resolve().parents[3]


def writer_process(out, fmt, total, *extra):
    command = [
        sys.executable,
        "-m",
        "tests.ports.store._run_writer",
        str(out),
        fmt,
        str(total),
        *extra,
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def manifest_lines(out) -> int:
    try:
        return (Path(out) / "manifest-00000.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize(("fmt", "seed"), [("voc", 0), ("webdataset", 1)])
def test_sigkill_mid_run_then_resume_is_byte_identical(tmp_path, fmt, seed):
    total = 40
    reference = tmp_path / "reference"
    _items.run(reference, fmt, total, merge=False)
    unmerged = snapshot(reference)
    merge_manifests(reference)

    out = tmp_path / "killed"
    rng = random.Random(seed)
    for cycle in range(2):  # killed, resumed and killed again, then resumed to the end
        target = manifest_lines(out) + 5
        process = writer_process(out, fmt, total, "--slow", "0.003")
        deadline = time.monotonic() + 60
        while (
            manifest_lines(out) < target and process.poll() is None and time.monotonic() < deadline
        ):
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.03))
        process.send_signal(signal.SIGKILL)
        output = process.communicate(timeout=60)[0].decode()
        assert process.returncode == -signal.SIGKILL, output  # killed, not finished
        assert 0 < manifest_lines(out) < total, cycle

    resumed = writer_process(out, fmt, total)
    output = resumed.communicate(timeout=120)[0].decode()
    assert resumed.returncode == 0, output
    assert snapshot(out) == unmerged  # files and per-host manifest, before the merge
    merge_manifests(out)
    assert snapshot(out) == snapshot(reference)
