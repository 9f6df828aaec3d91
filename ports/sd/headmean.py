"""Fused head-mean attention probabilities: a Pallas (Triton) kernel for the capture path.

``ports.sd.capture.conditional_head_mean`` needs, for the conditional half of a CFG batch,

    A[i, j] = 1/H sum_h softmax_j(scale * q_h[i] . k_h[j])          (b/2, n, m) float32

Computed with XLA this materialises the float32 logits and probabilities of every head,
``(b/2, H, n, m)`` (5.4 GB per 64x64 self layer at batch 16, ~20 GB of HBM traffic per step). The
kernel here writes ``A`` once and nothing per head: one program per (item, block of ``block_q``
queries) runs two passes over the keys,

1. per head, flash-style online softmax over key blocks: ``lse_h[i] = log sum_j exp(s_h[i, j])``;
2. per key block, ``sum_h exp(s_h[i, j] - lse_h[i])`` for all heads (QK^T recomputed: ~2 GFLOP
   per item-head at n = m = 4096, small next to the UNet), written once as ``A``'s block, with
   the block's column maxima beside it (``(b/2, n / block_q, m)``, so ``step_norm="max"`` needs no
   second pass over ``A``).

Keys whose count is not a multiple of ``block_k`` (text, 77 tokens) are zero-padded and masked to
``-inf`` in both passes; the padding is sliced off. Queries must fill whole blocks.

The per-step normalisation after the mean is ``jaxmask.head_mean_probs``'s: with
``step_norm="max"`` a cross map (``n != m``) is divided by each key's (token's) max over queries,
a self map (``n == m``) by its global max.

On a CPU the kernel runs in Pallas' interpreter (``interpret=True``, for tests); ``supported``
says whether the shapes suit the Triton lowering.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

BLOCK_Q = 128  # queries per program (power of two >= 16: Triton dot tiles)
BLOCK_K = 64  # keys per inner step
NUM_WARPS = 8
_EPS = 1e-12  # jaxmask.maps' guard for an all-zero map


def _power_of_two(x: int) -> bool:
    return x >= 1 and x & (x - 1) == 0


def supported(query_shape, key_shape, *, block_q: int = BLOCK_Q, block_k: int = BLOCK_K) -> bool:
    """Whether ``head_mean_attention`` can run these ``(b, n, heads, d)`` / ``(b, m, heads, d)``.

    Needs: queries in whole blocks (``n % min(block_q, n) == 0`` with that block a power of two
    >= 16), a head dim that is a power of two in [16, 128], blocks that are powers of two >= 16.
    Keys may be any length (padded to ``block_k``).
    """
    if len(query_shape) != 4 or len(key_shape) != 4:
        return False
    b, n, heads, d = query_shape
    if key_shape[0] != b or key_shape[2:] != (heads, d):
        return False
    bq = min(block_q, n)
    return (
        _power_of_two(bq)
        and bq >= 16
        and n % bq == 0
        and _power_of_two(block_k)
        and block_k >= 16
        and _power_of_two(d)
        and 16 <= d <= 128
    )


def head_mean_attention(
    query,
    key,
    scale: float,
    step_norm: str = "none",
    *,
    conditional: bool = True,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    num_warps: int = NUM_WARPS,
    interpret: bool | None = None,
):
    """Head-mean softmax attention probabilities, float32, without per-head ``n x m`` arrays.

    ``A[i, j] = mean_h softmax_j(scale * q_h[i] . k_h[j])``, then ``step_norm`` as in
    ``jaxmask.head_mean_probs``.

    Args:
      query: ``(b, n, heads, d)``; key: ``(b, m, heads, d)`` (bf16 / f16 / f32).
      scale: the logit scale (``d ** -0.5``).
      step_norm: ``"none"`` or ``"max"`` (cross maps per key, self maps by the global max).
      conditional: take the second half of the batch (a CFG ``[unconditional; conditional]``
        batch, ``b`` even) as ``conditional_head_mean`` does; False: every item.
      block_q, block_k: query / key block sizes (powers of two >= 16).
      num_warps: Triton warps per program.
      interpret: run in Pallas' interpreter; None: when the backend is not a GPU.

    Returns:
      ``(b // 2, n, m)`` float32 (``(b, n, m)`` with ``conditional=False``).

    Raises:
      ValueError: an odd CFG batch, or shapes ``supported`` rejects.

    Example (by eye: one key, so every probability is 1)::

        >>> q = jnp.ones((2, 16, 1, 16)); k = jnp.ones((2, 1, 1, 16))
        >>> head_mean_attention(q, k, 0.25).shape, float(head_mean_attention(q, k, 0.25)[0, 0, 0])
        ((1, 16, 1), 1.0)
    """
    b, n, heads, d = query.shape
    m = key.shape[1]
    if conditional and b % 2:
        raise ValueError(
            "attention capture expects a classifier-free-guidance batch [unconditional; "
            f"conditional] of even size, got batch {b}"
        )
    if step_norm not in ("none", "max"):
        raise ValueError(f"step_norm must be 'none' or 'max', got {step_norm!r}")
    if not supported(query.shape, key.shape, block_q=block_q, block_k=block_k):
        raise ValueError(
            f"head_mean_attention cannot run query {query.shape} / key {key.shape} with blocks "
            f"({block_q}, {block_k}): need n a multiple of a power-of-two query block >= 16, "
            "a power-of-two head dim in [16, 128], key shape (b, m, heads, d)"
        )
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if key.dtype != query.dtype:
        key = key.astype(query.dtype)
    offset = b // 2 if conditional else 0
    items = b - offset
    bq = min(block_q, n)
    m_pad = -(-m // block_k) * block_k
    if m_pad != m:  # pad the (small) keys of the items we use, mask the padding in the kernel
        key = jnp.pad(key[offset:], ((0, 0), (0, m_pad - m), (0, 0), (0, 0)))
        key_offset = 0
    else:
        key_offset = offset
    kernel = functools.partial(
        _kernel,
        heads=heads,
        scale=float(scale),
        keys=m,
        block_k=block_k,
        precision=lax.Precision.HIGHEST if query.dtype == jnp.float32 else None,
    )
    probs, tops = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((items, n, m_pad), jnp.float32),
            jax.ShapeDtypeStruct((items, n // bq, m_pad), jnp.float32),
        ),
        grid=(items, n // bq),
        in_specs=[
            pl.BlockSpec((None, bq, heads, d), lambda i, j: (i + offset, j, 0, 0)),
            pl.BlockSpec((None, m_pad, heads, d), lambda i, j: (i + key_offset, 0, 0, 0)),
        ],
        out_specs=(
            pl.BlockSpec((None, bq, m_pad), lambda i, j: (i, j, 0)),
            pl.BlockSpec((None, None, m_pad), lambda i, j: (i, j, 0)),
        ),
        compiler_params=_compiler_params(num_warps),
        interpret=interpret,
        name="head_mean_attention",
    )(query, key)
    if m_pad != m:
        probs, tops = probs[..., :m], tops[..., :m]
    if step_norm == "none":
        return probs
    if n != m:  # cross: each key's (token's) map over the queries by its own max
        top = jnp.max(tops, axis=1, keepdims=True)
    else:  # self: the global max
        top = jnp.max(tops, axis=(1, 2), keepdims=True)
    return jnp.where(top > _EPS, probs / jnp.maximum(top, _EPS), 0.0)


def _compiler_params(num_warps):
    try:
        from jax.experimental.pallas import triton as pltriton
    except ImportError:  # pragma: no cover - a jax without the Triton backend
        return None
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=2)


def _kernel(q_ref, k_ref, probs_ref, top_ref, *, heads, scale, keys, block_k, precision):
    """One (item, query block): q_ref ``(bq, heads, d)``, k_ref ``(m_pad, heads, d)``,
    probs_ref ``(bq, m_pad)``, top_ref ``(m_pad,)``."""
    bq = q_ref.shape[0]
    m_pad = k_ref.shape[0]
    steps = m_pad // block_k
    masked = m_pad != keys

    def logits(h, start):
        q = q_ref[:, h, :]
        k = k_ref[pl.ds(start, block_k), h, :]
        s = lax.dot_general(
            q,
            k,
            (((1,), (1,)), ((), ())),
            precision=precision,
            preferred_element_type=jnp.float32,
        )
        s = s * scale
        if masked:
            column = start + lax.broadcasted_iota(jnp.int32, (bq, block_k), 1)
            s = jnp.where(column < keys, s, -jnp.inf)
        return s

    # pass 1: per-head log-sum-exp over all keys (online softmax)
    def lse_step(step, carry):
        start = pl.multiple_of(step * block_k, block_k)
        out = []
        for h in range(heads):
            top, total = carry[2 * h], carry[2 * h + 1]
            s = logits(h, start)
            new_top = jnp.maximum(top, jnp.max(s, axis=1))
            total = total * jnp.exp(top - new_top) + jnp.sum(jnp.exp(s - new_top[:, None]), axis=1)
            out += [new_top, total]
        return tuple(out)

    init = []
    for _ in range(heads):
        init += [jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32)]
    carry = lax.fori_loop(0, steps, lse_step, tuple(init))
    lse = [carry[2 * h] + jnp.log(carry[2 * h + 1]) for h in range(heads)]

    # pass 2: per key block, the head mean of the probabilities, written once
    def write_step(step, _):
        start = pl.multiple_of(step * block_k, block_k)
        acc = jnp.zeros((bq, block_k), jnp.float32)
        for h in range(heads):
            acc += jnp.exp(logits(h, start) - lse[h][:, None])
        acc = acc * (1.0 / heads)
        probs_ref[:, pl.ds(start, block_k)] = acc
        top_ref[pl.ds(start, block_k)] = jnp.max(acc, axis=0)
        return 0

    lax.fori_loop(0, steps, write_step, 0)


def head_mean_flops(items: int, n: int, m: int, heads: int, d: int) -> float:
    """The kernel's matmul FLOPs: QK^T twice (both passes) per item and head."""
    return 2.0 * 2.0 * items * heads * n * m * d


__all__ = ["BLOCK_K", "BLOCK_Q", "head_mean_attention", "head_mean_flops", "supported"]
