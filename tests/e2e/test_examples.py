"""Every script in ``examples/`` runs, as a user runs it (``python examples/NAME.py``, a fresh
process in an empty folder), shrunk by ``JAXMASK_EXAMPLE_SMALL=1``; the checks read what it
prints and writes."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TOY_MODEL = ROOT / "ports" / "toyworld" / "model"


def run_example(name: str, cwd: Path, *args: str) -> str:
    """Run ``examples/name`` in ``cwd`` with the small settings; its stdout."""
    env = dict(os.environ, JAXMASK_EXAMPLE_SMALL="1", JAX_PLATFORMS="cpu")
    # XLA_FLAGS comes from tests/conftest.py (4 simulated CPU devices: 03 splits its batch over
    # them); a cheaper CPU backend compile saves ~25% of each run, which is mostly compiling.
    env["XLA_FLAGS"] = " ".join(
        [
            env.get("XLA_FLAGS", ""),
            "--xla_backend_optimization_level=0",
            "--xla_llvm_disable_expensive_passes=true",
        ]
    ).strip()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_every_example_is_tested():
    tested = {"01_generate.py", "02_vmap_masks.py", "03_dataset_on_mesh.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested, "add a test for the new example"


def test_01_generate_writes_an_image_and_its_label_map(tmp_path):
    out = run_example("01_generate.py", tmp_path)
    match = re.search(r"classes: (.*) \| label values: (\[.*\])", out)
    assert match, out
    assert match.group(1) == "(('star',),)"
    with Image.open(tmp_path / "image.png") as image:
        assert image.mode == "RGB" and image.size == (64, 64)  # the toy model's native size
    with Image.open(tmp_path / "labels.png") as labels:
        assert labels.mode == "P" and labels.size == (64, 64)
        values = np.unique(np.asarray(labels)).tolist()
    assert values == json.loads(match.group(2))
    assert set(values) <= {0, 1}  # background and the one class


def test_02_vmap_masks_recovers_the_scene(tmp_path):
    out = run_example("02_vmap_masks.py", tmp_path)
    lines = out.splitlines()
    assert lines[0] == ("soft masks (2, 2, 128, 128) float32 | label maps (2, 128, 128) uint8"), (
        out
    )  # 2 items, 2 classes, 128 px (the small settings)
    miou = float(re.fullmatch(r"mIoU over the batch: (\S+)", lines[1]).group(1))
    assert miou > 0.9, out
    assert lines[2] == "classes per item: [[0, 1, 2], [0, 1, 2]]", out


def test_03_dataset_on_mesh_writes_a_voc_dataset(tmp_path):
    out = run_example("03_dataset_on_mesh.py", tmp_path, str(TOY_MODEL), "data")
    data = tmp_path / "data"
    assert out.strip() == f"2 written, 0 already there; 2 items in {Path('data')}", out
    records = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 2
    assert sorted(c["name"] for r in records for c in r["classes"]) == ["cat", "dog"]
    assert {r["steps"] for r in records} == {2}
    assert len(list((data / "JPEGImages").glob("*.jpg"))) == 2
    assert len(list((data / "SegmentationClass").glob("*.png"))) == 2
