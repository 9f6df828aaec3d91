"""DiffuMask-style masks from cross-attention alone (the CA baseline of SeeDiff Table 5)."""

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxmask.maps import AttentionMaps, CaptureSpec, normalize_max
from jaxmask.methods._common import check_thresholds, finest
from jaxmask.refine import resize


@dataclasses.dataclass(frozen=True)
class CAConfig:
    """DiffuMask cross-attention masks.

    Attributes:
      resolutions: the cross-attention sides averaged; ``None`` = every captured side of at
        least ``finest / 4`` (16/32/64 for SD at 512 px, as DiffuMask's code).
      upsample: how each side's map is brought to the finest side (DiffuMask: bicubic).
      fg_threshold: soft value at and above which a pixel is the class (SeeDiff's CLI
        thresholds this map at 0.5).
      ignore_threshold: values in ``[ignore_threshold, fg_threshold)`` become 255.
    """

    name: str = "ca"
    resolutions: tuple[int, ...] | None = None
    upsample: Literal["bilinear", "bicubic"] = "bicubic"
    fg_threshold: float = 0.5
    ignore_threshold: float | None = None

    def __post_init__(self):
        check_thresholds(self.fg_threshold, self.ignore_threshold)

    def sides(self, resolutions) -> tuple[int, ...]:
        if self.resolutions is not None:
            missing = sorted(set(self.resolutions) - set(resolutions))
            if missing:
                raise ValueError(
                    f"ca: no attention at {missing}; the model has {sorted(resolutions)}"
                )
            return tuple(sorted(self.resolutions))
        top = finest(resolutions)
        return tuple(sorted(r for r in resolutions if r >= top // 4))

    def capture_spec(self, resolutions) -> CaptureSpec:
        return CaptureSpec(cross=self.sides(resolutions))

    def apply(self, maps, token_weights):
        return ca(maps, token_weights, self)


CA = CAConfig()


def _normalize_max_or_flat(m):
    """``m / max(m)``, but a map with no spatial contrast (a token that attends everywhere
    alike says nothing about where the class is) becomes all zeros instead of all ones."""
    flat = jnp.max(m) - jnp.min(m) <= 1e-6 * jnp.maximum(jnp.max(m), 1e-12)
    return jnp.where(flat, jnp.zeros_like(m), normalize_max(m))


def ca(
    maps: AttentionMaps, token_weights: Float[Array, "k t"], cfg: CAConfig = CA
) -> Float[Array, "k r r"]:
    """Cross-attention masks, DiffuMask's ``save_cross_attention`` (methods.md 3.1).

    Per side ``r``: the layer-mean map of every token is upsampled to the finest side and
    divided by its max; the sides are averaged; a class is the mean over its tokens:

    ``M_c = mean_{p in P_c} mean_r up(A_r[..., p]) / max(up(A_r[..., p]))``

    Args:
      maps: captured maps with cross-attention at ``cfg``'s sides.
      token_weights: ``(k, t)`` averaging weights from ``class_token_weights``.

    Returns:
      ``(k, R, R)`` soft masks in [0, 1] at the finest side ``R``; a token whose map is flat
      contributes zeros (the reference's ``/max`` would make it a full-image mask).

    References: DiffuMask ``parallel_generate_VOC_Attention_AnyClass.py``; SeeDiff Eq. 5
    (aggregation), Table 5 row "CA".
    """
    sides = cfg.sides(maps.resolutions or tuple(maps.cross))
    top = max(sides)
    per_side = []
    for r in sides:  # a handful of static sides
        tokens = jnp.mean(maps.cross_at(r), axis=0)  # (r, r, t): layer mean
        up = resize(jnp.moveaxis(tokens, -1, 0), (top, top), cfg.upsample)  # (t, R, R)
        per_side.append(jax.vmap(_normalize_max_or_flat)(up))
    token_maps = jnp.mean(jnp.stack(per_side), axis=0)
    soft = jnp.einsum("tij,kt->kij", token_maps, token_weights)
    return jnp.clip(soft, 0.0, 1.0)
