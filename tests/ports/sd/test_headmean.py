"""ports.sd.headmean: the fused head-mean kernel (Pallas' interpreter on the CPU) equals the XLA
path of ``conditional_head_mean`` for self and cross shapes, with and without ``step_norm="max"``.

The inputs make peaked softmaxes (logits of order 10) and differ between the CFG halves, so a
kernel that read the wrong half, a wrong head, an unmasked key padding or a wrong log-sum-exp
fails the comparisons below by far more than the tolerance.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmask.maps import CaptureSpec
from ports.sd import headmean
from ports.sd.capture import (
    MAPS,
    conditional_head_mean,
    head_mean_kernel,
    intercept_attention,
    step_maps,
    use_kernel,
)

BLOCKS = {"block_q": 16, "block_k": 16}  # several query and key blocks at test sizes

# (name, n queries, m keys, heads, head dim)
SHAPES = [
    ("self", 64, 64, 3, 16),
    ("self-one-block", 16, 16, 2, 32),
    ("cross-77", 32, 77, 2, 16),  # 77 text tokens: padded to 80 and masked
]
TOL = {jnp.float32: (1e-5, 1e-6), jnp.bfloat16: (1e-2, 1e-5)}


def _inputs(b, n, m, heads, d, dtype, seed=0):
    kq, kk = jax.random.split(jax.random.key(seed))
    query = 3.0 * jax.random.normal(kq, (b, n, heads, d), jnp.float32)
    key = 3.0 * jax.random.normal(kk, (b, m, heads, d), jnp.float32)
    return query.astype(dtype), key.astype(dtype)


def _kernel(query, key, step_norm="none", **blocks):
    d = query.shape[-1]
    return headmean.head_mean_attention(
        query, key, d**-0.5, step_norm, **(blocks or BLOCKS), interpret=True
    )


@pytest.mark.parametrize("step_norm", ["none", "max"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_kernel_equals_xla(shape, dtype, step_norm):
    _, n, m, heads, d = shape
    query, key = _inputs(4, n, m, heads, d, dtype)
    got = np.asarray(_kernel(query, key, step_norm))
    want = np.asarray(conditional_head_mean(query, key, d**-0.5, step_norm, kernel=False))
    assert got.shape == want.shape == (2, n, m) and got.dtype == np.float32
    rtol, atol = TOL[dtype]
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
    # the comparison can fail: the unconditional half's maps are far from these
    other = np.asarray(
        conditional_head_mean(query[::-1], key[::-1], d**-0.5, step_norm, kernel=False)
    )
    assert np.max(np.abs(other - got)) > 100 * atol


@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_rows_are_distributions(shape):
    _, n, m, heads, d = shape
    query, key = _inputs(2, n, m, heads, d, jnp.float32, seed=1)
    probs = np.asarray(_kernel(query, key))
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_step_norm_max_semantics():
    """Self maps: global max 1; cross maps: every key's (token's) column max 1."""
    query, key = _inputs(2, 32, 32, 2, 16, jnp.float32, seed=2)
    self_map = np.asarray(_kernel(query, key, "max"))[0]
    assert self_map.max() == pytest.approx(1.0) and (self_map.max(axis=0) < 1.0 - 1e-3).any()
    query, key = _inputs(2, 32, 77, 2, 16, jnp.float32, seed=3)
    cross_map = np.asarray(_kernel(query, key, "max"))[0]
    np.testing.assert_allclose(cross_map.max(axis=0), 1.0, rtol=1e-6)


def test_by_hand_with_masked_key_padding():
    """Two keys (padded to a 16-key block; padding logits would be 0 if not masked): head 0
    softmax([log 3, 0]) = [3/4, 1/4], head 1 [1/2, 1/2], mean [5/8, 3/8] for every query."""
    query = np.zeros((2, 16, 2, 16), np.float32)
    key = np.zeros((2, 2, 2, 16), np.float32)
    query[1, :, :, 0] = 1.0
    key[1, :, 0, 0] = [math.log(3.0), 0.0]
    query[0] = 5.0  # the unconditional half: ignored
    got = np.asarray(
        headmean.head_mean_attention(jnp.asarray(query), jnp.asarray(key), 1.0, interpret=True)
    )
    np.testing.assert_allclose(got, np.tile([0.625, 0.375], (1, 16, 1)), rtol=1e-6)


def test_jit_equals_eager_and_conditional_false():
    query, key = _inputs(2, 32, 32, 2, 16, jnp.float32, seed=4)
    eager = _kernel(query, key, "max")
    jitted = jax.jit(lambda q, k: _kernel(q, k, "max"))(query, key)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6)
    every = headmean.head_mean_attention(
        query, key, 0.25, conditional=False, **BLOCKS, interpret=True
    )
    assert every.shape == (2, 32, 32)
    np.testing.assert_allclose(
        np.asarray(every[1:]),
        np.asarray(headmean.head_mean_attention(query, key, 0.25, **BLOCKS, interpret=True)),
        rtol=1e-6,
    )


def test_conditional_head_mean_forced_kernel_matches_xla():
    """``kernel=True`` routes through the kernel (interpreted on the CPU), default blocks."""
    query, key = _inputs(2, 64, 64, 2, 16, jnp.float32, seed=5)
    fused = conditional_head_mean(query, key, 0.25, "max", kernel=True)
    plain = conditional_head_mean(query, key, 0.25, "max", kernel=False)
    np.testing.assert_allclose(np.asarray(fused), np.asarray(plain), rtol=1e-5, atol=1e-6)


def test_odd_cfg_batch_raises():
    odd = jnp.zeros((3, 16, 2, 16))
    with pytest.raises(ValueError, match="even size, got batch 3"):
        conditional_head_mean(odd, odd, 1.0, kernel=True)
    with pytest.raises(ValueError, match="even size, got batch 3"):
        headmean.head_mean_attention(odd, odd, 1.0, interpret=True)


def test_unsupported_shapes_raise_and_are_not_picked():
    square = jnp.zeros((2, 36, 2, 16))  # 6x6 queries: not a whole power-of-two block
    with pytest.raises(ValueError, match="cannot run query"):
        headmean.head_mean_attention(square, square, 1.0, interpret=True)
    assert not headmean.supported((2, 64, 2, 8), (2, 64, 2, 8))  # head dim below a dot tile
    assert not headmean.supported((2, 64, 2, 16), (2, 64, 3, 16))  # heads differ
    assert headmean.supported((2, 4096, 5, 64), (2, 77, 5, 64))
    # on the CPU the default is always XLA
    big = jax.ShapeDtypeStruct((2, 4096, 5, 64), jnp.bfloat16)
    assert jax.default_backend() != "gpu" and not use_kernel(big, big)


def test_kernel_flops_count():
    assert headmean.head_mean_flops(8, 4096, 4096, 5, 64) == 4 * 8 * 5 * 4096 * 4096 * 64


def test_head_mean_kernel_context_sets_the_default():
    query, key = _inputs(2, 64, 64, 2, 16, jnp.float32, seed=6)
    assert not use_kernel(query, key)
    with head_mean_kernel(True):
        assert use_kernel(query, key)
        assert not use_kernel(query[:, :36], key)  # unsupported shapes still go to XLA
        fused = conditional_head_mean(query, key, 0.25)
    with head_mean_kernel(False):
        assert not use_kernel(query, key)
    plain = conditional_head_mean(query, key, 0.25, kernel=False)
    np.testing.assert_allclose(np.asarray(fused), np.asarray(plain), rtol=1e-5, atol=1e-6)


def test_interceptor_maps_with_the_kernel_equal_xla():
    """A small diffusers Flax UNet (head dim 16): the maps captured through ``intercept_attention``
    with ``kernel=True`` (self maps at 16 and 8, cross maps at 8, step_norm="max", a traced
    capture weight) equal the XLA path's, and the UNet output is unchanged."""
    from diffusers import FlaxUNet2DConditionModel

    unet = FlaxUNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=(2, 2, 4),
        use_linear_projection=True,
    )
    shapes = jax.eval_shape(unet.init_weights, jax.random.key(0))  # (init itself: ~30 s on CPU)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(
            rng.standard_normal(s.shape, np.float32) / math.sqrt(math.prod(s.shape[:-1]) or 1)
        ),
        shapes,
    )
    spec = CaptureSpec(cross=(8,), self_attn=(16, 8), step_norm="max")
    kx, kc = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (4, 4, 16, 16))
    text = jax.random.normal(kc, (4, 77, 32))

    @functools.partial(jax.jit, static_argnums=0)
    def call(kernel, weight, params=params):
        with intercept_attention(spec, weight=weight, kernel=kernel):
            out, variables = unet.apply(
                {"params": params}, x, jnp.array([10, 10, 10, 10]), text, mutable=[MAPS]
            )
        return out.sample, step_maps(variables[MAPS], spec)

    out_k, (cross_k, self_k) = call(True, jnp.float32(1.0))
    out_x, (cross_x, self_x) = call(False, jnp.float32(1.0))
    np.testing.assert_array_equal(np.asarray(out_k), np.asarray(out_x))
    assert sorted(cross_k) == [8] and sorted(self_k) == [8, 16]
    assert self_k[16].shape == (2, 256, 256) and cross_k[8].shape[-1] == 77
    for got, want in [(cross_k[8], cross_x[8]), (self_k[16], self_x[16]), (self_k[8], self_x[8])]:
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    _, (cross_0, self_0) = call(True, jnp.float32(0.0))  # outside the window: zeros
    assert not np.any(np.asarray(self_0[16])) and not np.any(np.asarray(cross_0[8]))
