"""Confusion matrix, per-class IoU and mIoU with an ignore index (detectron2/mmseg convention:
one matrix accumulated over every pixel of the dataset, not per-image means)."""

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


def confusion_matrix(
    label: Int[Array, "h w"], pred: Int[Array, "h w"], num_classes: int, ignore_index: int = 255
) -> Int[Array, "c c"]:
    """``conf[g, p]`` = pixels of ground truth ``g`` predicted ``p``; pixels whose ground truth
    is ``ignore_index`` are dropped. Sum the matrices of a dataset to accumulate.

    >>> confusion_matrix(jnp.array([[0, 1, 255]]), jnp.array([[0, 0, 1]]), 2).tolist()
    [[1, 0], [1, 0]]
    """
    if label.shape != pred.shape:
        raise ValueError(f"label and pred must have the same shape, got {label.shape} and {pred.shape}")
    g = label.reshape(-1).astype(jnp.int32)
    p = pred.reshape(-1).astype(jnp.int32)
    valid = (g != ignore_index) & (g >= 0) & (g < num_classes) & (p >= 0) & (p < num_classes)
    flat = jnp.where(valid, g * num_classes + p, 0)
    counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[flat].add(valid.astype(jnp.int32))
    return counts.reshape(num_classes, num_classes)


def iou(conf: Int[Array, "c c"]) -> tuple[Float[Array, " c"], Bool[Array, " c"]]:
    """Per-class ``TP / (GT + Pred - TP)`` and which classes are present (union > 0); absent
    classes get IoU 0 and ``present=False`` (never NaN)."""
    tp = jnp.diag(conf).astype(jnp.float32)
    union = jnp.sum(conf, 0).astype(jnp.float32) + jnp.sum(conf, 1).astype(jnp.float32) - tp
    present = union > 0
    return jnp.where(present, tp / jnp.maximum(union, 1.0), 0.0), present


def mean_iou(conf: Int[Array, "c c"]) -> Float[Array, ""]:
    """Mean IoU over the classes present (union > 0)."""
    values, present = iou(conf)
    return jnp.sum(values) / jnp.maximum(jnp.sum(present.astype(jnp.float32)), 1.0)
