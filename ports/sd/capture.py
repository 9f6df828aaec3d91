"""Attention capture for diffusers' Flax UNet, through ``flax.linen.intercept_methods``.

Inside ``with intercept_attention(spec):`` every ``FlaxAttention.__call__`` of the UNet is replaced
by the same attention computed here (no fork, no monkeypatch: flax's interceptor stack does the
replacement and leaves it when the block ends):

    q, k, v = to_q(x), to_k(c), to_v(c)           c = x (self, attn1) or the text (cross, attn2)
    out = to_out_0(softmax(q k^T / sqrt(d)) v)    per head: ``jax.nn.dot_product_attention``

diffusers' ``split_head_dim`` and ``use_memory_efficient_attention`` only change how that product is
laid out, not its value, and the UNet's linear vs 1x1-conv ``proj_in``/``proj_out`` are outside the
attention module, so one computation serves every SD 1.x / 2.x UNet. The fused kernel is cuDNN's
flash attention on a GPU for bf16/fp16 with head dim <= 128 (``implementation="cudnn"``), XLA's
otherwise.

For the layers ``spec`` declares, the probabilities are recomputed for the conditional half of the
classifier-free-guidance batch only (the batch is ``[unconditional; conditional]``), head-mean in
float32 with the spec's per-step normalisation (``jaxmask.head_mean_probs``), and ``sow``n into the
``"maps"`` collection under the layer's own path. On one GPU the large maps (``n * m >= 2**20``:
the 32x32 and 64x64 self layers at 512 px) come from ``ports.sd.headmean``'s fused Pallas kernel,
which writes the head mean without the per-head float32 logits and probabilities XLA would
materialise (``conditional_head_mean(..., kernel=...)`` forces either path). Recomputing them beside
the fused output means capturing never changes the UNet's output. ``step_maps`` then turns the
collection of one UNet call into per-resolution arrays (cross maps stacked per layer in UNet order,
self maps averaged over the chosen layers); the sampler adds those into running sums in its
``lax.scan`` carry, so nothing is stacked over steps.

Which layers: a layer is ``attn1`` (self) or ``attn2`` (cross) of ``transformer_blocks_m`` in
``attentions_j`` of ``down_blocks_i`` / ``mid_block`` / ``up_blocks_i`` (its ``module.path``); its
side is ``r = sqrt(query length)``. Cross maps are kept at ``spec.cross``; self maps at
``spec.self_attn``, from every self layer at ``r`` (``self_layers="mean"``) or only from the first
layer of the up block at ``r`` (``"first_up"``: ``attentions_0 / transformer_blocks_0``).

Several specs in one run: ``spec`` may be a tuple of ``CaptureSpec`` (one sampling pass for
methods that cannot share one spec, e.g. SeeDiff-code's first-up self-attention beside a
layer-mean one). Each spec's maps are sown under ``"cross_g"`` / ``"self_g"`` (``g`` its index);
the probabilities of a layer are computed once per distinct ``step_norm`` among the specs that
keep it, and ``step_maps(collection, spec_g, index=g)`` reads spec ``g``'s.

Example::

    with intercept_attention(spec):
        out, variables = unet.apply({"params": params}, x, t, text, mutable=[MAPS])
    cross, self_attn = step_maps(variables[MAPS], spec)   # {r: (b, l, r, r, t)}, {r: (b, n, n)}
"""

import contextlib
import contextvars
import dataclasses
import functools
import math
import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict

from jaxmask.maps import CaptureSpec, head_mean_probs
from ports.sd import headmean

MAPS = "maps"  # the flax collection the interceptor sows into
NOTHING = CaptureSpec()  # the spec that captures nothing
CROSS, SELF = "cross", "self"

_BLOCK = re.compile(r"^(down_blocks|up_blocks)_(\d+)$|^(mid_block)$")
_PLACES = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


@dataclasses.dataclass(frozen=True, order=True)
class Layer:
    """Where an attention layer sits in the UNet; sorts in UNet order (down, mid, up)."""

    place: int  # 0 down, 1 mid, 2 up
    block: int  # i of down_blocks_i / up_blocks_i (0 for the mid block)
    attention: int  # j of attentions_j
    transformer: int  # m of transformer_blocks_m
    name: str  # attn1 / attn2

    @property
    def is_first_up(self) -> bool:
        """The first attention layer of an up block (SeeDiff code's ``out_self[0]`` at its side)."""
        return self.place == 2 and self.attention == 0 and self.transformer == 0


