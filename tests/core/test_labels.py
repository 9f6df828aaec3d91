"""label_map (background, classes, ignore band), the VOC palette and class names, colorize."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxmask.labels import IGNORE, VOC_CLASSES, VOC_PALETTE, colorize, label_map


def _rand(seed: int, shape) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).random(shape, dtype=np.float32))


def _reference(soft: np.ndarray, fg: float, ignore: float | None) -> np.ndarray:
    """Dataset Diffusion's gen_data.py rule, written per pixel."""
    k, h, w = soft.shape
    out = np.zeros((h, w), np.uint8)
    for i in range(h):
        for j in range(w):
            scores = [float(soft[c, i, j]) for c in range(k)]
            top = max(scores) if scores else 0.0
            if scores and top >= fg:
                out[i, j] = scores.index(top) + 1
            elif scores and ignore is not None and top >= ignore:
                out[i, j] = 255
    return out


# --- label_map -----------------------------------------------------------------------------------


def test_label_map_hand_values():
    soft = jnp.array(
        [
            [[0.9, 0.55, 0.1, 0.6], [0.0, 0.7, 0.5, 0.59]],
            [[0.2, 0.3, 0.0, 0.6], [0.8, 0.1, 0.4, 0.0]],
        ]
    )
    # (0,3): tie 0.6/0.6 -> first class; (1,2): 0.5 is exactly the ignore threshold -> 255;
    # (1,3): 0.59 < 0.6 but >= 0.5 -> 255
    np.testing.assert_array_equal(label_map(soft, 0.6, 0.5), [[1, 255, 0, 1], [2, 1, 255, 255]])
    np.testing.assert_array_equal(label_map(soft, 0.6), [[1, 0, 0, 1], [2, 1, 0, 0]])
    np.testing.assert_array_equal(label_map(soft, 0.6, 0.6), [[1, 0, 0, 1], [2, 1, 0, 0]])


def test_label_map_dtype_and_shapes():
    for k, hw in [(1, (3, 3)), (5, (8, 6)), (20, (32, 32))]:
        out = label_map(_rand(k, (k,) + hw), 0.5, 0.3)
        assert out.shape == hw and out.dtype == jnp.uint8
        assert set(np.unique(out)) <= set(range(k + 1)) | {IGNORE}


def test_no_classes_gives_all_background():
    out = label_map(jnp.zeros((0, 4, 5)), 0.5, 0.2)
    assert out.shape == (4, 5) and out.dtype == jnp.uint8 and not np.any(np.asarray(out))


def test_threshold_extremes():
    soft = _rand(1, (3, 4, 4))
    # fg 0: every pixel gets its argmax class
    np.testing.assert_array_equal(label_map(soft, 0.0), np.argmax(np.asarray(soft), 0) + 1)
    # fg 1 with ignore 0: nothing reaches 1, everything is in the band
    assert np.all(np.asarray(label_map(soft, 1.0, 0.0)) == 255)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(1, 4),
    fg=st.sampled_from([0.3, 0.5, 0.6, 0.9]),
    ignore=st.sampled_from([None, 0.0, 0.25, 0.5]),
)
def test_label_map_equals_per_pixel_rule(seed, k, fg, ignore):
    if ignore is not None and ignore > fg:
        ignore = fg
    soft = np.asarray(_rand(seed, (k, 5, 6)))
    np.testing.assert_array_equal(
        label_map(jnp.asarray(soft), fg, ignore), _reference(soft, fg, ignore)
    )


@pytest.mark.unchecked("asserts the core's own error message")
def test_label_map_errors():
    soft = jnp.zeros((2, 3, 3))
    with pytest.raises(ValueError, match=r"fg_threshold must lie in \[0, 1\], got 1.5"):
        label_map(soft, 1.5)
    with pytest.raises(ValueError, match=r"fg_threshold must lie in \[0, 1\]"):
        label_map(soft, -0.1)
    with pytest.raises(
        ValueError, match=r"ignore_threshold must lie in \[0, fg_threshold=0.5\], or be None"
    ):
        label_map(soft, 0.5, 0.6)
    with pytest.raises(ValueError, match=r"ignore_threshold must lie in \[0, fg_threshold=0.5\]"):
        label_map(soft, 0.5, -0.2)
    with pytest.raises(ValueError, match=r"soft_masks must have shape \(k, h, w\), got \(3, 3\)"):
        label_map(jnp.zeros((3, 3)), 0.5)
    with pytest.raises(ValueError, match="at most 254 classes fit a uint8 label map"):
        label_map(jnp.zeros((255, 1, 1)), 0.5)


