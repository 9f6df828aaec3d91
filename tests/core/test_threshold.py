"""Otsu's threshold: bit parity with scikit-image, hand values, constant input, jit and vmap."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.filters import threshold_otsu as sk_otsu

from jaxmask.threshold import threshold_otsu

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
    rng = np.random.default_rng(abs(hash((kind, shape))) % 2**32)
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
