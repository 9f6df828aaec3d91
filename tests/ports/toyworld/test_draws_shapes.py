"""The bundled model draws the shape a prompt names, with no colour word (issue 17): checked by
``shape_check``, a descriptor classifier that is itself held to a known answer on real scenes."""

import numpy as np
import pytest

import jaxmask
from ports.toyworld import scenes
from tests.ports.toyworld.shape_check import ShapeClassifier, real_scenes


@pytest.fixture(scope="module")
def classify():
    return ShapeClassifier()


def test_the_check_names_the_shapes_of_real_scenes(classify):
    images, classes = real_scenes(160, seed=1)  # held out: the classifier is built on seed 0
    named = np.asarray([classify(image) for image in images])
    right = named == np.asarray(scenes.CLASSES)[classes]
    assert right.mean() >= 0.95, right.mean()
    for c, name in enumerate(scenes.CLASSES):  # no class is left to chance
        assert right[classes == c].mean() >= 0.8, name


def test_the_check_finds_no_shape_in_a_plain_image(classify):
    assert classify(np.full((64, 64, 3), 120, np.uint8)) is None


@pytest.mark.xfail(
    strict=True,
    reason="the bundled model draws colour blobs, not shapes; issue 17's retrained model lands "
    "with this test passing (strict: the marker must go then)",
)
def test_the_bundled_model_draws_the_named_shape_without_a_colour_word(classify):
    named = [name for name in scenes.CLASSES for _ in range(2)]
    out = jaxmask.load().generate(
        [f"a {name} on a plain background" for name in named],  # the shapes preset's template
        0,
        steps=20,
    )
    drawn = [classify(np.asarray(image)) for image in out.images]
    hits = sum(d == n for d, n in zip(drawn, named, strict=True))
    assert hits >= 14, list(zip(named, drawn, strict=True))
