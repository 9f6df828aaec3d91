"""Otsu's threshold in JAX, value-identical to scikit-image's ``threshold_otsu`` on floats."""

import jax.numpy as jnp
from jaxtyping import Array, Float


def threshold_otsu(values: Float[Array, "..."], nbins: int = 256) -> Float[Array, ""]:
    """Otsu (1979): the bin centre maximising the between-class variance.

    Same histogram as skimage (``np.histogram(values, nbins, range=(min, max))``, including
    its correction for values that rounding puts in a neighbouring bin) and the same argmax of
    ``w0[:-1] * w1[1:] * (m0[:-1] - m1[1:])**2``; constant input returns its value (never NaN).
    Returns the threshold; the caller applies it (``values > threshold`` is the foreground).

    .. warning::
       jax computes in float32, skimage in float64: when the two best bins' between-class
       variances agree to ~1e-7 relative (a near tie), the two may pick neighbouring bins.

    >>> float(threshold_otsu(jnp.array([0.1, 0.2, 0.8, 0.9])))  # the centre of 0.2's bin
    0.2015624940395355

    References: N. Otsu (1979); ``skimage.filters.thresholding.threshold_otsu``.
    """
    x = jnp.ravel(values).astype(jnp.float32)
    lo, hi = jnp.min(x), jnp.max(x)
    span = jnp.where(hi > lo, hi - lo, 1.0)
    edges = lo + span * (jnp.arange(nbins + 1, dtype=jnp.float32) / nbins)
    idx = jnp.clip(jnp.floor((x - lo) * (nbins / span)).astype(jnp.int32), 0, nbins - 1)
    # np.histogram's correction for values that rounding puts in the neighbouring bin
    idx = jnp.where(x < edges[idx], idx - 1, idx)
    idx = jnp.where((x >= edges[idx + 1]) & (idx != nbins - 1), idx + 1, idx)
    counts = jnp.zeros(nbins, jnp.float32).at[idx].add(1.0)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = jnp.cumsum(counts)
    w1 = jnp.cumsum(counts[::-1])[::-1]
    m0 = jnp.cumsum(counts * centres) / jnp.maximum(w0, 1.0)
    m1 = (jnp.cumsum((counts * centres)[::-1]) / jnp.maximum(jnp.cumsum(counts[::-1]), 1.0))[::-1]
    var = w0[:-1] * w1[1:] * (m0[:-1] - m1[1:]) ** 2
    return jnp.where(hi > lo, centres[jnp.argmax(var)], lo)
