"""resize and PAMR: hand values, invariants, parity with PyTorch (resize) and with a PyTorch
re-implementation of the reference PAMR (visinf/1-stage-wseg models/mods/pamr.py), jit, vmap."""

import math
from typing import TYPE_CHECKING

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxmask.refine import (
    PAMR_DEFAULT,
    PAMR_SEEDIFF,
    PAMRConfig,
    cubic_cv2_weights,
    pamr,
    pamr_affinity,
    pamr_propagate,
    resize,
)

if TYPE_CHECKING:
    import torch


def _torch():
    """``(torch, torch.nn.functional)`` for the PyTorch parity tests: they skip where torch is not
    installed (the test extra leaves it out on Python 3.12, CI's jax 0.12 leg; no wheel there)."""
    torch = pytest.importorskip("torch")
    return torch, torch.nn.functional


def _torch_resize(m, size, mode: str) -> np.ndarray:
    """PyTorch's ``F.interpolate`` of ``(c, h, w)`` maps (align_corners=False where it applies)."""
    torch, F = _torch()
    corners = {} if mode.startswith("nearest") else {"align_corners": False}
    return F.interpolate(torch.tensor(np.array(m))[None], size=size, mode=mode, **corners)[
        0
    ].numpy()


def _rand(seed: int, shape) -> jax.Array:
    # numpy's generator: jax.random compiles anew for every shape (seconds each on the CPU)
    return jnp.asarray(np.random.default_rng(seed).random(shape, dtype=np.float32))


# One jitted PAMR whose cache the tests share: they reuse a few (shape, config) pairs, since each
# new pair compiles for about a second on the CPU.
_pamr_jit = jax.jit(pamr, static_argnums=2)
ONE_STEP = PAMRConfig(dilations=(1,), num_iter=1)
TWO_DIL = PAMRConfig(dilations=(1, 2), num_iter=3, sigma_scale=0.2)
HW, C = (8, 8), 3


# --- resize --------------------------------------------------------------------------------------


def test_resize_hand_values():
    # half-pixel centres: output x=0.5/4*2-0.5 = -0.25 -> clamped to 0; 0.25; 0.75; 1
    np.testing.assert_allclose(resize(jnp.array([[0.0, 1.0]]), (1, 4)), [[0.0, 0.25, 0.75, 1.0]])
    # downsampling 4 -> 2 without antialiasing: the mean of the two middle-of-pair samples
    np.testing.assert_allclose(resize(jnp.array([[0.0, 1.0, 2.0, 3.0]]), (1, 2)), [[0.5, 2.5]])
    np.testing.assert_array_equal(
        resize(jnp.array([[1.0, 2.0], [3.0, 4.0]]), (4, 4), "nearest"),
        np.kron([[1.0, 2.0], [3.0, 4.0]], np.ones((2, 2))),
    )


@pytest.mark.parametrize("src,dst", [((4, 4), (8, 8)), ((5, 7), (11, 3)), ((16, 16), (4, 4))])
@pytest.mark.parametrize("method", ["bilinear", "bicubic", "bicubic_cv2", "nearest"])
def test_resize_shapes_keep_leading_axes(src, dst, method):
    m = _rand(0, (2, 3) + src)
    out = resize(m, dst, method)
    assert out.shape == (2, 3) + dst and out.dtype == jnp.float32
    np.testing.assert_allclose(out[1, 2], resize(m[1, 2], dst, method), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "src,dst", [((4, 4), (16, 16)), ((8, 8), (64, 64)), ((6, 5), (13, 17)), ((16, 16), (8, 8))]
)
def test_bilinear_equals_torch_interpolate(src, dst):
    m = _rand(1, (3,) + src)
    want = _torch_resize(m, dst, "bilinear")
    np.testing.assert_allclose(resize(m, dst, "bilinear"), want, rtol=1e-5, atol=1e-6)


def test_nearest_equals_torch_nearest_exact():
    m = _rand(2, (1, 5, 7))
    want = _torch_resize(m, (13, 4), "nearest-exact")
    np.testing.assert_array_equal(resize(m, (13, 4), "nearest"), want)


def test_bicubic_is_close_to_but_not_torch_bicubic():
    # the documented difference: Keys a = -0.5 (jax) vs a = -0.75 (PyTorch, OpenCV)
    yy, xx = np.meshgrid(np.linspace(0, 1, 8), np.linspace(0, 1, 8), indexing="ij")
    m = jnp.asarray(np.sin(3 * yy) * np.cos(2 * xx), jnp.float32)[None]
    want = _torch_resize(m, (32, 32), "bicubic")
    diff = np.abs(np.asarray(resize(m, (32, 32), "bicubic")) - want)
    assert 1e-4 < diff.max() < 5e-2