def test_label_map_jit_and_vmap():
    soft = _rand(2, (4, 3, 6, 5))  # 4 images, 3 classes
    f = jax.jit(lambda s: label_map(s, 0.6, 0.4))  # a fresh function: its own cache
    np.testing.assert_array_equal(f(soft[0]), label_map(soft[0], 0.6, 0.4))
    f(soft[1])
    assert f._cache_size() == 1
    batched = jax.vmap(lambda s: label_map(s, 0.6, 0.4))(soft)
    np.testing.assert_array_equal(batched, np.stack([label_map(s, 0.6, 0.4) for s in soft]))


# --- palette, classes, colorize ------------------------------------------------------------------


def test_voc_palette_known_colours():
    # VOC devkit colours (VOClabelcolormap.m), as in every VOC SegmentationClass PNG palette
    known = {
        0: (0, 0, 0),
        1: (128, 0, 0),
        2: (0, 128, 0),
        3: (128, 128, 0),
        4: (0, 0, 128),
        5: (128, 0, 128),
        6: (0, 128, 128),
        7: (128, 128, 128),
        8: (64, 0, 0),
        9: (192, 0, 0),
        12: (64, 0, 128),
        15: (192, 128, 128),
        20: (0, 64, 128),
        255: (224, 224, 192),
    }
    assert VOC_PALETTE.shape == (256, 3) and VOC_PALETTE.dtype == np.uint8
    for label, rgb in known.items():
        assert tuple(VOC_PALETTE[label]) == rgb, label
    assert len({tuple(c) for c in VOC_PALETTE}) == 256  # every label its own colour
    with pytest.raises(ValueError):
        VOC_PALETTE[0] = (1, 2, 3)  # read-only: a shared constant


def test_voc_classes():
    assert len(VOC_CLASSES) == 20 and len(set(VOC_CLASSES)) == 20
    assert VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[14] == "person"
    assert VOC_CLASSES[-1] == "tvmonitor"


@pytest.mark.unchecked("asserts the core's own error message")
def test_colorize():
    labels = jnp.array([[0, 1, 2], [15, 20, 255]], jnp.uint8)
    rgb = colorize(labels)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == jnp.uint8
    np.testing.assert_array_equal(rgb, VOC_PALETTE[np.asarray(labels)])
    np.testing.assert_array_equal(colorize(labels.astype(jnp.int32)), rgb)
    np.testing.assert_array_equal(jax.jit(colorize)(labels), rgb)
    with pytest.raises(ValueError, match="labels must be an integer label map, got dtype float32"):
        colorize(jnp.zeros((2, 2)))


def test_mask_confidence_is_the_mean_score_inside_each_mask():
    from jaxmask import mask_confidence

    soft = jnp.array(
        [
            [[0.9, 0.7, 0.1], [0.5, 0.0, 0.0]],  # class 1: labelled at 0.9, 0.7, 0.5
            [[0.0, 0.0, 0.8], [0.0, 0.2, 0.3]],  # class 2: labelled nowhere
        ]
    )
    label = jnp.array([[1, 1, 255], [1, 0, 0]], jnp.uint8)  # 255 counts for no class
    np.testing.assert_allclose(mask_confidence(soft, label), [0.7, 0.0], atol=1e-6)
    batched = jax.jit(jax.vmap(mask_confidence))(soft[None].repeat(2, 0), label[None].repeat(2, 0))
    np.testing.assert_allclose(batched, [[0.7, 0.0]] * 2, atol=1e-6)
