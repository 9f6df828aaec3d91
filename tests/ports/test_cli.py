"""The command line as users meet it: --version, help at 80 columns, no third-party noise."""

import os
import subprocess
import sys
from importlib.metadata import version

import pytest
from typer.testing import CliRunner

from ports.cli import app

COMMANDS = ["generate", "verify", "preview", "sheet", "augment", "quality", "train-toy", "demo"]


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"jaxmask {version('jaxmask')}\n"


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_at_80_columns_cuts_nothing(command):
    args = [*([command] if command else []), "--help"]
    result = CliRunner().invoke(app, args, terminal_width=80, prog_name="jaxmask")
    assert result.exit_code == 0, result.output
    assert "…" not in result.output  # rich's tables cut option names with it; click wraps
    assert max(len(line) for line in result.output.splitlines()) <= 80
    assert "{" not in result.output.splitlines()[0]  # usage reads DATASET, not {DATASET}
    if command is None:  # user words first, not the module's developer notes
        assert result.output.splitlines()[2].strip().startswith("Segmentation datasets")
        assert "run config" not in result.output


def test_option_help_names_what_each_option_takes():
    output = CliRunner().invoke(app, ["generate", "--help"], terminal_width=80).output
    for words in ("--negative-prompt TEXT", "--steps N", "--out DIR", "--param NAME=VALUE"):
        assert words in output, (words, output)
    usage = CliRunner().invoke(app, ["preview", "--help"]).output.splitlines()[0]
    assert usage.endswith("[OPTIONS] DATASET")


def test_a_real_process_prints_no_third_party_noise(tmp_path):
    """A refused command in a fresh process: one line of ours, nothing from transformers."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("TRANSFORMERS_VERBOSITY", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ports.cli",
            "generate",
            "-o",
            tmp_path / "d",
            "-n",
            "1",
            "--steps",
            "1001",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == "" and result.stderr.startswith("error: --steps"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


# --------------------------------------------------------------------------- CPU devices per core


@pytest.fixture
def chosen(monkeypatch):
    """What ``_cpu_devices`` asks JAX for (None: nothing), on a machine with 6 cores."""
    import jax

    from ports import cli

    asked = []
    monkeypatch.setattr(jax.config, "update", lambda name, value: asked.append((name, value)))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)

    def choose(requested, batch_size=None):
        asked.clear()
        cli._cpu_devices(requested, batch_size)
        return asked[0][1] if asked else None

    return choose


def test_one_cpu_device_per_core_that_divides_the_batch(chosen):
    assert chosen(None, 4) == 4  # 6 cores, batch 4: 4 devices of one image each
    assert chosen(None, 6) == 6
    assert chosen(None, 5) == 5
    assert chosen(None, 7) == 1  # a prime batch over more than 6 devices: no split
    assert chosen(None) == 6  # train-toy: every core
    assert chosen(2, 4) == 2  # asked for


def test_an_environment_that_chose_its_devices_keeps_them(chosen, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    assert chosen(None, 4) is None
    assert chosen(3, 6) == 3  # unless asked


def test_cpu_devices_below_one_is_refused(tmp_path):
    out = tmp_path / "d"
    result = CliRunner().invoke(app, ["generate", "-o", out, "-n", "1", "--cpu-devices", "0"])
    assert result.exit_code == 2 and "--cpu-devices must be >= 1, got 0" in result.output
    assert not out.exists()
