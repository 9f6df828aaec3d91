"""Refinement of soft masks: resizing and PAMR (pixel-adaptive mask refinement)."""

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

Resize = Literal["bilinear", "bicubic", "nearest"]
_JAX_METHOD = {"bilinear": "linear", "bicubic": "cubic", "nearest": "nearest"}


def resize(m: Float[Array, "... h w"], size: tuple[int, int], method: Resize = "bilinear"):
    """Resize the last two axes to ``size`` (half-pixel centres, as OpenCV and PyTorch's
    ``align_corners=False``); no antialiasing, so upsampling matches the references.

    .. warning::
       jax's cubic kernel is Keys' a = -0.5; OpenCV's INTER_CUBIC (SeeDiff's code) uses
       a = -0.75, so bicubic results are close to, not equal with, the reference code.

    >>> resize(jnp.array([[0.0, 1.0]]), (1, 4)).tolist()
    [[0.0, 0.25, 0.75, 1.0]]
    """
    if method not in _JAX_METHOD:
        raise ValueError(f"method must be one of {sorted(_JAX_METHOD)}, got {method!r}")
    if m.ndim < 2:
        raise ValueError(f"resize needs (..., h, w), got shape {m.shape}")
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    return jax.image.resize(m, m.shape[:-2] + tuple(size), _JAX_METHOD[method], antialias=False)


@dataclasses.dataclass(frozen=True)
class PAMRConfig:
    """PAMR settings (Araslanov & Roth, CVPR 2020).

    Attributes:
      dilations: neighbourhood dilations; 8 neighbours each.
      num_iter: propagation iterations.
      sigma_scale: the affinity is ``-|x_i - x_j| / (1e-8 + sigma_scale * std_i)``; 0.1 in
        the reference, 0.2 in SeeDiff's copy.
    """

    dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    num_iter: int = 10
    sigma_scale: float = 0.1

    def __post_init__(self):
        if not self.dilations or min(self.dilations) < 1:
            raise ValueError(f"dilations must be positive integers, got {self.dilations}")
        if self.num_iter < 0:
            raise ValueError(f"num_iter must be >= 0, got {self.num_iter}")
        if self.sigma_scale <= 0:
            raise ValueError(f"sigma_scale must be > 0, got {self.sigma_scale}")


#: the reference defaults (1-stage-wseg ``core/config.py``: PAMR_KERNEL, PAMR_ITER)
PAMR_DEFAULT = PAMRConfig()
#: SeeDiff demo's regime (``src/pamr.py``: dilation 1, 5000 iterations, 0.2 sigma)
PAMR_SEEDIFF = PAMRConfig(dilations=(1,), num_iter=5000, sigma_scale=0.2)

_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _neighbours(x: Float[Array, "c h w"], dilations) -> Float[Array, "p c h w"]:
    """The 8 neighbours at every dilation, replicate padding (``LocalAffinity`` shifts)."""
    h, w = x.shape[-2:]
    pad = max(dilations)
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    out = []
    for d in dilations:
        for dy, dx in _OFFSETS:
            out.append(jax.lax.dynamic_slice_in_dim(
                jax.lax.dynamic_slice_in_dim(xp, pad + dy * d, h, axis=1), pad + dx * d, w, axis=2))
    return jnp.stack(out)


def pamr_affinity(image: Float[Array, "h w 3"], cfg: PAMRConfig = PAMR_DEFAULT) -> Float[Array, "p h w"]:
    """Softmax weights over the ``p = 8 * len(dilations)`` neighbours of each pixel.

    ``a_p = mean_c( -|x_i - x_{i+p}| / (1e-8 + s * std_i) )``, softmax over p, where ``std_i`` is
    the unbiased std per channel of the 9 samples (centre included) at every dilation
    (reference ``LocalAffinityAbs``, ``LocalStDev``).
    """
    x = jnp.moveaxis(image.astype(jnp.float32), -1, 0)  # (c, h, w)
    nb = _neighbours(x, cfg.dilations)  # (p, c, h, w)
    samples = jnp.concatenate([nb, jnp.broadcast_to(x, (len(cfg.dilations),) + x.shape)])
    std = jnp.std(samples, axis=0, ddof=1)  # 9*D samples per channel
    aff = -jnp.abs(nb - x[None]) / (1e-8 + cfg.sigma_scale * std[None])
    return jax.nn.softmax(jnp.mean(aff, axis=1), axis=0)


def pamr(
    image: Float[Array, "h w 3"], masks: Float[Array, "c h w"], cfg: PAMRConfig = PAMR_DEFAULT
) -> Float[Array, "c h w"]:
    """Pixel-adaptive mask refinement: ``m_i <- sum_p k_ip m_{i+p}``, ``num_iter`` times.

    Every output is a convex combination of its neighbours' values, so a constant mask stays
    constant and masks that sum to 1 over classes still do.

    Args:
      image: RGB in [0, 1] at the masks' size.
      masks: soft masks per class (background included, as in the reference).

    References: Araslanov & Roth, "Single-Stage Semantic Segmentation from Image Labels",
    CVPR 2020, Sec. 3.3; ``visinf/1-stage-wseg`` ``models/mods/pamr.py`` (methods.md 6); SeeDiff
    supplementary Eq. S1-S2.
    """
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must have shape (h, w, 3), got {image.shape}")
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"masks must have shape (c, {image.shape[0]}, {image.shape[1]}), got {masks.shape}")
    weights = pamr_affinity(image, cfg)[:, None]  # (p, 1, h, w)

    def step(_, m):
        return jnp.sum(weights * _neighbours(m, cfg.dilations), axis=0)

    return jax.lax.fori_loop(0, cfg.num_iter, step, masks.astype(jnp.float32))
