"""Otsu, resize, PAMR, label maps and metrics: references, hand values, invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.exposure import histogram
from skimage.filters import threshold_otsu as sk_otsu

from jaxmask import labels as L
from jaxmask import metrics as M
from jaxmask import refine as R
from jaxmask.threshold import threshold_otsu

# --- Otsu ----------------------------------------------------------------------------------

_otsu = jax.jit(threshold_otsu)
_pamr = jax.jit(R.pamr, static_argnums=2)


def _near_tie(x: np.ndarray) -> bool:
    """skimage's two best between-class variances agree to float32 precision."""
    counts, centres = histogram(x.ravel(), 256, source_range="image")
    w0, w1 = np.cumsum(counts), np.cumsum(counts[::-1])[::-1]
    m0 = np.cumsum(counts * centres) / w0
    m1 = (np.cumsum((counts * centres)[::-1]) / w1[::-1])[::-1]
    var = np.sort(w0[:-1] * w1[1:] * (m0[:-1] - m1[1:]) ** 2)
    return var[-1] - var[-2] <= 1e-6 * var[-1]


@pytest.mark.parametrize("seed", range(40))
def test_otsu_equals_skimage(seed):
    rng = np.random.default_rng(seed)
    n = (3, 8, 17, 64)[seed % 4 if seed % 8 < 4 else 3 - seed % 4]  # few shapes: few compiles
    kind = seed % 4
    if kind == 0:
        x = rng.random((n, n))
    elif kind == 1:  # bimodal
        x = np.where(rng.random((n, n)) < 0.3, rng.normal(0.2, 0.05, (n, n)), rng.normal(0.7, 0.1, (n, n)))
    elif kind == 2:  # squared min-max map, as SeeDiff's seeds use
        x = rng.gamma(2.0, size=(n, n))
        x = ((x - x.min()) / np.ptp(x)) ** 2
    else:  # few distinct values
        x = rng.integers(0, 5, (n, n)) / 4.0
    x = x.astype(np.float32)
    got = float(_otsu(jnp.asarray(x)))
    expect = float(sk_otsu(x))
    if _near_tie(x):
        width = (x.max() - x.min()) / 256
        assert abs(got - expect) <= width * 1.001
    else:
        assert got == pytest.approx(expect, rel=1e-6, abs=1e-7)


def test_otsu_constant_input_and_transforms():
    assert float(threshold_otsu(jnp.full((4, 4), 0.3))) == pytest.approx(0.3)
    x = jax.random.uniform(jax.random.key(0), (3, 16, 16))
    batched = jax.jit(jax.vmap(threshold_otsu))(x)
    for i in range(3):
        assert float(batched[i]) == pytest.approx(float(threshold_otsu(x[i])), rel=1e-6)


# --- resize -------------------------------------------------------------------------------


def test_resize_hand_values_and_errors():
    np.testing.assert_allclose(R.resize(jnp.array([[0.0, 1.0]]), (1, 4)), [[0.0, 0.25, 0.75, 1.0]])
    np.testing.assert_array_equal(R.resize(jnp.array([[1.0, 2.0]]), (2, 4), "nearest"), [[1, 1, 2, 2]] * 2)
    x = jax.random.uniform(jax.random.key(1), (2, 5, 5))
    assert R.resize(x, (5, 5), "bicubic") is x
    assert R.resize(x, (10, 15), "bicubic").shape == (2, 10, 15)
    with pytest.raises(ValueError, match="method must be one of"):
        R.resize(x, (4, 4), "lanczos")


def test_resize_matches_torch_bilinear():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).random((3, 7, 9)).astype(np.float32)
    expect = torch.nn.functional.interpolate(
        torch.from_numpy(x)[None], size=(14, 27), mode="bilinear", align_corners=False
    )[0].numpy()
    np.testing.assert_allclose(R.resize(jnp.asarray(x), (14, 27), "bilinear"), expect, atol=1e-5)


# --- PAMR ---------------------------------------------------------------------------------