def parse_layer(path: tuple[str, ...]) -> Layer | None:
    """The ``Layer`` of a ``FlaxAttention`` module path, or None when it is not a UNet block's.

    >>> parse_layer(("up_blocks_1", "attentions_0", "transformer_blocks_0", "attn1"))
    Layer(place=2, block=1, attention=0, transformer=0, name='attn1')
    """
    for i, part in enumerate(path):
        match = _BLOCK.match(part)
        if match is None:
            continue
        rest = path[i + 1 :]
        if (
            len(rest) != 3
            or not rest[0].startswith("attentions_")
            or not rest[1].startswith("transformer_blocks_")
        ):
            return None
        place = match.group(1) or match.group(3)
        block = int(match.group(2) or 0)
        return Layer(
            _PLACES[place],
            block,
            int(rest[0].rsplit("_", 1)[1]),
            int(rest[1].rsplit("_", 1)[1]),
            rest[2],
        )
    return None


def wants(spec: CaptureSpec, layer: Layer | None, kind: str, side: int) -> bool:
    """Whether ``spec`` keeps the ``kind`` (``"cross"``/``"self"``) map of ``layer`` at ``side``."""
    if layer is None:
        return False
    if kind == CROSS:
        return side in spec.cross
    if side not in spec.self_attn:
        return False
    return spec.self_layers == "mean" or layer.is_first_up


def intercept_attention(
    spec: CaptureSpec | tuple[CaptureSpec, ...] = NOTHING,
    *,
    weight=None,
    implementation=None,
    kernel: bool | None = None,
):
    """A context manager under which the UNet's attention is computed (and captured) here.

    Args:
      spec: what to capture; the empty ``CaptureSpec()`` captures nothing (fused attention only);
        a tuple of specs captures for each (sown as ``kind_g``, see the module docstring).
      weight: optional traced scalar, this step's capture weight: where it is 0 the
        probabilities are not computed (``lax.cond``) and zeros are sown, so a step window costs
        nothing outside it. With a tuple of specs, a tuple of weights (one per spec) or None.
      implementation: ``jax.nn.dot_product_attention``'s ``"xla"`` or ``"cudnn"``; None picks
        cuDNN on a GPU where it applies (bf16/fp16, head dim a multiple of 8 and <= 128), XLA
        elsewhere.
      kernel: how the captured maps are head-meaned (``conditional_head_mean``'s ``kernel``):
        None picks the fused Pallas kernel where it pays (see ``use_kernel``), True forces it
        (interpreted off a GPU), False forces XLA.

    The maps are sown only when the caller made the ``"maps"`` collection mutable
    (``apply(..., mutable=[MAPS])``); otherwise nothing extra is computed.
    """
    return nn.intercept_methods(_interceptor(spec, weight, implementation, kernel))


def _interceptor(spec, weight, implementation, kernel):
    from diffusers.models.attention_flax import FlaxAttention

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, FlaxAttention):
            return next_fun(*args, **kwargs)
        hidden_states, text, deterministic = _bind(args, kwargs)
        return _attention(
            module, hidden_states, text, deterministic, spec, weight, implementation, kernel
        )

    return interceptor


def _bind(args, kwargs):
    """``FlaxAttention.__call__(hidden_states, context=None, deterministic=True)``'s arguments."""
    names = ("hidden_states", "context", "deterministic")
    if len(args) > len(names) or set(kwargs) - set(names):
        raise TypeError(
            f"unexpected FlaxAttention call arguments: {len(args)} positional, {sorted(kwargs)}"
        )
    bound = dict(zip(names, args, strict=False))  # trailing parameters may be absent
    bound.update(kwargs)
    return bound["hidden_states"], bound.get("context"), bound.get("deterministic", True)


