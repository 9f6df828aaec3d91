"""Attention maps: the pytree the sampler fills and the mask methods read, and the
per-map aggregation and normalisation steps of the reference codes.

Dimension letters (project-wide): ``r`` attention side, ``n = r*r``, ``t`` text tokens,
``l`` layers at one resolution, ``k`` classes, ``h w`` pixels.
"""

import dataclasses
import functools
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

SelfLayers = Literal["mean", "first_up"]
StepNorm = Literal["none", "max"]


@dataclasses.dataclass(frozen=True)
class CaptureSpec:
    """What a mask method needs captured; the sampler's interceptor reads it.

    Attributes:
      cross: resolutions ``r`` whose cross-attention maps are kept, per layer.
      self_attn: resolutions ``r`` whose self-attention maps are kept.
      self_layers: ``"mean"``: the mean over every self-attention layer at ``r`` (Dataset
        Diffusion, SeeDiff paper); ``"first_up"``: only the first decoder (up-block) layer at
        ``r`` (SeeDiff code, ``out_self[0]``).
      step_window: ``(start, stop)`` as fractions of the denoising steps, ``(0, 1)`` = all
        steps (every reference code averages all of them).
      every: keep every ``every``-th step inside the window.
      step_norm: ``"none"``: plain sum over steps (the codes); ``"max"``: each layer's map
        divided by its own max at every step before summing (SeeDiff Eq. 5).

    Only the conditional half of the classifier-free-guidance batch is captured, head-mean,
    in float32 (all reference codes do this).
    """

    cross: tuple[int, ...] = ()
    self_attn: tuple[int, ...] = ()
    self_layers: SelfLayers = "mean"
    step_window: tuple[float, float] = (0.0, 1.0)
    every: int = 1
    step_norm: StepNorm = "none"

    def __post_init__(self):
        if self.self_layers not in ("mean", "first_up"):
            raise ValueError(f"self_layers must be 'mean' or 'first_up', got {self.self_layers!r}")
        if self.step_norm not in ("none", "max"):
            raise ValueError(f"step_norm must be 'none' or 'max', got {self.step_norm!r}")
        start, stop = self.step_window
        if not 0.0 <= start < stop <= 1.0:
            raise ValueError(
                f"step_window must satisfy 0 <= start < stop <= 1, got {self.step_window}"
            )
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")

    def union(self, other: "CaptureSpec") -> "CaptureSpec":
        """The spec that captures what both need (they must agree on the non-set fields)."""
        if self.self_attn and other.self_attn and self.self_layers != other.self_layers:
            raise ValueError(
                "cannot capture for both methods in one run: one needs self-attention "
                f"{self.self_layers!r}, the other {other.self_layers!r}; run them separately"
            )
        for name in ("step_window", "every", "step_norm"):
            if getattr(self, name) != getattr(other, name):
                raise ValueError(
                    f"cannot capture for both methods in one run: they differ in {name} "
                    f"({getattr(self, name)!r} vs {getattr(other, name)!r}); run them separately"
                )
        return dataclasses.replace(
            self,
            cross=tuple(sorted(set(self.cross) | set(other.cross))),
            self_attn=tuple(sorted(set(self.self_attn) | set(other.self_attn))),
            self_layers=self.self_layers if self.self_attn else other.self_layers,
        )

    def steps_mask(self, num_steps: int) -> tuple[bool, ...]:
        """Which of ``num_steps`` denoising steps (in sampling order) are captured."""
        start, stop = self.step_window
        lo = int(round(start * num_steps))
        hi = max(int(round(stop * num_steps)), lo + 1)
        return tuple(lo <= i < hi and (i - lo) % self.every == 0 for i in range(num_steps))


