"""The procedural shapes world: determinism, exact labels, captions that match the pixels."""

import numpy as np
import pytest

from ports.toyworld import scenes


def test_same_seed_same_scene_and_different_seeds_differ():
    a, b = scenes.scene(7, 48), scenes.scene(7, 48)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.caption == b.caption
    c = scenes.scene(8, 48)
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("seed", range(20))
def test_labels_and_caption_agree_with_the_drawn_objects(seed):
    s = scenes.scene(seed, 64)
    assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
    assert s.labels.shape == (64, 64) and s.labels.dtype == np.uint8
    assert 1 <= len(s.objects) <= 3
    present = set(np.unique(s.labels)) - {0}
    assert present == {o.cls + 1 for o in s.objects}  # every captioned object is visible
    for o in s.objects:
        assert f"{o.colour} {scenes.CLASSES[o.cls]}" in s.caption
        # labelled pixels carry the object's colour (up to the +-15% shade)
        pix = s.image[s.labels == o.cls + 1].astype(float)
        target = np.array(scenes.COLOURS[o.colour], float)
        assert np.all(np.abs(pix - pix.mean(0)) < 1.0)  # one flat colour per object
        assert np.all(np.abs(pix.mean(0) - target) <= 0.16 * target + 1.0)
    assert s.caption.endswith("background")


def test_occlusion_order_and_minimum_visibility():
    big = scenes.Obj(cls=1, colour="red", cy=0.5, cx=0.5, size=0.3, angle=0.0)  # square
    small = scenes.Obj(cls=0, colour="blue", cy=0.5, cx=0.5, size=0.1, angle=0.0)  # circle on top
    rng = np.random.default_rng(0)
    s = scenes.render((big, small), "plain", rng, 64)
    assert s.labels[32, 32] == 1  # the later circle occludes the square at the centre
    assert {o.cls for o in s.objects} == {0, 1}
    hidden = scenes.render((small, big), "plain", np.random.default_rng(0), 64)
    assert [o.cls for o in hidden.objects] == [1]  # the circle is fully hidden: left out
    assert "circle" not in hidden.caption and not np.any(hidden.labels == 1)


def test_all_classes_and_backgrounds_render():
    rng = np.random.default_rng(1)
    for c in range(len(scenes.CLASSES)):
        o = scenes.Obj(cls=c, colour="white", cy=0.5, cx=0.5, size=0.25, angle=0.3)
        for bg in scenes.BACKGROUNDS:
            s = scenes.render((o,), bg, rng, 32)
            area = np.mean(s.labels == c + 1)
            assert 0.03 < area < 0.5, (scenes.CLASSES[c], bg, area)


def test_caption_grammar():
    objs = (scenes.Obj(3, "red", 0.3, 0.3, 0.1, 0.0), scenes.Obj(4, "orange", 0.7, 0.7, 0.1, 0.0))
    assert (
        scenes.caption(objs, "striped") == "a red star and an orange ring on a striped background"
    )
    with pytest.raises(ValueError, match="unknown background"):
        scenes.render(objs, "tartan", np.random.default_rng(0), 16)