CV2_SIZES = [
    ((16, 16), (32, 32)),
    ((32, 32), (64, 64)),
    ((64, 64), (512, 512)),
    ((16, 16), (512, 512)),
    ((5, 7), (11, 3)),
    ((16, 16), (8, 8)),
    ((3, 9), (40, 2)),
    ((1, 4), (3, 1)),
]


@pytest.mark.parametrize("src,dst", CV2_SIZES)
def test_bicubic_cv2_equals_opencv_inter_cubic(src, dst):
    """SeeDiff's and DiffuMask's ``cv2.resize(..., INTER_CUBIC)`` on float32 maps."""
    for seed in range(3):
        m = np.asarray(_rand(10 + seed, src))
        want = cv2.resize(m, (dst[1], dst[0]), interpolation=cv2.INTER_CUBIC).reshape(dst)
        got = np.asarray(resize(jnp.asarray(m), dst, "bicubic_cv2"))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("src,dst", CV2_SIZES)
def test_bicubic_cv2_equals_torch_bicubic(src, dst):
    """Dataset Diffusion's ``F.interpolate(mode="bicubic")`` (align_corners=False)."""
    m = _rand(20, (2,) + src)
    want = _torch_resize(m, dst, "bicubic")
    np.testing.assert_allclose(resize(m, dst, "bicubic_cv2"), want, rtol=0, atol=1e-6)


def test_cubic_cv2_weights_hand_values():
    """4 -> 8: output i samples x = i / 2 - 1/4. Keys' a = -0.75 at t = 1/4 gives
    (-0.10546875, 0.87890625, 0.26171875, -0.03515625); t = 3/4 the mirror image."""
    w = cubic_cv2_weights(4, 8)
    # output 3: x = 1.25, taps 0..3, t = 0.25
    assert w[3].tolist() == [-0.10546875, 0.87890625, 0.26171875, -0.03515625]
    # output 0: x = -0.25, taps -2, -1, 0, 1 -> clamped to 0, 0, 0, 1, t = 0.75
    np.testing.assert_allclose(w[0], [1.10546875, -0.10546875, 0.0, 0.0], rtol=0, atol=1e-7)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=0, atol=1e-6)
    # the weights are the matrix resize applies along each axis
    m = _rand(22, (4, 4))
    np.testing.assert_allclose(
        resize(m, (8, 8), "bicubic_cv2"), w @ np.asarray(m) @ w.T, rtol=0, atol=1e-6
    )


def test_bicubic_is_far_from_bicubic_cv2():
    """Why SeeDiff's code preset needs the OpenCV kernel: jax's cubic is a = -0.5."""
    m = _rand(21, (16, 16))
    diff = np.abs(np.asarray(resize(m, (32, 32), "bicubic")) - resize(m, (32, 32), "bicubic_cv2"))
    assert diff.max() > 1e-2


def test_resize_same_size_is_identity():
    m = _rand(3, (2, 6, 6))
    assert resize(m, (6, 6), "bicubic") is m


@pytest.mark.unchecked("asserts the core's own error message")
def test_resize_errors():
    with pytest.raises(
        ValueError,
        match=r"method must be one of \['bicubic', 'bicubic_cv2', 'bilinear', 'nearest'\]",
    ):
        resize(jnp.ones((4, 4)), (8, 8), "area")
    with pytest.raises(ValueError, match=r"size must be two positive ints \(h, w\)"):
        resize(jnp.ones((4, 4)), (8, 0))
    with pytest.raises(ValueError, match=r"size must be two positive ints \(h, w\)"):
        resize(jnp.ones((4, 4)), (8,))
    with pytest.raises(ValueError, match=r"needs shape \(\.\.\., h, w\), got \(4,\)"):
        resize(jnp.ones((4,)), (8, 8))


def test_resize_jit_and_vmap():
    m = _rand(4, (3, 2, 5, 5))
    f = jax.jit(resize, static_argnums=(1, 2))
    np.testing.assert_allclose(
        f(m, (9, 7), "bicubic"), resize(m, (9, 7), "bicubic"), rtol=1e-6, atol=1e-6
    )
    batched = jax.vmap(lambda x: resize(x, (9, 7)))(m)
    np.testing.assert_allclose(
        batched, np.stack([resize(x, (9, 7)) for x in m]), rtol=1e-6, atol=1e-6
    )


