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
