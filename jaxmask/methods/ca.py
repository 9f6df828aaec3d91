"""DiffuMask-style masks from cross-attention alone (the CA baseline of SeeDiff Table 5)."""

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxmask.maps import AttentionMaps, CaptureSpec, Layout
from jaxmask.methods._common import check_fields, check_thresholds, finest
from jaxmask.refine import resize


@dataclasses.dataclass(frozen=True)
class CAConfig:
    """DiffuMask cross-attention masks.

    Attributes:
      resolutions: the cross-attention sides averaged; ``None`` = every captured side of at
        least ``finest / 4`` (16/32/64 for SD at 512 px, as DiffuMask's code).
      upsample: how each side's map is brought to the side it is normalised at, and the
        masks to the image (DiffuMask: ``cv2.resize(INTER_CUBIC)``, i.e. ``bicubic_cv2``).
      normalize_at: where every map is upsampled to before its ``/max``: ``image`` (DiffuMask's
        code: each side straight to the 512 px image) or ``finest``, the finest attention side
        (64 for SD at 512 px; cheaper, but the max of a bicubic map at 64 is not its max at
        512, and masks differ: mean IoU 0.96 with the code's on random scenes).
      fg_threshold: soft value at and above which a pixel is the class (SeeDiff's CLI
        thresholds this map at 0.5).
      ignore_threshold: values in ``[ignore_threshold, fg_threshold)`` become 255.
    """

    name: str = "ca"
    resolutions: tuple[int, ...] | None = None
    upsample: Literal["bilinear", "bicubic", "bicubic_cv2"] = "bicubic_cv2"
    normalize_at: Literal["image", "finest"] = "image"
    fg_threshold: float = 0.5
    ignore_threshold: float | None = None

    def __post_init__(self):
        check_fields(self)
        check_thresholds(self.fg_threshold, self.ignore_threshold)

    def sides(self, resolutions) -> tuple[int, ...]:
        resolutions = Layout.of(resolutions).sides
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

    def apply(self, maps, token_weights, size: tuple[int, int] | None = None):
        return ca(maps, token_weights, self, size)


CA = CAConfig()


def _token_scales(
    tokens: Float[Array, "t r r"], size: tuple[int, int], method: str
) -> Float[Array, " t"]:
    """``1 / max(up(A_t))`` per token at ``size``, 0 for a map with no spatial contrast
    (a token that attends everywhere alike says nothing about where the class is).

    One token at a time (``lax.map``): at the image side (512) all 77 maps at once would take
    80 MB per attention side and image.
    """

    def scale(a):
        up = resize(a, size, method)
        hi, lo = jnp.max(up), jnp.min(up)
        flat = (hi - lo <= 1e-6 * jnp.maximum(hi, 1e-12)) | (hi <= 1e-12)
        return jnp.where(flat, 0.0, 1.0 / jnp.maximum(hi, 1e-12))

    return jax.lax.map(scale, tokens)


def ca(
    maps: AttentionMaps,
    token_weights: Float[Array, "k t"],
    cfg: CAConfig = CA,
    size: tuple[int, int] | None = None,
) -> Float[Array, "k h w"]:
    """Cross-attention masks, DiffuMask's ``save_cross_attention``.

    Per side ``r``: the layer-mean map of every token is upsampled to ``(h, w)`` and divided
    by its max; the sides are averaged; a class is the mean over its tokens:

    ``M_c = mean_{p in P_c} mean_r up(A_r[..., p]) / max(up(A_r[..., p]))``

    Resizing is linear, so this is computed as ``mean_r up(sum_p w_cp A_r[..., p] / max_p)``:
    only each token's max is taken at ``(h, w)``.

    Args:
      maps: captured maps with cross-attention at ``cfg``'s sides.
      token_weights: ``(k, t)`` averaging weights from ``class_token_weights``.
      size: the image size ``(h, w)`` (static), where ``normalize_at="image"`` normalises;
        ``None`` (or ``normalize_at="finest"``): the finest attention side ``R``.

    Returns:
      ``(k, h, w)`` soft masks in [0, 1]; a token whose map is flat contributes zeros (the
      reference's ``/max`` would make it a full-image mask), and bicubic undershoot below 0
      is clipped (the reference keeps it; no threshold in [0, 1] sees the difference).

    References: weijiawu/DiffuMask ``Stable_Diffusion/parallel_generate_VOC_Attention_AnyClass.py:
    save_cross_attention``; SeeDiff Eq. 5 (aggregation), Table 5 row "CA".
    """
    layout = maps.model_layout()
    sides = cfg.sides(layout if layout is not None else tuple(maps.cross))
    if size is None or cfg.normalize_at == "finest":
        size = (max(sides), max(sides))
    per_side = []
    for r in sides:  # a handful of static sides
        tokens = jnp.moveaxis(jnp.mean(maps.cross_at(r), axis=0), -1, 0)  # (t, r, r): layer mean
        scaled = token_weights * _token_scales(tokens, size, cfg.upsample)[None, :]
        per_side.append(resize(jnp.einsum("tij,kt->kij", tokens, scaled), size, cfg.upsample))
    soft = jnp.mean(jnp.stack(per_side), axis=0)
    return jnp.clip(soft, 0.0, 1.0)