# --- the reference PAMR, re-implemented in PyTorch from its description --------------------------
# models/mods/pamr.py: fixed 3x3 "shift" kernels applied by a dilated conv to the replicate-padded
# input; |centre - neighbour| for the image, the 9 samples for the std, the 8 neighbours for the
# mask; affinity / (1e-8 + s * std), mean over image channels, softmax over the 8*D neighbours.


def _shift_kernels(with_centre: bool, sign_centre: bool) -> "torch.Tensor":
    torch, _ = _torch()
    taps = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]
    if with_centre:
        taps = taps + [(1, 1)]
    k = torch.zeros(len(taps), 1, 3, 3, dtype=torch.float64)
    for i, (a, b) in enumerate(taps):
        k[i, 0, a, b] = -1.0 if sign_centre else 1.0
        if sign_centre:
            k[i, 0, 1, 1] = 1.0
    return k


def _local(x: "torch.Tensor", kernel: "torch.Tensor", dilations) -> "torch.Tensor":
    torch, F = _torch()
    b, k, h, w = x.shape
    x = x.reshape(b * k, 1, h, w)
    out = [F.conv2d(F.pad(x, [d] * 4, mode="replicate"), kernel, dilation=d) for d in dilations]
    return torch.cat(out, 1).reshape(b, k, -1, h, w)


def torch_pamr(
    image_chw: np.ndarray, masks: np.ndarray, dilations, num_iter, sigma_scale
) -> np.ndarray:
    torch, F = _torch()
    x = torch.from_numpy(image_chw.astype(np.float64))[None]
    m = torch.from_numpy(masks.astype(np.float64))[None]
    x_std = _local(x, _shift_kernels(True, False), dilations).std(2, keepdim=True)
    aff = -torch.abs(_local(x, _shift_kernels(False, True), dilations)) / (
        1e-8 + sigma_scale * x_std
    )
    aff = F.softmax(aff.mean(1, keepdim=True), 2)
    for _ in range(num_iter):
        m = (_local(m, _shift_kernels(False, False), dilations) * aff).sum(2)
    return m[0].numpy()


@pytest.mark.parametrize(
    "hw,c,cfg",
    [
        (HW, C, ONE_STEP),
        (HW, C, TWO_DIL),
        ((16, 16), C, PAMR_DEFAULT),  # dilations 12 and 24 reach past the border
    ],
)
def test_pamr_equals_torch_reference(hw, c, cfg):
    torch, F = _torch()
    image = _rand(10, hw + (3,))
    masks = jax.nn.softmax(4 * _rand(11, (c,) + hw), axis=0)
    want = torch_pamr(
        np.moveaxis(np.asarray(image), -1, 0),
        np.asarray(masks),
        cfg.dilations,
        cfg.num_iter,
        cfg.sigma_scale,
    )
    np.testing.assert_allclose(_pamr_jit(image, masks, cfg), want, rtol=1e-4, atol=1e-5)


def test_pamr_affinity_equals_torch_reference():
    torch, F = _torch()
    image = _rand(12, HW + (3,))
    cfg = TWO_DIL
    x = torch.from_numpy(np.moveaxis(np.asarray(image), -1, 0).astype(np.float64))[None]
    std = _local(x, _shift_kernels(True, False), cfg.dilations).std(2, keepdim=True)
    aff = -torch.abs(_local(x, _shift_kernels(False, True), cfg.dilations)) / (1e-8 + 0.2 * std)
    want = F.softmax(aff.mean(1, keepdim=True), 2)[0, 0].numpy()
    got = jax.jit(pamr_affinity, static_argnums=1)(image, cfg)
    assert got.shape == (16,) + HW
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


# --- PAMR hand values ----------------------------------------------------------------------------


def test_pamr_flat_image_one_iteration_is_neighbour_mean():
    # flat image: std 0, every affinity 0, every weight 1/8; the one 1 at (0, 0) reaches its own
    # clamped neighbours: (0,0) sees itself 3 times (offsets up-left, up, left), (0,1) and (1,0)
    # twice, (1,1) once
    m = jnp.zeros((1, 4, 4)).at[0, 0, 0].set(1.0)
    out = _pamr_jit(jnp.full((4, 4, 3), 0.3), m, ONE_STEP)
    want = np.zeros((4, 4))
    want[:2, :2] = [[3 / 8, 2 / 8], [2 / 8, 1 / 8]]
    np.testing.assert_allclose(out[0], want, rtol=1e-6)


