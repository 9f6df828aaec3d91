"""The bundled toy model: shipped as package data, loaded by the normal loader as the default, and
good enough that its images show the named object in the named colour where its mask says."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import jaxmask
from ports import api
from ports.toyworld import scenes, train

MODEL = api.DEFAULT_MODEL


def test_the_folder_is_small_complete_package_data():
    import tomllib

    files = [p for p in MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    globs = tomllib.loads((Path(__file__).parents[3] / "pyproject.toml").read_text())["tool"][
        "setuptools"
    ]["package-data"]["ports.toyworld"]
    packaged = {p for g in globs for p in MODEL.parent.glob(g)}
    assert set(files) == packaged, sorted(str(p) for p in set(files) ^ packaged)
    record = json.loads((MODEL / "training.json").read_text())
    assert record["seed"] == 0 and record["command"].startswith("jaxmask train-toy")
    assert record["config"] == {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in dataclasses.asdict(train.PRESETS["cpu"]).items()
    }
    assert record["unet_loss"][-1] < 0.5 * record["unet_loss"][0]


@pytest.fixture(scope="module")
def pipe():
    return jaxmask.load()  # no model: the bundled one


def test_load_without_a_model_is_the_bundled_one(pipe):
    assert Path(pipe.sd.source) == MODEL
    assert pipe.native_size == 64 and pipe.resolutions() == (4, 8, 16)


# One object per prompt, on a plain background: the image's colour under the mask must be the
# named colour (nearer to it than the colour outside the mask is).
CASES = [("red", "star"), ("blue", "circle"), ("yellow", "square"), ("green", "heart")]


def test_masks_cover_the_named_object_in_its_colour(pipe):
    prompts = [f"a {c} {s} on a plain background" for c, s in CASES]
    out = pipe.generate(prompts, 0, classes=[[s] for _, s in CASES], steps=20)
    for i, (colour, shape) in enumerate(CASES):
        image = out.images[i].astype(np.float32)
        fg = out.label_maps[i] == 1
        assert 0.02 < fg.mean() < 0.6, (shape, fg.mean())
        want = np.asarray(scenes.COLOURS[colour], np.float32)
        inside = np.linalg.norm(image[fg].mean(0) - want)
        outside = np.linalg.norm(image[out.label_maps[i] == 0].mean(0) - want)
        assert inside < 0.5 * outside, (colour, shape, inside, outside)
