"""Otsu's threshold: bit parity with scikit-image, hand values, constant input, jit and vmap."""

import functools
import zlib
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.filters import threshold_otsu as sk_otsu

from jaxmask.threshold import threshold_otsu, threshold_otsu_levels

otsu = jax.jit(threshold_otsu, static_argnames="nbins")


def _rand(seed: int, shape) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).random(shape, dtype=np.float32))


SHAPES = [(3, 3), (4, 7), (8, 8), (16, 5), (32, 32), (64, 64)]


def _sample(rng: np.random.Generator, kind: str, shape) -> np.ndarray:
    if kind == "uniform":
        x = rng.random(shape)
    elif kind == "bimodal":
        pick = rng.random(shape) < rng.uniform(0.1, 0.9)
        a = rng.normal(rng.uniform(0, 1), rng.uniform(0.01, 0.2), shape)
        b = rng.normal(rng.uniform(0, 1), rng.uniform(0.01, 0.2), shape)
        x = np.where(pick, a, b)
    elif kind == "skewed":  # most mass near 0, as a squared attention map
        x = rng.random(shape) ** 4 * rng.uniform(1e-3, 1e3)
    else:  # "wide": negative values, large offset
        x = rng.normal(size=shape) * 100 + 3
    return x.astype(np.float32)


# --- parity with scikit-image ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uniform", "bimodal", "skewed", "wide"])
@pytest.mark.parametrize("shape", SHAPES)
def test_equals_skimage_on_random_arrays(kind, shape):
    rng = np.random.default_rng(zlib.crc32(repr((kind, shape)).encode()))  # same in every process
    for _ in range(8):
        x = _sample(rng, kind, shape)
        assert float(otsu(jnp.asarray(x))) == sk_otsu(x), x


@pytest.mark.parametrize("nbins", [2, 3, 16, 77, 1000])
def test_equals_skimage_for_other_bin_counts(nbins):
    rng = np.random.default_rng(nbins)
    for i in range(20):
        x = _sample(rng, ["uniform", "bimodal", "skewed", "wide"][i % 4], (8, 8))
        assert float(otsu(jnp.asarray(x), nbins=nbins)) == sk_otsu(x, nbins=nbins), x


def test_equals_skimage_with_values_on_bin_edges_and_few_distinct_values():
    # values on a grid put many of them exactly on (or an ulp from) bin edges, and leave
    # long runs of empty bins: the plateau ties must resolve to their first bin, as in skimage
    rng = np.random.default_rng(1)
    for levels in (2, 3, 5, 17, 256, 257):
        x = (rng.integers(0, levels, (16, 16)) / (levels - 1)).astype(np.float32)
        assert float(otsu(jnp.asarray(x))) == sk_otsu(x), levels


@settings(max_examples=25, deadline=None)
@given(
    shape=st.sampled_from(SHAPES[:3]),
    seed=st.integers(0, 2**32 - 1),
    scale=st.floats(1e-3, 1e3),
    offset=st.floats(-10, 10),
)
def test_property_equals_skimage(shape, seed, scale, offset):
    x = (np.random.default_rng(seed).random(shape) * scale + offset).astype(np.float32)
    assert float(otsu(jnp.asarray(x))) == sk_otsu(x)


# --- hand values ---------------------------------------------------------------------------------


def test_hand_values():
    # bins of width 1 on [0, 10]: counts 1, 1, 0 x 7, 2; splitting after bin 1 gives
    # w0 = w1 = 2, m0 = 1, m1 = 9.5, i.e. 4 * 8.5**2 = 289, the best; the plateau's first bin
    # (bin 1, centre 1.5) wins over bins 2..8
    assert float(threshold_otsu(jnp.array([0.0, 1.0, 9.0, 10.0]), nbins=10)) == 1.5
    # two values, two bins [0, .5), [.5, 1]: the only split, after bin 0, centre 0.25
    assert float(threshold_otsu(jnp.array([0.0, 1.0]), nbins=2)) == 0.25


