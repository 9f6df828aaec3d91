"""Confusion matrix, IoU and mIoU: hand values, a numpy bincount reference (the detectron2
recipe of ecosystem.md 8), ignore handling, accumulation, jit and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxmask.metrics import confusion_matrix, iou, mean_iou


def _bincount_reference(label: np.ndarray, pred: np.ndarray, k: int, ignore: int = 255):
    """detectron2 SemSegEvaluator: gt == ignore -> k; bincount((k+1) * pred + gt); drop the
    ignore row and column; transpose to rows = ground truth."""
    gt = label.astype(np.int64).copy()
    gt[gt == ignore] = k
    conf = np.bincount((k + 1) * pred.reshape(-1) + gt.reshape(-1), minlength=(k + 1) ** 2)
    return conf.reshape(k + 1, k + 1)[:k, :k].T


def _random_pair(rng: np.random.Generator, k: int, shape, p_ignore: float = 0.1):
    label = rng.integers(0, k, shape)
    label[rng.random(shape) < p_ignore] = 255
    pred = np.where(rng.random(shape) < 0.6, label, rng.integers(0, k, shape))
    pred = np.where(pred == 255, rng.integers(0, k, shape), pred)
    return label.astype(np.uint8), pred.astype(np.int32)


# --- confusion matrix ----------------------------------------------------------------------------


def test_confusion_matrix_hand_values():
    label = jnp.array([[0, 0, 1, 1], [2, 2, 255, 1]], jnp.uint8)
    pred = jnp.array([[0, 1, 1, 1], [2, 0, 2, 2]], jnp.int32)
    # gt 0: pred 0, 1; gt 1: pred 1, 1, 2; gt 2: pred 2, 0; the 255 pixel is dropped
    want = [[1, 1, 0], [0, 2, 1], [1, 0, 1]]
    conf = confusion_matrix(label, pred, 3)
    assert conf.dtype == jnp.int32
    np.testing.assert_array_equal(conf, want)


def test_out_of_range_pixels_are_dropped():
    label = jnp.array([[0, 1, 7, 1]])
    pred = jnp.array([[0, 255, 1, -1]])
    # gt 7 is outside 2 classes; preds 255 and -1 are not classes: only (0, 0) counts
    np.testing.assert_array_equal(confusion_matrix(label, pred, 2), [[1, 0], [0, 0]])


def test_ignore_index_is_configurable():
    label = jnp.array([[0, 1, 2, 2]])
    pred = jnp.array([[0, 1, 1, 2]])
    # ignore_index 2 drops the two gt-2 pixels; a class id can be ignored this way
    np.testing.assert_array_equal(
        confusion_matrix(label, pred, 3, ignore_index=2), [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    )


@pytest.mark.parametrize("k,shape", [(2, (3, 3)), (5, (8, 7)), (21, (64, 48))])
def test_confusion_matrix_equals_bincount_reference(k, shape):
    rng = np.random.default_rng(k)
    for _ in range(5):
        label, pred = _random_pair(rng, k, shape)
        conf = confusion_matrix(jnp.asarray(label), jnp.asarray(pred), k)
        assert conf.shape == (k, k)
        np.testing.assert_array_equal(conf, _bincount_reference(label, pred, k))
        assert int(conf.sum()) == int(np.sum(label != 255))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1), k=st.integers(1, 6), p_ignore=st.sampled_from([0.0, 0.3, 1.0])
)
def test_property_equals_bincount_reference(seed, k, p_ignore):
    label, pred = _random_pair(np.random.default_rng(seed), k, (6, 5), p_ignore)
    np.testing.assert_array_equal(
        confusion_matrix(jnp.asarray(label), jnp.asarray(pred), k),
        _bincount_reference(label, pred, k),
    )


def test_accumulation_over_a_batch_equals_one_big_matrix():
    rng = np.random.default_rng(0)
    pairs = [_random_pair(rng, 4, (9, 11)) for _ in range(6)]
    labels = jnp.asarray(np.stack([p[0] for p in pairs]))
    preds = jnp.asarray(np.stack([p[1] for p in pairs]))
    batched = jax.jit(jax.vmap(lambda g, p: confusion_matrix(g, p, 4)))(labels, preds)
    loop = np.stack([confusion_matrix(g, p, 4) for g, p in zip(labels, preds, strict=True)])
    np.testing.assert_array_equal(batched, loop)
    # one matrix over all pixels of the dataset = the sum of the per-image matrices
    big = confusion_matrix(labels.reshape(-1, 11), preds.reshape(-1, 11), 4)
    np.testing.assert_array_equal(batched.sum(0), big)


@pytest.mark.unchecked("asserts the core's own error message")
def test_confusion_matrix_errors():
    with pytest.raises(
        ValueError,
        match=r"label and pred must have the same shape \(h, w\), got \(2, 3\) and \(3, 2\)",
    ):
        confusion_matrix(jnp.zeros((2, 3), jnp.int32), jnp.zeros((3, 2), jnp.int32), 2)
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        confusion_matrix(jnp.zeros((2, 2), jnp.int32), jnp.zeros((2, 2), jnp.int32), 0)
    with pytest.raises(ValueError, match="pred must hold integer class ids, got dtype float32"):
        confusion_matrix(jnp.zeros((2, 2), jnp.int32), jnp.zeros((2, 2)), 2)


def test_confusion_matrix_jit_does_not_recompile():
    f = jax.jit(lambda g, p: confusion_matrix(g, p, 3))  # a fresh function: its own cache
    label, pred = _random_pair(np.random.default_rng(1), 3, (5, 5))
    np.testing.assert_array_equal(
        f(label, pred), confusion_matrix(jnp.asarray(label), jnp.asarray(pred), 3)
    )
    f(label[::-1], pred)
    assert f._cache_size() == 1


# --- IoU, mIoU -----------------------------------------------------------------------------------


def test_iou_hand_values():
    conf = jnp.array([[1, 1, 0], [0, 2, 1], [1, 0, 1]])
    # class 0: TP 1, GT 2, Pred 2 -> 1/3; class 1: 2 / (3 + 3 - 2) = 1/2; class 2: 1 / (2 + 2 - 1)
    values, present = iou(conf)
    np.testing.assert_allclose(values, [1 / 3, 1 / 2, 1 / 3], rtol=1e-6)
    assert present.tolist() == [True, True, True]
    np.testing.assert_allclose(mean_iou(conf), (1 / 3 + 1 / 2 + 1 / 3) / 3, rtol=1e-6)


def test_absent_classes_are_excluded_and_never_nan():
    # class 1 never appears (union 0): excluded; class 2 is predicted but not in the ground
    # truth: IoU 0, counted (mmseg's nanmean convention)
    conf = jnp.array([[4, 0, 1], [0, 0, 0], [0, 0, 0]])
    values, present = iou(conf)
    np.testing.assert_allclose(values, [0.8, 0.0, 0.0], rtol=1e-6)
    assert present.tolist() == [True, False, True]
    np.testing.assert_allclose(mean_iou(conf), 0.4, rtol=1e-6)
    empty = jnp.zeros((3, 3), jnp.int32)
    assert not np.any(np.isnan(np.asarray(iou(empty)[0])))
    assert float(mean_iou(empty)) == 0.0


def test_perfect_and_all_wrong_predictions():
    label = jnp.asarray(np.random.default_rng(3).integers(0, 4, (8, 8)), jnp.int32)
    assert float(mean_iou(confusion_matrix(label, label, 4))) == 1.0
    assert float(mean_iou(confusion_matrix(label, (label + 1) % 4, 4))) == 0.0


def test_mean_iou_equals_numpy_formula_on_random_matrices():
    rng = np.random.default_rng(4)
    for _ in range(10):
        conf = rng.integers(0, 50, (6, 6))
        conf[rng.integers(0, 6)] = 0
        conf[:, rng.integers(0, 6)] = 0  # sometimes a class absent from both
        tp = np.diag(conf)
        union = conf.sum(0) + conf.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            want = np.nanmean(tp / union)  # mmseg: NaN for union 0, nanmean
        np.testing.assert_allclose(mean_iou(jnp.asarray(conf, jnp.int32)), want, rtol=1e-6)


@pytest.mark.unchecked("asserts the core's own error message")
def test_iou_errors_jit_and_vmap():
    with pytest.raises(ValueError, match=r"conf must have shape \(k, k\), got \(2, 3\)"):
        iou(jnp.zeros((2, 3), jnp.int32))
    confs = jnp.asarray(np.random.default_rng(5).integers(0, 9, (4, 3, 3)), jnp.int32)
    np.testing.assert_allclose(jax.jit(mean_iou)(confs[0]), mean_iou(confs[0]), rtol=1e-6)
    np.testing.assert_allclose(
        jax.vmap(mean_iou)(confs), [float(mean_iou(c)) for c in confs], rtol=1e-6
    )
