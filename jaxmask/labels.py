"""Soft masks to label maps (0 background, 1..k classes, 255 ignore), and the PASCAL VOC
palette and class names the label maps are written with."""

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Integer, UInt8

#: label of pixels that are neither confidently a class nor background (VOC's "void")
IGNORE = 255

#: the 20 PASCAL VOC object classes, in label order (label ``i + 1`` is ``VOC_CLASSES[i]``)
VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


def _voc_palette() -> np.ndarray:
    """The VOC devkit colour map (``VOCdevkit/VOCcode/VOClabelcolormap.m``): bit ``3j``,
    ``3j + 1``, ``3j + 2`` of a label go to bit ``7 - j`` of R, G, B."""
    labels = np.arange(256)
    palette = np.zeros((256, 3), np.int64)
    for j in range(8):
        for channel in range(3):
            palette[:, channel] |= ((labels >> (3 * j + channel)) & 1) << (7 - j)
    palette = palette.astype(np.uint8)
    palette.flags.writeable = False
    return palette


#: ``(256, 3)`` uint8, read-only: 0 black, 1 (128, 0, 0), 2 (0, 128, 0), ..., 255 (224, 224, 192)
VOC_PALETTE = _voc_palette()


def label_map(
    soft_masks: Float[Array, "k h w"],
    fg_threshold: float,
    ignore_threshold: float | None = None,
) -> UInt8[Array, "h w"]:
    """Per-pixel label from per-class soft masks.

    With ``top = max_k soft_masks`` and ``best = argmax_k soft_masks`` (first on ties)::

        label = best + 1   where top >= fg_threshold
              = 255        where ignore_threshold <= top < fg_threshold
              = 0          elsewhere (background)

    This is Dataset Diffusion's rule (VinAIResearch/Dataset-Diffusion ``gen_data.py``: 0.6, 0.5);
    ``ignore_threshold=None`` gives no ignore band (SeeDiff Eq. 12 with beta, DiffuMask).

    Args:
      soft_masks: ``(k, h, w)`` class scores in [0, 1]; ``k = 0`` gives all background.
      fg_threshold: in [0, 1] (static).
      ignore_threshold: in [0, fg_threshold], or None (static).

    Returns:
      ``(h, w)`` uint8 label map.

    >>> label_map(jnp.array([[[0.9, 0.55, 0.1]], [[0.2, 0.3, 0.0]]]), 0.6, 0.5).tolist()
    [[1, 255, 0]]
    """
    if not isinstance(fg_threshold, (int, float)) or not 0.0 <= fg_threshold <= 1.0:
        raise ValueError(f"fg_threshold must lie in [0, 1], got {fg_threshold!r}")
    if ignore_threshold is not None and (
        not isinstance(ignore_threshold, (int, float))
        or not 0.0 <= ignore_threshold <= fg_threshold
    ):
        raise ValueError(
            f"ignore_threshold must lie in [0, fg_threshold={fg_threshold}], or be None for no "
            f"ignore band; got {ignore_threshold!r}"
        )
    if soft_masks.ndim != 3:
        raise ValueError(f"soft_masks must have shape (k, h, w), got {soft_masks.shape}")
    k = soft_masks.shape[0]
    if k > IGNORE - 1:
        raise ValueError(
            f"at most {IGNORE - 1} classes fit a uint8 label map with 255 ignore, got {k}"
        )
    if k == 0:
        return jnp.zeros(soft_masks.shape[1:], jnp.uint8)
    top = jnp.max(soft_masks, axis=0)
    labels = (jnp.argmax(soft_masks, axis=0) + 1).astype(jnp.uint8)
    out = jnp.where(top >= fg_threshold, labels, jnp.uint8(0))
    if ignore_threshold is not None:
        band = (top >= ignore_threshold) & (top < fg_threshold)
        out = jnp.where(band, jnp.uint8(IGNORE), out)
    return out


def colorize(labels: Integer[Array, "h w"]) -> UInt8[Array, "h w 3"]:
    """RGB picture of a label map in the VOC palette (labels in [0, 255]).

    >>> colorize(jnp.array([[0, 1, 255]], jnp.uint8)).tolist()
    [[[0, 0, 0], [128, 0, 0], [224, 224, 192]]]
    """
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be an integer label map, got dtype {labels.dtype}")
    return jnp.asarray(VOC_PALETTE)[labels.astype(jnp.int32)]
