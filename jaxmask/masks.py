"""From captured attention to an image's soft masks and label map: the methods composed with
resizing, optional PAMR and labelling, for ONE example (batch with ``jax.vmap``)."""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, UInt8

from jaxmask.labels import label_map
from jaxmask.maps import AttentionMaps, finite, normalize_minmax
from jaxmask.methods import CAConfig, MethodConfig, SeeDiffConfig
from jaxmask.refine import PAMRConfig, resize
from jaxmask.refine import pamr as pamr_refine


def extract_masks(
    maps: AttentionMaps,
    token_weights: Float[Array, "k t"],
    image: Float[Array, "h w 3"],
    method: MethodConfig,
    pamr: PAMRConfig | None = None,
) -> tuple[Float[Array, "k h w"], UInt8[Array, "h w"]]:
    """Soft masks at image size and the label map of one generated image.

    Steps: ``method.apply`` -> upsample to ``(h, w)`` with the method's kernel -> SeeDiff:
    per-class min-max (code step 7) -> ``label_map`` with the method's thresholds (SeeDiff
    Eq. 12's beta; Dataset Diffusion's 0.6/0.5 band) on these maps, as the references
    threshold them (a bicubic overshoot above 1 still wins Dataset Diffusion's argmax). The
    returned soft masks are clipped to [0, 1]. With PAMR, the clipped masks are refined on
    ``[background, classes]`` with ``background = 1 - max_c`` (PAMR refines soft class scores
    with background: visinf/1-stage-wseg ``models/mods/pamr.py: PAMR.forward``) and the refined
    masks are labelled.

    Args:
      maps: one image's maps, captured with ``method.capture_spec``.
      token_weights: ``(k, t)`` from ``class_token_weights`` (a zero row gives an empty mask).
      image: the generated image, float in [0, 1] (only PAMR reads it; its size sets ``h, w``).
      method: a config from ``jaxmask.methods.get``; static under jit.
      pamr: a PAMR config, or None for no refinement; static under jit.

    Returns:
      ``soft_masks (k, h, w)`` float32 in [0, 1] and ``label_map (h, w)`` uint8 with 0
      background, 1..k classes, 255 ignore.

    Example (batch)::

        f = jax.jit(jax.vmap(extract_masks, in_axes=(0, 0, 0, None, None)), static_argnums=(3, 4))
    """
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must have shape (h, w, 3), got {image.shape}")
    h, w = image.shape[:2]
    if isinstance(method, CAConfig):  # DiffuMask normalises each side's map at the image
        soft = method.apply(maps, token_weights, (h, w))
    else:
        soft = method.apply(maps, token_weights)
    soft = resize(soft, (h, w), method.upsample)
    if isinstance(method, SeeDiffConfig):
        soft = jax.vmap(normalize_minmax)(soft)
    scores = soft  # the references label the unclipped maps (bicubic overshoot included)
    soft = jnp.clip(soft, 0.0, 1.0)
    if pamr is not None and soft.shape[0] > 0:
        background = 1.0 - jnp.max(soft, axis=0, keepdims=True)
        refined = pamr_refine(image, jnp.concatenate([background, soft]), pamr)
        soft = scores = jnp.clip(refined[1:], 0.0, 1.0)
    return soft, label_map(scores, method.fg_threshold, method.ignore_threshold)


def mask_confidence(
    soft_masks: Float[Array, "k h w"], labels: UInt8[Array, "h w"]
) -> Float[Array, " k"]:
    """How sure each class's mask is: the mean soft score over the pixels labelled with it.

    A clean object sits near 1 inside its mask; a mask that only just passes the threshold
    (noise the method labelled anyway) sits near it. Class ``c`` (0-based) is label ``c + 1``; a
    class with no pixels scores 0. DiffuMask (Wu et al., ICCV 2023) drops noisy masks before
    training; this is the drop rule ``jaxmask generate --min-confidence`` applies.

    >>> soft = jnp.array([[[0.9, 0.7], [0.2, 0.0]]])
    >>> round(float(mask_confidence(soft, jnp.array([[1, 1], [0, 0]], jnp.uint8))[0]), 3)
    0.8
    """
    classes = jnp.arange(1, soft_masks.shape[0] + 1, dtype=labels.dtype)
    inside = labels[None] == classes[:, None, None]
    total = jnp.sum(jnp.where(inside, soft_masks, 0.0), axis=(1, 2))
    return total / jnp.maximum(jnp.sum(inside, axis=(1, 2), dtype=jnp.float32), 1.0)


def check_maps(maps: AttentionMaps) -> AttentionMaps:
    """Host-side guard for the shell: raise if any captured value is NaN or Inf.

    Masks of non-finite maps would be garbage; the sampler's output is checked before
    extraction (a jitted function cannot raise on values).
    """
    if not bool(np.asarray(finite(maps))):
        raise ValueError(
            "attention maps contain NaN or Inf: the sampling run diverged (try float32 instead of "
            "bfloat16, or a lower guidance scale)"
        )
    return maps