def _torch_pamr(image, masks, dilations, num_iter, sigma_scale):
    """The reference algorithm (methods.md 6) written directly in PyTorch for parity."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None]  # (1, 3, h, w)
    m = torch.from_numpy(np.asarray(masks))[None]
    h, w = x.shape[-2:]
    offs = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]

    def shifts(t):
        out = []
        for d in dilations:
            p = F.pad(t, (d, d, d, d), mode="replicate")
            for dy, dx in offs:
                out.append(p[..., d + dy * d : d + dy * d + h, d + dx * d : d + dx * d + w])
        return torch.stack(out, 2)  # (1, c, P, h, w)

    nb = shifts(x)
    samples = torch.cat([nb, x[:, :, None].expand(-1, -1, len(dilations), -1, -1)], 2)
    std = samples.std(2, keepdim=True)  # unbiased, over 9*D samples
    aff = -(nb - x[:, :, None]).abs() / (1e-8 + sigma_scale * std)
    k = torch.softmax(aff.mean(1, keepdim=True), 2)
    for _ in range(num_iter):
        m = (shifts(m) * k).sum(2)
    return m[0].numpy()


@pytest.mark.parametrize("dilations,num_iter,sigma", [((1, 2, 4), 3, 0.1), ((1,), 5, 0.2)])
def test_pamr_matches_reference_algorithm(dilations, num_iter, sigma):
    pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    image = rng.random((12, 10, 3)).astype(np.float32)
    masks = rng.random((3, 12, 10)).astype(np.float32)
    cfg = R.PAMRConfig(dilations=dilations, num_iter=num_iter, sigma_scale=sigma)
    got = R.pamr(jnp.asarray(image), jnp.asarray(masks), cfg)
    np.testing.assert_allclose(got, _torch_pamr(image, masks, dilations, num_iter, sigma), atol=1e-5)


def test_pamr_hand_value_one_iteration():
    """2-pixel-wide image: every neighbour of a pixel is itself or the other column."""
    image = jnp.zeros((1, 2, 3)).at[0, 1].set(1.0)  # left black, right white
    masks = jnp.array([[[0.0, 1.0]]])
    cfg = R.PAMRConfig(dilations=(1,), num_iter=1, sigma_scale=0.1)
    # the left pixel's 8 neighbours under replicate padding, in offset order
    # (-1,-1) (-1,0) (-1,1) (0,-1) (0,1) (1,-1) (1,0) (1,1): the right column appears 3 times
    left_nb = np.array([0, 0, 1, 0, 1, 0, 0, 1], np.float64)
    samples = np.append(left_nb, 0.0)
    std = samples.std(ddof=1)
    aff = -np.abs(left_nb - 0.0) / (1e-8 + 0.1 * std)
    k = np.exp(aff - aff.max()) / np.exp(aff - aff.max()).sum()
    expect_left = float(np.sum(k * left_nb))  # mask equals the image here
    got = R.pamr(image, masks, cfg)
    assert float(got[0, 0, 0]) == pytest.approx(expect_left, rel=1e-5)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000))
def test_pamr_invariants(seed):
    key = jax.random.key(seed)
    image = jax.random.uniform(key, (9, 11, 3))
    masks = jax.nn.softmax(jax.random.normal(jax.random.fold_in(key, 1), (3, 9, 11)), axis=0)
    cfg = R.PAMRConfig(dilations=(1, 2), num_iter=4)
    out = _pamr(image, masks, cfg)
    # sums over classes are preserved (convex combinations of neighbours)
    np.testing.assert_allclose(jnp.sum(out, 0), 1.0, atol=1e-5)
    # every output lies within its inputs' range; a constant mask stays constant
    assert float(out.min()) >= float(masks.min()) - 1e-6 and float(out.max()) <= float(masks.max()) + 1e-6
    np.testing.assert_allclose(_pamr(image, jnp.full((1, 9, 11), 0.4), cfg), 0.4, atol=1e-6)


def test_pamr_one_step_is_a_convex_combination_of_the_neighbourhood():
    key = jax.random.key(5)
    image = jax.random.uniform(key, (8, 8, 3))
    mask = jax.random.uniform(jax.random.fold_in(key, 1), (1, 8, 8))
    out = R.pamr(image, mask, R.PAMRConfig(dilations=(1,), num_iter=1))
    padded = np.pad(np.asarray(mask[0]), 1, mode="edge")
    for i in range(8):
        for j in range(8):
            window = padded[i : i + 3, j : j + 3].copy()
            window[1, 1] = np.nan  # the centre is not a neighbour
            assert np.nanmin(window) - 1e-6 <= float(out[0, i, j]) <= np.nanmax(window) + 1e-6


def test_pamr_errors_jit_vmap():
    with pytest.raises(ValueError, match=r"masks must have shape \(c, 4, 4\)"):
        R.pamr(jnp.zeros((4, 4, 3)), jnp.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="dilations must be positive"):
        R.PAMRConfig(dilations=(0,))
    images = jax.random.uniform(jax.random.key(0), (2, 6, 6, 3))
    masks = jax.random.uniform(jax.random.key(1), (2, 2, 6, 6))
    cfg = R.PAMRConfig(dilations=(1, 2), num_iter=2)
    batched = jax.jit(jax.vmap(R.pamr, in_axes=(0, 0, None)), static_argnums=2)(images, masks, cfg)
    for i in range(2):
        np.testing.assert_allclose(batched[i], R.pamr(images[i], masks[i], cfg), atol=1e-6)


# --- labels -------------------------------------------------------------------------------


def test_label_map_hand_values_and_band():
    soft = jnp.array([[[0.9, 0.55, 0.1, 0.3]], [[0.95, 0.3, 0.0, 0.61]]])
    np.testing.assert_array_equal(L.label_map(soft, 0.6, 0.5), [[2, 255, 0, 2]])
    np.testing.assert_array_equal(L.label_map(soft, 0.3), [[2, 1, 0, 2]])
    assert L.label_map(jnp.zeros((0, 2, 3)), 0.5).shape == (2, 3)
    with pytest.raises(ValueError, match=r"fg_threshold must lie in \[0, 1\]"):
        L.label_map(soft, 1.2)
    with pytest.raises(ValueError, match="ignore_threshold must lie in"):
        L.label_map(soft, 0.5, 0.6)


def test_voc_palette_known_colours():
    # PASCAL VOC devkit colours: background, aeroplane, bicycle, bird, person (15), void (255)
    assert L.VOC_PALETTE[0].tolist() == [0, 0, 0]
    assert L.VOC_PALETTE[1].tolist() == [128, 0, 0]
    assert L.VOC_PALETTE[2].tolist() == [0, 128, 0]
    assert L.VOC_PALETTE[3].tolist() == [128, 128, 0]
    assert L.VOC_PALETTE[15].tolist() == [192, 128, 128]
    assert L.VOC_PALETTE[255].tolist() == [224, 224, 192]
    assert len(L.VOC_CLASSES) == 20
    np.testing.assert_array_equal(L.colorize(jnp.array([[0, 1]], jnp.uint8)), [[[0, 0, 0], [128, 0, 0]]])


# --- metrics ------------------------------------------------------------------------------


def test_confusion_and_miou_hand_computed():
    gt = jnp.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = jnp.array([[0, 1, 1, 1], [2, 0, 2, 1]])
    conf = M.confusion_matrix(gt, pred, 3)
    # rows = ground truth: class 0: (0->0, 0->1); class 1: three 1->1; class 2: (2->2, 2->0)
    np.testing.assert_array_equal(conf, [[1, 1, 0], [0, 3, 0], [1, 0, 1]])
    values, present = M.iou(conf)
    np.testing.assert_allclose(values, [1 / 3, 3 / 4, 1 / 2], rtol=1e-6)
    assert float(M.mean_iou(conf)) == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    # a class absent from both gt and pred does not count
    conf4 = M.confusion_matrix(gt, pred, 4)
    assert float(M.mean_iou(conf4)) == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    with pytest.raises(ValueError, match="same shape"):
        M.confusion_matrix(gt, pred[:, :3], 3)


def test_confusion_accumulates_over_a_batch_like_bincount():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, (5, 16, 16))
    gt[:, :2] = 255
    pred = rng.integers(0, 4, (5, 16, 16))
    total = jax.vmap(M.confusion_matrix, in_axes=(0, 0, None))(jnp.asarray(gt), jnp.asarray(pred), 4).sum(0)
    keep = gt != 255
    expect = np.bincount(4 * gt[keep] + pred[keep], minlength=16).reshape(4, 4)
    np.testing.assert_array_equal(total, expect)