def test_pamr_two_region_image_one_iteration_by_hand():
    # grey image, columns 0-1 black, 2-3 white. Pixel (0, 1): its 8 clamped neighbours are
    # (0,0) [up-left], (0,1) [up], (0,2) [up-right], (0,0) [left], (0,2) [right],
    # (1,0), (1,1), (1,2).
    # The 9 samples (centre included) hold three 1s and six 0s: mean 1/3, unbiased
    # var = (3 (2/3)^2 + 6 (1/3)^2) / 8 = 1/4, std 1/2. Black neighbours: a = 0; white ones:
    # a = -1 / (0.1 * 0.5) = -20. Softmax: 1 / (5 + 3 e^-20) and e^-20 / (5 + 3 e^-20).
    image = jnp.zeros((4, 4, 3)).at[:, 2:].set(1.0)
    m = jnp.arange(16.0).reshape(1, 4, 4) / 16
    out = _pamr_jit(image, m, ONE_STEP)  # sigma_scale 0.1
    v = np.asarray(m[0])
    e = math.exp(-20.0)
    same = v[0, 0] + v[0, 1] + v[0, 0] + v[1, 0] + v[1, 1]
    other = v[0, 2] + v[0, 2] + v[1, 2]
    np.testing.assert_allclose(out[0, 0, 1], (same + e * other) / (5 + 3 * e), rtol=1e-6)
    # pixel (0, 0): all neighbours black, flat neighbourhood, plain mean of the 8
    nb00 = [v[0, 0], v[0, 0], v[0, 1], v[0, 0], v[0, 1], v[1, 0], v[1, 0], v[1, 1]]
    np.testing.assert_allclose(out[0, 0, 0], np.mean(nb00), rtol=1e-6)


def test_pamr_equals_numpy_on_a_large_multichannel_image():
    # 192 px and 2 channels: the size at which jaxlib 0.10.2's CPU reduce fusion miscomputed
    # a stack-multiply-sum formulation of the propagation step (jax-ml/jax#39103)
    hw, dil = 192, (1,)
    image, masks = _rand(50, (hw, hw, 3)), _rand(51, (2, hw, hw))
    weights = np.asarray(pamr_affinity(image, PAMRConfig(dilations=dil)), np.float64)
    nb = _clamped_neighbours(np.asarray(masks, np.float64), dil)
    want = np.einsum("phw,pchw->chw", weights, nb)
    got = _pamr_jit(image, masks, PAMRConfig(dilations=dil, num_iter=1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_pamr_zero_iterations_is_identity():
    masks = _rand(13, (1, 4, 4))
    weights = pamr_affinity(_rand(14, (4, 4, 3)), ONE_STEP)
    np.testing.assert_array_equal(pamr_propagate(weights, masks, (1,), 0), masks)


# --- PAMR invariants -----------------------------------------------------------------------------


def _clamped_neighbours(m: np.ndarray, dilations) -> np.ndarray:
    """(p, c, h, w) neighbour values, by index clamping (an independent replicate padding)."""
    _, h, w = m.shape
    rows, cols = np.arange(h), np.arange(w)
    out = []
    for d in dilations:
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy or dx:
                    r = np.clip(rows + dy * d, 0, h - 1)
                    q = np.clip(cols + dx * d, 0, w - 1)
                    out.append(m[:, r][:, :, q])
    return np.stack(out)


_CONVEX_CONFIGS = [
    ONE_STEP,
    PAMRConfig(dilations=(1, 2, 4, 8, 12, 24), num_iter=1, sigma_scale=1.0),
]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), cfg=st.sampled_from(_CONVEX_CONFIGS))
def test_pamr_step_is_a_convex_combination_of_neighbours(seed, cfg):
    image = _rand(seed, HW + (3,))
    masks = _rand(seed + 1, (C,) + HW)
    out = np.asarray(_pamr_jit(image, masks, cfg))
    nb = _clamped_neighbours(np.asarray(masks), cfg.dilations)
    assert np.all(out >= nb.min(0) - 1e-6) and np.all(out <= nb.max(0) + 1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), cfg=st.sampled_from([TWO_DIL, PAMR_DEFAULT]))
def test_pamr_preserves_constants_and_sums(seed, cfg):
    image = _rand(seed, HW + (3,))
    const = jnp.stack([jnp.full(HW, 0.25), jnp.full(HW, -2.0), jnp.full(HW, 7.0)])
    np.testing.assert_allclose(_pamr_jit(image, const, cfg), const, rtol=1e-5)
    probs = jax.nn.softmax(5 * _rand(seed + 1, (C,) + HW), axis=0)
    out = _pamr_jit(image, probs, cfg)
    np.testing.assert_allclose(out.sum(0), np.ones(HW), rtol=1e-5)
    assert (
        float(out.min()) >= float(probs.min()) - 1e-6
        and float(out.max()) <= float(probs.max()) + 1e-6
    )