def test_separates_two_clusters():
    low = jnp.full((40,), 0.1)
    high = jnp.full((24,), 0.8)
    x = jnp.concatenate([low, high]).reshape(8, 8)
    t = threshold_otsu(x)
    assert 0.1 < float(t) < 0.8
    np.testing.assert_array_equal(np.asarray(x > t), np.asarray(x) > 0.5)


@pytest.mark.parametrize("value", [0.0, 0.37, -5.0, 1e6])
def test_constant_input_returns_its_value(value):
    x = jnp.full((5, 5), value, jnp.float32)
    t = otsu(x)
    assert not np.isnan(float(t))
    assert float(t) == np.float32(value) == sk_otsu(np.asarray(x))
    assert float(otsu(jnp.array([value], jnp.float32))) == np.float32(value)


def test_any_shape_is_flattened():
    x = _rand(0, (2, 3, 4, 5))
    assert float(threshold_otsu(x)) == float(threshold_otsu(x.reshape(-1)))
    assert float(threshold_otsu(x)) == sk_otsu(np.asarray(x).reshape(12, 10))


def test_returns_float32_scalar_inside_range():
    x = _rand(1, (16, 16))
    t = threshold_otsu(x)
    assert t.shape == () and t.dtype == jnp.float32
    assert float(x.min()) <= float(t) <= float(x.max())


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.unchecked("asserts the core's own error message")
def test_errors():
    with pytest.raises(ValueError, match="nbins must be an int >= 2"):
        threshold_otsu(jnp.ones((3, 3)), nbins=1)
    with pytest.raises(ValueError, match="nbins must be an int >= 2"):
        threshold_otsu(jnp.ones((3, 3)), nbins=2.5)
    with pytest.raises(ValueError, match=r"at least one value, got shape \(0, 4\)"):
        threshold_otsu(jnp.ones((0, 4)))


# --- jit, vmap, recompilation -------------------------------------------------------------------


def test_jit_equals_eager_and_does_not_recompile():
    f = jax.jit(lambda v: threshold_otsu(v))  # a fresh function: its own compilation cache
    x = _rand(2, (8, 8)) ** 3
    assert float(f(x)) == float(threshold_otsu(x))
    f(x + 0.5)
    assert f._cache_size() == 1


def test_vmap_equals_loop():
    xs = _rand(3, (5, 12, 12)) ** 2
    batched = jax.jit(jax.vmap(functools.partial(threshold_otsu, nbins=64)))(xs)
    loop = [float(threshold_otsu(x, nbins=64)) for x in xs]
    np.testing.assert_array_equal(np.asarray(batched), np.asarray(loop, np.float32))
    assert loop == [sk_otsu(np.asarray(x), nbins=64) for x in xs]


# --- OpenCV's integer Otsu -------------------------------------------------------------------

otsu_levels = jax.jit(threshold_otsu_levels)


def _between_class(levels: np.ndarray, t: int) -> Fraction:
    """The exact between-class variance (times n^2) of the split {v <= t} / {v > t}."""
    v = levels.ravel().astype(np.int64)
    low, high = v[v <= t], v[v > t]
    if not len(low) or not len(high):
        return Fraction(0)
    gap = Fraction(int(low.sum()), len(low)) - Fraction(int(high.sum()), len(high))
    return len(low) * len(high) * gap * gap


def _cv2_otsu(levels: np.ndarray) -> int:
    import cv2

    return int(cv2.threshold(levels, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[0])


def _level_sample(rng: np.random.Generator, kind: str, shape, top: int) -> np.ndarray:
    if kind == "squared_blob":  # SeeDiff's (m * m * 255) of a blob, bicubic overshoot above 255
        yy, xx = np.mgrid[: shape[0], : shape[1]]
        cy, cx = rng.random(2) * shape
        m = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(1, 6) ** 2))
        m = m + 0.1 * rng.random(shape)
        m = (m - m.min()) / (m.max() - m.min()) * rng.uniform(0.9, 1.3)
        return (m * m * 255).astype(np.uint16)
    if kind == "skewed":
        return (rng.random(shape) ** 3 * top).astype(np.uint16)
    return rng.integers(0, top + 1, shape).astype(np.uint16)


