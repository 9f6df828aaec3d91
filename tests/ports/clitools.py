"""Helpers for tests that run ``jaxmask`` commands on the tiny SD checkpoint: in this process
(typer's CliRunner) or as real ``python -m ports.cli`` processes."""

import os
import socket
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from ports.cli import app

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ("cat", "dog")
PER_CLASS = 3
TOTAL = PER_CLASS * len(CLASSES)
IDS = [f"{i:08d}" for i in range(TOTAL)]
SIDE = 64  # the tiny model's native size
RUN_TIMEOUT = 240
# In this process tests/conftest.py simulates 4 CPU devices, and a run splits each batch over the
# host's devices: runs made here use a batch size they divide. Subprocesses get one device.
IN_PROCESS_BATCH = 4


def generate_args(out, model, *extra, batch_size=2):
    return [
        "generate",
        "--out",
        str(out),
        "--classes",
        ",".join(CLASSES),
        "-n",
        str(PER_CLASS),
        "--model",
        str(model),
        "--steps",
        "3",
        "--batch-size",
        str(batch_size),
        "--param",
        "seed_resolution=8",
        *extra,
    ]


def cli_process(args, cache):
    """``python -m ports.cli ARGS`` as a real process, on one CPU device."""
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT),
        "XLA_FLAGS": "",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "ports.cli", *map(str, args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def finish(process) -> str:
    try:
        output = process.communicate(timeout=RUN_TIMEOUT)[0].decode(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    return output


def snapshot(folder) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def invoke(*args):
    """The CLI in this process; returns (exit code, stdout + stderr)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
