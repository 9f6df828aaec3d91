"""Soft masks to label maps (0 background, 1..k classes, 255 ignore) and the VOC palette."""

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, UInt8

IGNORE = 255

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)


def _voc_palette() -> np.ndarray:
    """The PASCAL VOC colour map: the bits of each label spread over R, G, B (VOC devkit)."""
    palette = np.zeros((256, 3), np.uint8)
    for label in range(256):
        c, r, g, b = label, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[label] = (r, g, b)
    return palette


#: (256, 3) uint8; 0 black, 1 (128, 0, 0), ..., 255 (224, 224, 192)
VOC_PALETTE = _voc_palette()


def label_map(
    soft_masks: Float[Array, "k h w"], fg_threshold: float, ignore_threshold: float | None = None
) -> UInt8[Array, "h w"]:
    """Per-pixel label from per-class soft masks.

    ``argmax + 1`` where ``max >= fg_threshold``; 255 where ``ignore_threshold <= max <
    fg_threshold``; 0 elsewhere. Dataset Diffusion ``gen_data.py`` (methods.md 4.3 step 4) with
    0.6 / 0.5; SeeDiff Eq. 12 is the special case ``ignore_threshold=None`` with beta.

    >>> label_map(jnp.array([[[0.9, 0.55, 0.1]], [[0.2, 0.3, 0.0]]]), 0.6, 0.5).tolist()
    [[1, 255, 0]]
    """
    if not 0.0 <= fg_threshold <= 1.0:
        raise ValueError(f"fg_threshold must lie in [0, 1], got {fg_threshold}")
    if ignore_threshold is not None and not 0.0 <= ignore_threshold <= fg_threshold:
        raise ValueError(
            f"ignore_threshold must lie in [0, fg_threshold={fg_threshold}], got {ignore_threshold}"
        )
    if soft_masks.ndim != 3:
        raise ValueError(f"soft_masks must have shape (k, h, w), got {soft_masks.shape}")
    if soft_masks.shape[0] == 0:
        return jnp.zeros(soft_masks.shape[1:], jnp.uint8)
    top = jnp.max(soft_masks, axis=0)
    labels = (jnp.argmax(soft_masks, axis=0) + 1).astype(jnp.uint8)
    out = jnp.where(top >= fg_threshold, labels, jnp.uint8(0))
    if ignore_threshold is not None:
        band = (top >= ignore_threshold) & (top < fg_threshold)
        out = jnp.where(band, jnp.uint8(IGNORE), out)
    return out


def colorize(labels: UInt8[Array, "h w"]) -> UInt8[Array, "h w 3"]:
    """RGB image of a label map in the VOC palette."""
    return jnp.asarray(VOC_PALETTE)[labels.astype(jnp.int32)]
