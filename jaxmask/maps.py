"""Attention maps: the pytree the sampler fills and the mask methods read, and the
per-map aggregation and normalisation steps of the reference codes.

Dimension letters (project-wide): ``r`` attention side, ``n = r*r``, ``t`` text tokens,
``l`` layers at one resolution, ``k`` classes, ``h w`` pixels.
"""

import dataclasses
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
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
    """

    cross: dict[int, Float[Array, "l r r t"]]
    self_attn: dict[int, Float[Array, "n n"]]
    self_layers: str = flax.struct.field(pytree_node=False, default="mean")
    resolutions: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())

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
                f"no self-attention captured at resolution {r}; captured: {sorted(self.self_attn)}. "
                "Capture with the method's CaptureSpec."
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
    m: Float[Array, "..."], var_floor: float = 1e-4, damping: float = 0.01
) -> Float[Array, "..."]:
    """Min-max, then ``x damping`` when ``var(m) <= var_floor`` (SeeDiff code: flat layers muted).

    Reference: SeeDiff ``seediff_app.py: aggregate_attention`` per-layer CA normalisation.
    """
    scale = jnp.where(jnp.var(m) <= var_floor, damping, 1.0)
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
    cross: Float[Array, "l r r t"], token_weights: Float[Array, "k t"], layer_norm: str = "none"
) -> Float[Array, "k r r"]:
    """One map per class: each layer normalised, layers summed, tokens weighted.

    ``token_weights`` rows average a class's token positions (see ``jaxmask.tokens``). With
    ``layer_norm="minmax_damped"`` and the class's token maps this is SeeDiff code step 1
    (per-layer min-max with the flat-layer guard) followed by the sum over layers.
    """
    if token_weights.ndim != 2 or token_weights.shape[1] != cross.shape[-1]:
        raise ValueError(
            f"token_weights must have shape (k, {cross.shape[-1]}), got {token_weights.shape}"
        )
    per_layer = jnp.einsum("lijt,kt->klij", cross, token_weights)
    norm = NORMALIZERS[layer_norm]
    per_layer = jax.vmap(jax.vmap(norm))(per_layer)
    return jnp.sum(per_layer, axis=1)