def merge_specs(specs) -> tuple[tuple[CaptureSpec, ...], tuple[int, ...]]:
    """Group capture specs that one sampling run can serve together (``CaptureSpec.union``).

    Returns the merged specs and, for each input, the index of the merged spec that holds what it
    needs. SeeDiff-code's first-up-layer self-attention and SeeDiff-paper's per-step max cannot
    share a spec with the others, so a run for every method captures two or three specs at once.

    >>> a, b = CaptureSpec(cross=(16,)), CaptureSpec(cross=(8,), self_attn=(32,))
    >>> merged, where = merge_specs([a, b, a])
    >>> merged[0].cross, merged[0].self_attn, where
    ((8, 16), (32,), (0, 0, 0))
    """
    merged: list[CaptureSpec] = []
    where = []
    for spec in specs:
        for g, group in enumerate(merged):
            try:
                merged[g] = group.union(spec)
            except ValueError:
                continue
            where.append(g)
            break
        else:
            merged.append(spec)
            where.append(len(merged) - 1)
    return tuple(merged), tuple(where)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a UNet attends at one image size: what the methods need to place their sides.

    Read from the UNet's config by the shell (``ports.sd.load.StableDiffusion.attention_layout``)
    and static under ``jit``. A plain tuple of sides stands for ``Layout(sides)``: every side
    has every kind of layer, head count unknown.

    Attributes:
      sides: every latent side ``r`` with attention, ascending (SD at 512 px: ``(8, 16, 32, 64)``).
      first_up: the sides with a first up-block attention layer (SeeDiff code's ``out_self[0]``),
        ascending; ``None``: every side. A UNet whose deepest up block has no attention (an
        ``UpBlock2D`` first) attends at its deepest side only in the mid block.
      heads: the attention heads at each side, aligned with ``sides`` (SD 1.x: 8 everywhere,
        SD 2.x: 5/10/20/20 from 64 down); ``None``: unknown, maps count as one head.

    >>> Layout((8, 16, 32), first_up=(16, 32)).self_sides("first_up")
    (16, 32)
    """

    sides: tuple[int, ...]
    first_up: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None

    def __post_init__(self):
        sides = tuple(int(r) for r in self.sides)
        if sides != tuple(sorted(set(sides))) or any(r < 1 for r in sides):
            raise ValueError(f"sides must be distinct positive ints, ascending; got {self.sides}")
        object.__setattr__(self, "sides", sides)
        if self.first_up is not None:
            first_up = tuple(sorted(int(r) for r in self.first_up))
            if not set(first_up) <= set(sides):
                raise ValueError(f"first_up {first_up} must be among the sides {sides}")
            object.__setattr__(self, "first_up", first_up)
        if self.heads is not None:
            heads = tuple(int(h) for h in self.heads)
            if len(heads) != len(sides) or any(h < 1 for h in heads):
                raise ValueError(f"heads must be one positive int per side {sides}, got {heads}")
            object.__setattr__(self, "heads", heads)

    @classmethod
    def of(cls, resolutions: "Layout | tuple[int, ...]") -> "Layout":
        """``resolutions`` itself if it is a ``Layout``, else ``Layout(sorted(resolutions))``."""
        if isinstance(resolutions, Layout):
            return resolutions
        return cls(tuple(sorted(resolutions)))

    def self_sides(self, self_layers: SelfLayers) -> tuple[int, ...]:
        """The sides with the self-attention layer(s) ``self_layers`` reads."""
        if self_layers == "first_up" and self.first_up is not None:
            return self.first_up
        return self.sides

    def heads_at(self, r: int) -> int:
        """The head count at side ``r``; 1 when unknown."""
        if self.heads is None or r not in self.sides:
            return 1
        return self.heads[self.sides.index(r)]


@flax.struct.dataclass
class AttentionMaps:
    """Aggregated attention of one generated image (batch with ``jax.vmap``).

    Attributes:
      cross: ``{r: (l, r, r, t)}`` cross-attention probabilities of the conditional half,
        head-mean, per layer (in UNet order: down, mid, up), mean over the captured steps.
      self_attn: ``{r: (n, n)}`` self-attention probabilities (rows: queries), head-mean,
        mean over the layers named by ``self_layers`` and over the captured steps.
      self_layers: which layers ``self_attn`` holds (static; see ``CaptureSpec``).
      resolutions: every attention side the model has (static), e.g. ``(8, 16, 32, 64)`` for
        SD at 512 px, so methods can place "finest / 4" without it having been captured;
        ``()`` when unknown (methods then infer sides from what was captured).
      layout: the model's ``Layout`` (static): which sides have a first up-block layer and how
        many heads each side has; ``None`` when unknown (``Layout(resolutions)``).
    """

    # *b: stacked (vmapped) maps; numpy arrays: maps fetched to the host (``return_maps``)
    cross: dict[int, Float[Array | np.ndarray, "*b l r r t"]]
    self_attn: dict[int, Float[Array | np.ndarray, "*b n n"]]
    self_layers: str = flax.struct.field(pytree_node=False, default="mean")
    resolutions: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
    layout: Layout | None = flax.struct.field(pytree_node=False, default=None)

    def model_layout(self) -> Layout | None:
        """``layout``, else ``Layout(resolutions)``, else None (nothing known about the model)."""
        if self.layout is not None:
            return self.layout
        return Layout.of(self.resolutions) if self.resolutions else None

    def cross_at(self, r: int) -> Float[Array, "l r r t"]:
        if r not in self.cross:
            raise ValueError(
                f"no cross-attention captured at resolution {r}; captured: {sorted(self.cross)}. "
                "Capture with the method's CaptureSpec."
            )
        return self.cross[r]

    def self_at(self, r: int) -> Float[Array, "n n"]:
        if r not in self.self_attn:
            raise ValueError(
                f"no self-attention captured at resolution {r}; captured: "
                f"{sorted(self.self_attn)}. Capture with the method's CaptureSpec."
            )
        return self.self_attn[r]


def validate(maps: AttentionMaps) -> AttentionMaps:
    """Check shapes at trace time: cross ``(l, r, r, t)`` and self ``(r*r, r*r)``."""
    for r, cross in maps.cross.items():
        if cross.ndim != 4 or cross.shape[1:3] != (r, r):
            raise ValueError(
                f"cross map at r={r} must have shape (l, {r}, {r}, t), got {cross.shape}"
            )
    for r, sa in maps.self_attn.items():
        if sa.shape != (r * r, r * r):
            raise ValueError(
                f"self map at r={r} must have shape ({r * r}, {r * r}), got {sa.shape}"
            )
    return maps


@jax.jit  # one small program, not an eagerly compiled op per map (the shell calls it per batch)
def finite(maps: AttentionMaps) -> Bool[Array, ""]:
    """True when every captured value is finite (NaN/Inf in maps mean a broken run)."""
    leaves = jax.tree_util.tree_leaves(maps)
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


# --- per-map normalisations used by the references --------------------------------------------

_EPS = 1e-12


def normalize_max(m: Float[Array, "..."]) -> Float[Array, "..."]:
    """``m / max(m)`` (SeeDiff Eq. 5, DiffuMask ``save_cross_attention``); 0 stays 0."""
    top = jnp.max(m)
    return jnp.where(top > _EPS, m / jnp.maximum(top, _EPS), jnp.zeros_like(m))


def normalize_minmax(m: Float[Array, "..."]) -> Float[Array, "..."]:
    """``(m - min) / (max - min)``; a flat map becomes all zeros (never NaN).

    >>> normalize_minmax(jnp.array([1.0, 2.0, 3.0])).tolist()
    [0.0, 0.5, 1.0]
    """
    lo, hi = jnp.min(m), jnp.max(m)
    span = hi - lo
    return jnp.where(span > _EPS, (m - lo) / jnp.maximum(span, _EPS), jnp.zeros_like(m))


def normalize_minmax_damped(
    m: Float[Array, "..."], var_floor: float = 1e-4, damping: float = 0.01, heads: int = 1
) -> Float[Array, "..."]:
    """Min-max, then ``x damping`` when the head sum is flat (SeeDiff code: flat layers muted).

    ``m`` is a head-mean map (what jaxmask captures) of ``heads`` heads; the code tests the
    head sum, ``heads * m``, with torch's unbiased variance::

        out = minmax(m) * (damping if var_{n-1}(heads * m) <= var_floor else 1)

    so a head-mean map is muted when ``var(m) <= var_floor / heads**2`` (1e-4 / 64 for SD 1.x).

    Reference: SeeDiff ``seediff_app.py: aggregate_attention``: per layer
    ``torch.sum(cross_maps[..., t], dim=0)`` (the heads), ``.var() > 1e-4`` or ``x 0.01``.
    """
    head_sum = m * float(heads)
    var = jnp.sum((head_sum - jnp.mean(head_sum)) ** 2) / max(m.size - 1, 1)
    scale = jnp.where(var <= var_floor, damping, 1.0)
    return normalize_minmax(m) * scale


NORMALIZERS = {
    "none": lambda m: m,
    "max": normalize_max,
    "minmax": normalize_minmax,
    "minmax_damped": normalize_minmax_damped,
}


# --- aggregation (used inside the sampler's scan body) -----------------------------------------


def head_mean_probs(
    probs: Float[Array, "heads q k"], step_norm: StepNorm = "none"
) -> Float[Array, "q k"]:
    """Mean over heads of one layer's attention probabilities, float32, optionally ``/max``.

    ``step_norm="max"`` is the per-(layer, step) term of SeeDiff Eq. 5, ``A / max(A)``: for a
    cross map (keys are text tokens, ``q != k``) each token's spatial map is divided by its own
    max, so the BOS token's large mass does not flatten the class tokens; a self map
    (``q == k``) is divided by its global max.
    """
    m = jnp.mean(probs.astype(jnp.float32), axis=0)
    if step_norm == "max":
        if m.shape[0] != m.shape[1]:  # cross-attention: one spatial map per token
            top = jnp.max(m, axis=0, keepdims=True)
            return jnp.where(top > _EPS, m / jnp.maximum(top, _EPS), 0.0)
        return normalize_max(m)
    return m


def class_cross(
    cross: Float[Array, "l r r t"],
    token_weights: Float[Array, "k t"],
    layer_norm: str = "none",
    heads: int = 1,
) -> Float[Array, "k r r"]:
    """One map per class: each layer normalised, layers summed, tokens weighted.

    ``token_weights`` rows average a class's token positions (see ``jaxmask.tokens``). With
    ``layer_norm="minmax_damped"`` and the class's token maps this is SeeDiff code step 1
    (per-layer min-max with the flat-layer guard on the sum of ``heads`` heads, see
    ``normalize_minmax_damped``) followed by the sum over layers.
    """
    if token_weights.ndim != 2 or token_weights.shape[1] != cross.shape[-1]:
        raise ValueError(
            f"token_weights must have shape (k, {cross.shape[-1]}), got {token_weights.shape}"
        )
    per_layer = jnp.einsum("lijt,kt->klij", cross, token_weights)
    norm = NORMALIZERS[layer_norm]
    if layer_norm == "minmax_damped":
        norm = functools.partial(normalize_minmax_damped, heads=heads)
    per_layer = jax.vmap(jax.vmap(norm))(per_layer)
    return jnp.sum(per_layer, axis=1)