def _same_or_tie(levels: np.ndarray, ours: int, theirs: int) -> bool:
    """The same partition, or two splits whose exact variances agree to float32 resolution
    (equal: a symmetric histogram; within 3e-7: a near tie float32 cannot order)."""
    if np.array_equal(levels > ours, levels > theirs):
        return True
    a, b = _between_class(levels, ours), _between_class(levels, theirs)
    return abs(a - b) <= Fraction(3, 10**7) * max(a, b)


@pytest.mark.parametrize("kind", ["squared_blob", "skewed", "uniform"])
@pytest.mark.parametrize("shape", [(5, 7), (16, 16), (32, 32), (64, 64)])
def test_levels_equals_opencv_otsu(kind, shape):
    """The partition of ``cv2.threshold(uint16, THRESH_OTSU)``; where it differs, the two
    splits tie; on SeeDiff-like maps (``squared_blob``) it is the same partition every time."""
    import cv2  # noqa: F401  (the test extra; skip cleanly where it is missing)

    rng = np.random.default_rng(zlib.crc32(repr((kind, shape)).encode()))
    for top in (3, 40, 255, 400, 4000):
        for _ in range(4):
            levels = _level_sample(rng, kind, shape, top)
            theirs, ours = _cv2_otsu(levels), int(otsu_levels(jnp.asarray(levels, jnp.int32)))
            if kind == "squared_blob":
                np.testing.assert_array_equal(levels > ours, levels > theirs)
            assert _same_or_tie(levels, ours, theirs), levels
            if np.array_equal(levels > ours, levels > theirs):  # ours: the level below the gap
                assert ours in levels and ours <= theirs


def test_levels_equals_opencv_otsu_on_uint8():
    rng = np.random.default_rng(7)
    for _ in range(20):
        levels = rng.integers(0, 256, (16, 16)).astype(np.uint8)
        ours = int(otsu_levels(jnp.asarray(levels, jnp.int32)))
        theirs = _cv2_otsu(levels)
        assert _same_or_tie(levels, ours, theirs), levels


def test_levels_hand_values():
    assert int(threshold_otsu_levels(jnp.array([0, 1, 9, 10]))) == 1
    # levels above 255 stay distinct (no 256-bin histogram): {300} vs {0, 1, 2}
    assert int(threshold_otsu_levels(jnp.array([0, 1, 2, 300]))) == 2
    # two clusters far apart inside a 16-bit range
    x = jnp.array([[5, 6, 7], [6000, 6001, 6002]])
    assert int(threshold_otsu_levels(x)) == 7


@pytest.mark.parametrize("value", [0, 1, 7, 300])
def test_levels_constant_input_returns_zero_as_opencv(value):
    x = np.full((4, 4), value, np.uint16)
    assert int(threshold_otsu_levels(jnp.asarray(x, jnp.int32))) == 0 == _cv2_otsu(x)
    assert int(threshold_otsu_levels(jnp.array([value]))) == 0


def test_levels_errors_dtype_jit_vmap():
    with pytest.raises(ValueError, match="needs at least one value"):
        threshold_otsu_levels(jnp.zeros((0,), jnp.int32))
    x = jnp.asarray(np.random.default_rng(3).integers(0, 300, (4, 16, 16)), jnp.int32)
    out = threshold_otsu_levels(x[0])
    assert out.dtype == jnp.int32 and out.shape == ()
    assert int(otsu_levels(x[0])) == int(out)
    before = otsu_levels._cache_size()
    otsu_levels(x[1])
    assert otsu_levels._cache_size() == before
    np.testing.assert_array_equal(
        jax.vmap(threshold_otsu_levels)(x), [int(threshold_otsu_levels(v)) for v in x]
    )
    # integer-valued floats are levels too
    assert int(threshold_otsu_levels(x[0].astype(jnp.float32))) == int(out)