def _attention(module, hidden_states, text, deterministic, spec, weight, implementation, kernel):
    is_self = text is None
    source = hidden_states if is_self else text
    heads, dim_head = module.heads, module.dim_head
    b, n = hidden_states.shape[:2]

    def split(x):
        return x.reshape(x.shape[0], x.shape[1], heads, dim_head)  # (b, s, heads, d): BTNH

    query = split(module.query(hidden_states))
    key = split(module.key(source))
    value = split(module.value(source))
    out = _fused_attention(query, key, value, module.scale, implementation)
    out = module.proj_attn(out.reshape(b, n, heads * dim_head))
    out = module.dropout_layer(out, deterministic=deterministic)

    kind = SELF if is_self else CROSS
    side = math.isqrt(n)
    if side * side != n or not module.is_mutable_collection(MAPS):
        return out
    layer = parse_layer(tuple(module.path))
    several = isinstance(spec, tuple)
    specs = spec if several else (spec,)
    weights = weight if isinstance(weight, tuple) else (weight,) * len(specs)
    if len(weights) != len(specs):
        raise ValueError(f"{len(specs)} capture specs but {len(weights)} step weights")
    keep = [g for g, s in enumerate(specs) if wants(s, layer, kind, side)]
    for step_norm in dict.fromkeys(specs[g].step_norm for g in keep):  # once per normalisation
        group = [g for g in keep if specs[g].step_norm == step_norm]
        gate = _any_weight([weights[g] for g in group])
        probs = _maybe(
            gate,
            functools.partial(
                conditional_head_mean, query, key, module.scale, step_norm, kernel=kernel
            ),
        )
        for g in group:
            name = f"{kind}_{g}" if several else kind
            module.sow(MAPS, name, probs, init_fn=lambda: 0.0, reduce_fn=lambda acc, x: acc + x)
    return out


def _any_weight(weights):
    """One gate for specs sharing a computation: None if any is ungated, else their max."""
    if any(w is None for w in weights):
        return None
    return functools.reduce(jnp.maximum, [jnp.asarray(w) for w in weights])


def _maybe(weight, compute):
    """``compute()`` where ``weight > 0``, zeros of its shape elsewhere (one branch runs)."""
    if weight is None:
        return compute()
    shape = jax.eval_shape(compute)
    return jax.lax.cond(
        jnp.asarray(weight) > 0, compute, lambda: jnp.zeros(shape.shape, shape.dtype)
    )


def conditional_head_mean(
    query, key, scale: float, step_norm: str = "none", *, kernel: bool | None = None
):
    """Head-mean attention probabilities of the conditional (second) half of a CFG batch, float32.

    Args:
      query: ``(b, q, heads, d)``; key: ``(b, k, heads, d)``; ``b`` even, ``[unconditional;
        conditional]``.
      scale: the logit scale (``dim_head ** -0.5``).
      step_norm: ``CaptureSpec.step_norm`` (``"max"``: SeeDiff Eq. 5's per-step ``A / max A``).
      kernel: True: ``ports.sd.headmean``'s fused Pallas kernel (Pallas' interpreter off a GPU;
        raises if the shapes do not suit it); False: XLA (softmax of the float32 logits of every
        head, then ``jaxmask.head_mean_probs``); None: ``use_kernel(query, key)``.

    Returns:
      ``(b // 2, q, k)`` float32: row ``i`` of item ``j`` is query ``i``'s attention over the keys.
    """
    b = query.shape[0]
    if b % 2:
        raise ValueError(
            "attention capture expects a classifier-free-guidance batch [unconditional; "
            f"conditional] of even size, got batch {b}"
        )
    if kernel is None:
        kernel = use_kernel(query, key)
    if kernel:
        return headmean.head_mean_attention(query, key, scale, step_norm)
    logits = jnp.einsum(
        "bqhd,bkhd->bhqk", query[b // 2 :], key[b // 2 :], preferred_element_type=jnp.float32
    )
    probs = jax.nn.softmax(logits * jnp.float32(scale), axis=-1)
    return jax.vmap(lambda p: head_mean_probs(p, step_norm))(probs)


KERNEL_MIN_SIZE = 1 << 20  # n * m from which the fused kernel pays (the 32x32 self layers)
_KERNEL_DEFAULT: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "head_mean_kernel", default=None
)