def test_pamr_follows_the_image_edge():
    # a blurry mask across a sharp image edge becomes sharper on each side
    image = jnp.zeros((16, 16, 3)).at[:, 8:].set(1.0)
    ramp = jnp.broadcast_to(jnp.linspace(0.2, 0.8, 16), (16, 16))
    masks = jnp.stack([1 - ramp, ramp / 2, ramp / 2])
    out = _pamr_jit(image, masks, PAMR_DEFAULT)
    left, right = np.asarray(out[1, :, :8]), np.asarray(out[1, :, 8:])
    assert np.ptp(left) < 0.05 and np.ptp(right) < 0.05  # flattened within each region
    assert right.min() - left.max() > 0.1  # and still apart across the edge


# --- configs, errors, jit, vmap ------------------------------------------------------------------


def test_presets():
    assert PAMR_DEFAULT == PAMRConfig(dilations=(1, 2, 4, 8, 12, 24), num_iter=10, sigma_scale=0.1)
    assert PAMR_SEEDIFF == PAMRConfig(dilations=(1,), num_iter=5000, sigma_scale=0.2)
    assert hash(PAMRConfig(dilations=[1, 2])) == hash(
        PAMRConfig(dilations=(1, 2))
    )  # lists become tuples


def test_config_errors():
    with pytest.raises(ValueError, match="dilations must be positive ints, a non-empty tuple"):
        PAMRConfig(dilations=())
    with pytest.raises(ValueError, match="dilations must be positive ints, a non-empty tuple"):
        PAMRConfig(dilations=(1, 0))
    with pytest.raises(ValueError, match="num_iter must be an int >= 0"):
        PAMRConfig(num_iter=-1)
    with pytest.raises(ValueError, match="sigma_scale must be > 0"):
        PAMRConfig(sigma_scale=0.0)


@pytest.mark.unchecked("asserts the core's own error message")
def test_pamr_shape_errors():
    with pytest.raises(
        ValueError, match=r"masks must have shape \(c, 6, 5\) to match the image, got \(2, 5, 6\)"
    ):
        pamr(jnp.zeros((6, 5, 3)), jnp.zeros((2, 5, 6)))
    with pytest.raises(ValueError, match=r"masks must have shape \(c, 6, 5\)"):
        pamr(jnp.zeros((6, 5, 3)), jnp.zeros((6, 5)))
    with pytest.raises(ValueError, match=r"image must have shape \(h, w, 3\), got \(6, 5\)"):
        pamr(jnp.zeros((6, 5)), jnp.zeros((2, 6, 5)))
    with pytest.raises(ValueError, match=r"image must have shape \(h, w, 3\), got \(3, 6, 5\)"):
        pamr(jnp.zeros((3, 6, 5)), jnp.zeros((2, 6, 5)))
    with pytest.raises(ValueError, match=r"weights must have shape \(16, h, w\) for 2 dilations"):
        pamr_propagate(jnp.zeros((8, 6, 5)), jnp.zeros((2, 6, 5)), (1, 2), 1)


@pytest.mark.parametrize(
    "hw,c,cfg",
    [((4, 4), 1, ONE_STEP), (HW, C, TWO_DIL), ((16, 16), C, PAMR_DEFAULT), ((5, 9), 0, ONE_STEP)],
)
def test_pamr_shapes(hw, c, cfg):
    out = _pamr_jit(_rand(20, hw + (3,)), _rand(21, (c,) + hw), cfg)
    assert out.shape == (c,) + hw and out.dtype == jnp.float32


def test_pamr_jit_equals_eager_and_does_not_recompile():
    # eager runs each operation on its own (the loop body compiled alone): a different program
    cfg = ONE_STEP
    f = jax.jit(lambda i, m: pamr(i, m, cfg))
    image, masks = _rand(30, HW + (3,)), _rand(31, (C,) + HW)
    np.testing.assert_allclose(f(image, masks), pamr(image, masks, cfg), rtol=1e-5, atol=1e-6)
    f(image * 0.5, masks)
    assert f._cache_size() == 1


def test_pamr_vmap_equals_loop():
    images, masks = _rand(40, (3,) + HW + (3,)), _rand(41, (3, C) + HW)
    cfg = TWO_DIL
    batched = jax.jit(jax.vmap(pamr, in_axes=(0, 0, None)), static_argnums=2)(images, masks, cfg)
    loop = np.stack([_pamr_jit(i, m, cfg) for i, m in zip(images, masks, strict=True)])
    np.testing.assert_allclose(batched, loop, rtol=1e-5, atol=1e-6)
