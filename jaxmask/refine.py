"""Refinement of soft masks: resizing, and PAMR (pixel-adaptive mask refinement).

Building blocks first (``resize`` and its ``cubic_cv2_weights``, ``pamr_affinity``,
``pamr_propagate``), then ``pamr`` composed from them, with the reference's settings and
SeeDiff's as presets.
"""

import dataclasses
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

Resize = Literal["bilinear", "bicubic", "bicubic_cv2", "nearest"]
_JAX_METHOD = {"bilinear": "linear", "bicubic": "cubic", "nearest": "nearest"}
_METHODS = (*_JAX_METHOD, "bicubic_cv2")
_CV2_A = -0.75  # OpenCV's (and PyTorch's) bicubic parameter


# --- resize --------------------------------------------------------------------------------------


def cubic_cv2_weights(src: int, dst: int) -> np.ndarray:
    """The ``(dst, src)`` matrix of OpenCV's INTER_CUBIC along one axis (float32).

    Output pixel ``i`` samples the input at ``x = (i + 0.5) * src / dst - 0.5`` (half-pixel
    centres, no antialiasing); with ``x0 = floor(x)`` and ``t = x - x0`` it takes the four
    inputs ``x0 - 1 .. x0 + 2``, clamped to ``[0, src - 1]`` (edge replication), weighted by
    Keys' cubic with ``a = -0.75``::

        w0 = ((a (t+1) - 5a)(t+1) + 8a)(t+1) - 4a      w1 = ((a+2) t - (a+3)) t^2 + 1
        w2 = ((a+2)(1-t) - (a+3))(1-t)^2 + 1          w3 = 1 - w0 - w1 - w2

    in float32, as ``cv::interpolateCubic`` computes them (``t`` from the float32 ``x``).
    Taps that clamp onto the same input add up. Rows sum to 1.

    >>> cubic_cv2_weights(2, 1).tolist()  # x = 0.5: the two middle taps, both clamped
    [[0.5, 0.5]]

    References: OpenCV ``imgproc/src/resize.cpp`` (``interpolateCubic``, ``resize`` with
    INTER_CUBIC); PyTorch ``upsample_bicubic2d`` (``align_corners=False``) computes the same.
    """
    x = ((np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5).astype(np.float32)
    x0 = np.floor(x)
    t = (x - x0).astype(np.float32)
    a, one = np.float32(_CV2_A), np.float32(1.0)
    w0 = ((a * (t + one) - 5 * a) * (t + one) + 8 * a) * (t + one) - 4 * a
    w1 = ((a + 2) * t - (a + 3)) * t * t + one
    w2 = ((a + 2) * (one - t) - (a + 3)) * (one - t) * (one - t) + one
    w3 = one - w0 - w1 - w2
    taps = np.clip(x0.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :], 0, src - 1)
    weights = np.zeros((dst, src), np.float32)
    rows = np.repeat(np.arange(dst), 4)
    np.add.at(weights, (rows, taps.reshape(-1)), np.stack([w0, w1, w2, w3], 1).reshape(-1))
    return weights


def _resize_cubic_cv2(m: Array, size: tuple[int, int]) -> Array:
    """``m`` resized as two matrix products: every row with ``W_x``, then every column with
    ``W_y`` (OpenCV's horizontal-then-vertical passes), at full float32 precision."""
    h, w = m.shape[-2:]
    wy = jnp.asarray(cubic_cv2_weights(h, size[0]), m.dtype)
    wx = jnp.asarray(cubic_cv2_weights(w, size[1]), m.dtype)
    highest = jax.lax.Precision.HIGHEST
    rows = jnp.matmul(m, wx.T, precision=highest)  # (..., h, w')
    return jnp.matmul(wy, rows, precision=highest)  # (..., h', w')