@contextlib.contextmanager
def head_mean_kernel(choice: bool | None):
    """Within the block, ``kernel=None`` means ``choice`` (True: the fused kernel wherever
    ``headmean.supported``; False: XLA; None: ``use_kernel``'s rule).

    For entry points (``bench/sd.py --head-mean``) that cannot reach ``intercept_attention``'s
    ``kernel`` argument. It acts at trace time and jit caches do not see it: enter it before the
    first trace of the function it should affect.
    """
    token = _KERNEL_DEFAULT.set(choice)
    try:
        yield
    finally:
        _KERNEL_DEFAULT.reset(token)


def use_kernel(query, key) -> bool:
    """Whether ``conditional_head_mean`` uses the fused kernel by default: on one GPU (a Pallas
    call is not partitioned over a device mesh), for maps of at least ``KERNEL_MIN_SIZE``
    entries, on shapes ``headmean.supported`` accepts. Decided at trace time from shapes; a
    ``head_mean_kernel`` block overrides the rule."""
    choice = _KERNEL_DEFAULT.get()
    if choice is not None:
        return bool(choice) and headmean.supported(query.shape, key.shape)
    return (
        jax.default_backend() == "gpu"
        and jax.device_count() == 1
        and query.shape[1] * key.shape[1] >= KERNEL_MIN_SIZE
        and headmean.supported(query.shape, key.shape)
    )


def _fused_attention(query, key, value, scale, implementation):
    if implementation is None:
        implementation = _default_implementation(query)
    if implementation == "cudnn":
        try:
            return jax.nn.dot_product_attention(
                query, key, value, scale=scale, implementation="cudnn"
            )
        except (ValueError, NotImplementedError, RuntimeError, TypeError):
            if _default_implementation(query) != "cudnn":  # asked for explicitly: say why it failed
                raise
            implementation = "xla"
    return jax.nn.dot_product_attention(
        query, key, value, scale=scale, implementation=implementation
    )


def _default_implementation(query) -> str:
    head_dim = query.shape[-1]
    if (
        jax.default_backend() == "gpu"
        and query.dtype in (jnp.bfloat16, jnp.float16)
        and head_dim % 8 == 0
        and head_dim <= 128
    ):
        return "cudnn"
    return "xla"


def step_maps(collection: Mapping | None, spec: CaptureSpec, index: int | None = None):
    """One UNet call's sown maps, per resolution.

    Args:
      collection: the ``"maps"`` collection ``unet.apply(..., mutable=[MAPS])`` returned (or None).
      spec: the spec the interceptor ran with (with a tuple of specs: the one at ``index``).
      index: the spec's position when the interceptor ran with a tuple of specs.

    Returns:
      ``(cross, self_attn)``: ``cross = {r: (b, l, r, r, t)}`` with the layers at ``r`` in UNet
      order (down, mid, up), ``self_attn = {r: (b, n, n)}``, the mean over the self layers ``spec``
      names.

    Raises:
      ValueError: ``spec`` declares a resolution at which no layer was captured.
    """
    found: dict[tuple[str, int], list[tuple[Layer, jax.Array]]] = {}
    for path, value in flatten_dict(dict(collection or {})).items():
        *module_path, name = path
        kind, _, g = name.partition("_")
        layer = parse_layer(tuple(module_path))
        if layer is None or g != ("" if index is None else str(index)):
            continue
        side = math.isqrt(value.shape[1])
        found.setdefault((kind, side), []).append((layer, value))

    def ordered(kind, side):
        layers = sorted(found.get((kind, side), []), key=lambda item: item[0])
        if not layers:
            have = sorted({r for k, r in found if k == kind})
            raise ValueError(
                f"no {kind}-attention layer was captured at resolution {side} (captured: {have}); "
                "the spec must name resolutions the UNet attends at for this image size"
            )
        return [value for _, value in layers]

    cross = {}
    for side in spec.cross:
        maps = ordered(CROSS, side)
        cross[side] = jnp.stack(
            [m.reshape(m.shape[0], side, side, m.shape[-1]) for m in maps], axis=1
        )
    self_attn = {}
    for side in spec.self_attn:
        maps = ordered(SELF, side)
        if spec.self_layers == "first_up" and len(maps) != 1:
            raise ValueError(
                f"expected one first up-block self-attention layer at {side}, got {len(maps)}"
            )
        self_attn[side] = sum(maps[1:], maps[0]) / len(maps)
    return cross, self_attn
