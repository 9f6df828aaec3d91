"""Confusion matrix, per-class IoU and mIoU with an ignore index.

The convention of detectron2's ``SemSegEvaluator`` and mmseg's ``IoUMetric``:
one confusion matrix accumulated over every pixel of the dataset (sum the per-image matrices),
then IoU per class and the mean over classes; not a mean of per-image mIoUs.
"""

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, Integer, Real


def confusion_matrix(
    label: Integer[Array, "h w"],
    pred: Integer[Array, "h w"],
    num_classes: int,
    ignore_index: int = 255,
) -> Int[Array, "num_classes num_classes"]:
    """``conf[g, p]`` = the number of pixels with ground truth ``g`` predicted ``p``.

    Pixels whose ground truth is ``ignore_index`` are dropped (VOC's 255 boundaries). So are
    pixels whose ground truth or prediction lies outside ``[0, num_classes)``: a generated
    label map's 255 (ignore band) is not scored. To count those pixels as misses instead,
    map them to a class first, e.g. ``jnp.where(pred == 255, 0, pred)`` (background).

    Accumulate over a dataset by summing: ``jax.vmap(f)(labels, preds).sum(0)`` for a batch,
    then a running sum across batches (int32 holds 2**31 - 1 pixels per cell; sum on the host
    in int64 for larger datasets).

    Args:
      label: ``(h, w)`` ground truth, any integer dtype.
      pred: ``(h, w)`` prediction, any integer dtype.
      num_classes: ``k`` (static); VOC: 21 with background.
      ignore_index: ground-truth value to drop (static).

    Returns:
      ``(k, k)`` int32, rows ground truth, columns prediction.

    >>> confusion_matrix(jnp.array([[0, 1, 1, 255]]), jnp.array([[0, 0, 1, 1]]), 2).tolist()
    [[1, 0], [1, 1]]
    """
    if label.shape != pred.shape:
        raise ValueError(
            f"label and pred must have the same shape (h, w), got {label.shape} and {pred.shape}"
        )
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1 (static), got {num_classes!r}")
    for name, x in (("label", label), ("pred", pred)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must hold integer class ids, got dtype {x.dtype}")
    g = label.reshape(-1).astype(jnp.int32)
    p = pred.reshape(-1).astype(jnp.int32)
    valid = (g != ignore_index) & (g >= 0) & (g < num_classes) & (p >= 0) & (p < num_classes)
    cell = jnp.where(valid, g * num_classes + p, 0)
    counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[cell].add(valid.astype(jnp.int32))
    return counts.reshape(num_classes, num_classes)


def iou(conf: Real[Array, "k k"]) -> tuple[Float[Array, " k"], Bool[Array, " k"]]:
    """Per-class intersection over union, and which classes are present.

    ``IoU_c = TP_c / (GT_c + Pred_c - TP_c)`` with ``TP_c = conf[c, c]``, ``GT_c`` the row sum
    and ``Pred_c`` the column sum. ``conf`` holds counts, as ints or as floats (float32 counts
    exactly to 2**24 and past int32's range, for a dataset's worth of pixels). A class is
    present when its union is > 0; absent classes get IoU 0 (never NaN) and ``present = False``.

    >>> values, present = iou(jnp.array([[3, 1], [0, 0]]))
    >>> values.tolist(), present.tolist()
    ([0.75, 0.0], [True, True])
    """
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"conf must have shape (k, k), got {conf.shape}")
    tp = jnp.diagonal(conf).astype(jnp.float32)
    gt = jnp.sum(conf, axis=1).astype(jnp.float32)
    predicted = jnp.sum(conf, axis=0).astype(jnp.float32)
    union = gt + predicted - tp
    present = union > 0
    return jnp.where(present, tp / jnp.maximum(union, 1.0), 0.0), present


def mean_iou(conf: Real[Array, "k k"]) -> Float[Array, ""]:
    """Mean of ``iou`` over the present classes (union > 0); 0 when none is present.

    .. warning::
       mmseg (``nanmean`` over classes with union > 0) and detectron2 (classes with ground
       truth > 0) differ on a class that is predicted but absent from the ground truth: here,
       as in mmseg, it counts with IoU 0. On a whole evaluation set (VOC val has every class)
       the two agree.

    >>> float(mean_iou(jnp.array([[3, 1, 0], [0, 0, 0], [0, 0, 0]])))  # (0.75 + 0) / 2
    0.375
    """
    values, present = iou(conf)
    count = jnp.sum(present.astype(jnp.float32))
    return jnp.sum(values) / jnp.maximum(count, 1.0)