def resize(
    m: Float[Array, "... h w"], size: tuple[int, int], method: Resize = "bilinear"
) -> Float[Array, "... size_h size_w"]:
    """Resize the last two axes to ``size = (h', w')``.

    Pixel centres are at half-integers (OpenCV ``cv2.resize``, PyTorch ``align_corners=False``)
    and there is no antialiasing, so bilinear up- and downsampling equal OpenCV's INTER_LINEAR
    and PyTorch's ``F.interpolate(mode="bilinear")``. A map already at ``size`` is returned
    as is.

    Methods:

    * ``"bilinear"``: ``jax.image.resize``'s linear (the SeeDiff paper's Eq. 8).
    * ``"bicubic_cv2"``: OpenCV's INTER_CUBIC, Keys' cubic with a = -0.75 and edge-clamped
      taps (``cubic_cv2_weights``), as two small interpolation matrices. It equals
      ``cv2.resize(m, (w', h'), interpolation=cv2.INTER_CUBIC)`` on float32 maps to ~4e-7
      (rounding order only), and PyTorch's ``F.interpolate(mode="bicubic",
      align_corners=False)``, which computes the same kernel: the kernel of SeeDiff's,
      DiffuMask's and Dataset Diffusion's code.
    * ``"bicubic"``: ``jax.image.resize``'s cubic, Keys' a = -0.5 with a renormalised border.
      It differs from the references' bicubic by up to ~7e-2 on a map in [0, 1].
    * ``"nearest"``: PyTorch's ``"nearest-exact"`` (source pixel ``floor((i + 0.5) * scale)``),
      not PyTorch's ``"nearest"`` or OpenCV's INTER_NEAREST (``floor(i * scale)``).

    Args:
      m: ``(..., h, w)`` float maps; leading axes are kept.
      size: ``(h', w')``, positive ints (static).
      method: one of the above (static).

    Returns:
      ``(..., h', w')`` maps.

    >>> resize(jnp.array([[0.0, 1.0]]), (1, 4)).tolist()
    [[0.0, 0.25, 0.75, 1.0]]

    References: BAIKLAB-Admin/SeeDiff ``seediff_app.py: aggregate_attention``
    (``cv2.resize(INTER_CUBIC)``); weijiawu/DiffuMask
    ``Stable_Diffusion/parallel_generate_VOC_Attention_AnyClass.py: save_cross_attention``
    (``cv2.resize``); VinAIResearch/Dataset-Diffusion ``gen_data.py``
    (``F.interpolate(mode="bicubic")``).
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {sorted(_METHODS)}, got {method!r}")
    if (
        len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in size)
        or min(size) < 1
    ):
        raise ValueError(f"size must be two positive ints (h, w), got {size!r}")
    if m.ndim < 2:
        raise ValueError(f"resize needs shape (..., h, w), got {m.shape}")
    size = (int(size[0]), int(size[1]))
    if tuple(m.shape[-2:]) == size:
        return m
    if method == "bicubic_cv2":
        return _resize_cubic_cv2(m, size)
    return jax.image.resize(m, m.shape[:-2] + size, _JAX_METHOD[method], antialias=False)


# --- PAMR ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PAMRConfig:
    """PAMR settings (Araslanov & Roth, CVPR 2020); static under ``jit``.

    Attributes:
      dilations: neighbourhood dilations ``d``; each contributes the 8 neighbours at offset
        ``d`` (``P = 8 * len(dilations)`` neighbours in all).
      num_iter: propagation iterations.
      sigma_scale: ``s`` in the affinity ``-|x_i - x_j| / (1e-8 + s * std_i)``.

    .. warning::
       The reference uses ``s = 0.1`` (``PAMR_DEFAULT``); SeeDiff's copy (``src/pamr.py``)
       hard-codes 0.2 and runs dilation 1 for thousands of iterations (``PAMR_SEEDIFF``).
    """

    dilations: Sequence[int] = (1, 2, 4, 8, 12, 24)  # stored as a tuple
    num_iter: int = 10
    sigma_scale: float = 0.1

    def __post_init__(self):
        dilations = tuple(self.dilations)
        if not dilations or not all(isinstance(d, int) and d >= 1 for d in dilations):
            raise ValueError(
                f"dilations must be positive ints, a non-empty tuple, got {self.dilations!r}"
            )
        object.__setattr__(self, "dilations", dilations)  # a list would not hash under jit
        if not isinstance(self.num_iter, int) or self.num_iter < 0:
            raise ValueError(f"num_iter must be an int >= 0, got {self.num_iter!r}")
        if not self.sigma_scale > 0:
            raise ValueError(f"sigma_scale must be > 0, got {self.sigma_scale!r}")


#: the reference's training settings (1-stage-wseg ``core/config.py``: PAMR_KERNEL, PAMR_ITER)
PAMR_DEFAULT = PAMRConfig()
#: SeeDiff demo's regime (``src/pamr.py`` with 0.2 sigma; dilation 1; 5000 iterations)
PAMR_SEEDIFF = PAMRConfig(dilations=(1,), num_iter=5000, sigma_scale=0.2)

# the reference's 8 shift kernels, in its order (row, column offsets in units of d)
_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _shifts(x: Float[Array, "c h w"], dilations: tuple[int, ...]) -> list[Float[Array, "c h w"]]:
    """``x`` at the 8 offsets of every dilation, replicate padding (the reference's shift
    kernels on ``F.pad(x, [d] * 4, mode="replicate")``): ``P = 8 * len(dilations)`` arrays."""
    h, w = x.shape[-2:]
    pad = max(dilations)
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    return [
        xp[:, pad + dy * d : pad + dy * d + h, pad + dx * d : pad + dx * d + w]
        for d in dilations
        for dy, dx in _OFFSETS
    ]


# Sums over the P neighbours are written as chains of adds, not ``jnp.sum(stack(...) * w, 0)``: XLA
# fuses the chain into one pass without materialising P copies (25x faster on the CPU), and
# jaxlib 0.10.2's CPU reduce fusion miscomputes that stack-multiply-reduce pattern on images
# of 160 px and more with several channels (jax-ml/jax#39103;
# ``--xla_cpu_experimental_ynn_fusion_type=``).


def pamr_affinity(
    image: Float[Array, "h w 3"], cfg: PAMRConfig = PAMR_DEFAULT
) -> Float[Array, "p h w"]:
    """PAMR's kernel: softmax weights over the ``P = 8 * len(dilations)`` neighbours.

    For pixel ``i``, neighbour ``p`` and colour channel ``ch`` (Araslanov & Roth Eq. 5)::

        a_ip = mean_ch( -|x_i,ch - x_{i+p},ch| / (1e-8 + s * std_i,ch) ),   w_ip = softmax_p(a_ip)

    where ``std_i,ch`` is the unbiased std of the ``9 * D`` samples of the neighbourhood
    (the 3x3 at every dilation, centre included once per dilation; ``LocalStDev``) and
    replicate padding gives border pixels their edge's values.

    Args:
      image: ``(h, w, 3)`` image; RGB in [0, 1] as in the reference (the affinity is unchanged
        by scaling the image, up to the 1e-8).
      cfg: dilations and ``s = cfg.sigma_scale`` (static).

    Returns:
      ``(p, h, w)`` weights, non-negative, summing to 1 over ``p``.

    Example: on a flat image every std is 0, every ``a`` is 0, and every weight is
    ``1 / P``: ``pamr_affinity(jnp.zeros((2, 2, 3)), PAMRConfig(dilations=(1,)))`` is 1/8
    everywhere.

    References: ``visinf/1-stage-wseg`` ``models/mods/pamr.py``: ``LocalAffinityAbs``,
    ``LocalStDev``, ``PAMR.forward``.
    """
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must have shape (h, w, 3), got {image.shape}")
    x = jnp.moveaxis(image.astype(jnp.float32), -1, 0)  # (3, h, w)
    neighbours = _shifts(x, cfg.dilations)
    samples = neighbours + [x] * len(cfg.dilations)  # 9 * D per pixel and channel
    mean = _add(samples) / len(samples)
    var = _add([(s - mean) ** 2 for s in samples]) / (len(samples) - 1)
    scale = 1e-8 + cfg.sigma_scale * jnp.sqrt(var)  # (3, h, w)
    aff = jnp.stack([-_add(list(jnp.abs(x - n) / scale)) / 3 for n in neighbours])  # mean over ch
    return jax.nn.softmax(aff, axis=0)


def _add(terms: list[Array]) -> Array:
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def pamr_propagate(
    weights: Float[Array, "p h w"],
    masks: Float[Array, "c h w"],
    dilations: tuple[int, ...],
    num_iter: int,
) -> Float[Array, "c h w"]:
    """``num_iter`` times ``m_i <- sum_p w_ip * m_{i+p}`` (``lax.fori_loop``).

    ``weights`` come from ``pamr_affinity`` with the same ``dilations`` (static).
    """
    if masks.ndim != 3 or weights.shape != (8 * len(dilations),) + masks.shape[1:]:
        raise ValueError(
            f"weights must have shape ({8 * len(dilations)}, h, w) for {len(dilations)} dilations "
            f"and masks (c, h, w) with the same h, w; got {weights.shape} and {masks.shape}"
        )

    def step(_, m):
        return _add([weights[p] * n for p, n in enumerate(_shifts(m, dilations))])

    return jax.lax.fori_loop(0, num_iter, step, masks.astype(jnp.float32))


def pamr(
    image: Float[Array, "h w 3"], masks: Float[Array, "c h w"], cfg: PAMRConfig = PAMR_DEFAULT
) -> Float[Array, "c h w"]:
    """Pixel-adaptive mask refinement: ``pamr_affinity`` once, then ``pamr_propagate``.

    Each iteration replaces every mask value by a convex combination of its ``P`` neighbours'
    values, weighted by colour similarity; so a constant mask stays constant, every output lies
    within its neighbourhood's range, and masks that sum to 1 over ``c`` still do.

    .. warning::
       The reference first resizes ``masks`` to the image (bilinear, ``align_corners=True``);
       here they must already match (SeeDiff's copy also drops that resize). Resize with
       :func:`resize` first.

    Args:
      image: ``(h, w, 3)`` RGB in [0, 1] at the masks' size.
      masks: ``(c, h, w)`` soft masks, one per class (background included, as the reference's
        softmax scores are).
      cfg: a ``PAMRConfig``, e.g. ``PAMR_DEFAULT`` or ``PAMR_SEEDIFF`` (static).

    Returns:
      ``(c, h, w)`` refined soft masks, float32.

    Example (flat image, dilation 1, one iteration: each value becomes the mean of its 8
    neighbours, borders replicated)::

        >>> m = jnp.array([[[1.0, 0.0], [0.0, 0.0]]])
        >>> pamr(jnp.zeros((2, 2, 3)), m, PAMRConfig(dilations=(1,), num_iter=1)).tolist()
        [[[0.375, 0.25], [0.25, 0.125]]]

    References: N. Araslanov and S. Roth, "Single-Stage Semantic Segmentation from Image
    Labels", CVPR 2020, Sec. 3.3; ``visinf/1-stage-wseg`` ``models/mods/pamr.py``
    (``PAMR``); BAIKLAB-Admin/SeeDiff ``src/pamr.py``.
    """
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must have shape (h, w, 3), got {image.shape}")
    h, w = image.shape[:2]
    if masks.ndim != 3 or masks.shape[1:] != (h, w):
        raise ValueError(
            f"masks must have shape (c, {h}, {w}) to match the image, got {masks.shape}"
        )
    return pamr_propagate(pamr_affinity(image, cfg), masks, cfg.dilations, cfg.num_iter)
