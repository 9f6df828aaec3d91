"""The README's main command, read from the README and shrunk (1 image per class, 2 steps): a
dataset made by the bundled toy model, with the shapes classes and the VOC layout."""

import json
import re
import shlex
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from ports.cli import app
from ports.toyworld import scenes

README = Path(__file__).parents[2] / "README.md"


def main_command() -> list[str]:
    """The ``jaxmask ...`` arguments of the README's first quick-start command."""
    quick = README.read_text().split("## Quick start", 1)[1]
    line = re.search(r"```bash\n(.*?)\n```", quick, re.DOTALL).group(1)
    command = line.split("&&")[-1].strip()
    words = shlex.split(command)
    assert words[0] == "jaxmask", command
    return words[1:]


def shrunk(args: list[str], out: Path) -> list[str]:
    args = list(args)
    for flag, value in (("--out", str(out)), ("--per-class", "1"), ("--steps", "2")):
        assert flag in args, (flag, args)
        args[args.index(flag) + 1] = value
    return args


def test_readme_main_command_makes_a_dataset_with_the_bundled_model(tmp_path):
    args = main_command()
    assert args[0] == "generate" and "--model" not in args  # the bundled default
    out = tmp_path / "toy-data"
    result = CliRunner().invoke(app, shrunk(args, out))
    assert result.exit_code == 0, result.output

    id2label = json.loads((out / "id2label.json").read_text())
    assert list(id2label.values()) == ["background", *scenes.CLASSES]
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == len(scenes.CLASSES)
    assert sorted(r["classes"][0]["name"] for r in records) == sorted(scenes.CLASSES)
    for record in records:
        (cls,) = record["classes"]
        assert f"a {cls['name']} on a " in record["prompt"], record["prompt"]
        assert cls["id"] == scenes.CLASSES.index(cls["name"]) + 1
        with Image.open(out / "SegmentationClass" / f"{record['id']}.png") as png:
            labels = np.asarray(png)
        with Image.open(out / "JPEGImages" / f"{record['id']}.jpg") as jpg:
            assert jpg.size == (64, 64)
        assert set(np.unique(labels).tolist()) <= {0, cls["id"], 255}, np.unique(labels)
