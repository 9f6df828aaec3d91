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


def test_the_bundled_model_draws_the_named_shape_without_a_colour_word(classify):
    """48 prompts with no colour word (6 per class, the shapes preset's template): the check must
    name the prompt's shape in at least 32 (the model of 2026-12-05 scored 36 here, 42 of 48 on
    another item seed; the first bundled model drew an object in 3 of 16, the run's export at
    UNet step 19,050 the named shape in 7 of 16), and every class at least twice.

    The check is stricter than the eye: it names some clean generated circles "square" and
    crosses "star" (docs/toymodel.md has the pictures), so 32 of 48 is not 67% drawn."""
    named = [name for name in scenes.CLASSES for _ in range(6)]
    out = jaxmask.load().generate(
        [f"a {name} on a plain background" for name in named], 0, steps=20
    )
    drawn = [classify(np.asarray(image)) for image in out.images]
    hits = np.array([d == n for d, n in zip(drawn, named, strict=True)])
    assert hits.sum() >= 32, list(zip(named, drawn, strict=True))
    per_class = hits.reshape(len(scenes.CLASSES), 6).sum(1)
    assert (per_class >= 2).all(), dict(zip(scenes.CLASSES, per_class.tolist(), strict=True))
