"""SeeDiff: seeds from cross-attention, region expansion with self-attention, background
inversion (Park, Jo, Baik, AAAI), as building blocks composed in the paper's order
(Eq. 6 -> 12), with every paper-vs-code choice a named switch.

.. warning::
   The released code (BAIKLAB-Admin/SeeDiff ``seediff_app.py: save_cross_attention``,
   ``aggregate_attention``; docs/methods.md, SeeDiff) differs from the paper in these places.
   ``SEEDIFF_PAPER`` follows the paper, ``SEEDIFF_CODE`` the code:

   ==================  ==========================  =======================================
   switch              paper                       code
   ==================  ==========================  =======================================
   ``seed_rule``       ``alpha``: CA >= 0.5        ``otsu_squared``: CA^2 above Otsu
   ``otsu``            (no Otsu)                   ``cv2``: integer Otsu of uint16(255 CA^2)
   ``expansion``       ``mean_rows`` (Eq. 7)       ``cosine``: sum of cosine similarities
   ``self_layers``     ``mean`` over layers        ``first_up``: first decoder layer
   ``upsample``        ``bilinear`` (Eq. 8)        ``bicubic_cv2`` (cv2.INTER_CUBIC)
   ``background``      ``final`` (Eq. 10-11)       ``every_stage`` (from the 2nd side on)
   ``ca_layer_norm``   Eq. 5: per-step ``/max``    per-layer min-max, x0.01 when the head
                                                   sum's variance is <= 1e-4
   ==================  ==========================  =======================================

   Both min-max normalise every expanded map (the paper's Eq. 7 mean of attention rows is of
   order ``1/n`` and could never pass Eq. 9's ``alpha`` otherwise). ``SEEDIFF_CODE`` matches
   an independent numpy + OpenCV replay of the code on the same maps to ~1e-6 in the soft
   masks (``tests/core/test_parity_code.py``); what remains is float rounding, the order of
   exact Otsu ties (see ``threshold_otsu_levels``), and the fallbacks where the code divides
   0 by 0 (no seeds, no background seeds) and jaxmask returns zeros or keeps the map.
"""

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from jaxmask.maps import AttentionMaps, CaptureSpec, Layout, class_cross, normalize_minmax
from jaxmask.methods._common import (
    check_fields,
    check_thresholds,
    check_unit,
    nearest_side,
    side,
)
from jaxmask.refine import resize
from jaxmask.threshold import threshold_otsu, threshold_otsu_levels

SeedRule = Literal["alpha", "alpha_squared", "otsu_squared"]
Otsu = Literal["float", "cv2"]
Expansion = Literal["mean_rows", "cosine"]


@dataclasses.dataclass(frozen=True)
class SeeDiffConfig:
    """SeeDiff switches (see the module warning for what each preset picks).

    Attributes:
      seed_rule: ``alpha`` (Eq. 6/9: M >= alpha), ``alpha_squared`` (M^2 >= alpha, the code's
        dead "Origin Code" line), ``otsu_squared`` (M^2 above Otsu, the code's default).
      otsu: how ``otsu_squared`` thresholds: ``cv2`` (the code): OpenCV's Otsu on the integer
        levels ``uint16(255 * M^2)`` (one bin per level; bicubic overshoot above 255 stays
        distinct), a pixel is a seed where its level is above Otsu's; ``float``: a 256-bin
        float Otsu of ``M^2`` (scikit-image's ``threshold_otsu``).
      alpha: the seed threshold of the alpha rules.
      expansion: ``mean_rows`` (Eq. 7) or ``cosine`` (code: sum over seeds of the cosine
        similarity between attention rows).
      self_layers: self-attention source: layer ``mean`` or ``first_up`` decoder layer.
      upsample: ``bilinear`` (Eq. 8) or ``bicubic_cv2`` (code: ``cv2.INTER_CUBIC``; ``bicubic``
        is jax's a = -0.5 kernel, in no reference), between sides and to the image.
      background: ``final``: one inversion after the last expansion (Eq. 10-11);
        ``every_stage``: from the second side on, each stage is the upsampled previous mask
        refined by its background expansion, with no foreground expansion (code).
      ca_layer_norm: per-layer CA normalisation before the layer sum: ``minmax_damped`` (code:
        min-max, x0.01 when the variance of the layer's head sum is <= 1e-4; the head count
        comes from the maps' ``Layout``) or ``none`` (with ``step_norm="max"`` this is Eq. 5).
      step_norm: per-step normalisation at capture time (``max`` = Eq. 5).
      seed_resolution: CA side of the seeds; ``None`` = finest / 4 (16 for SD at 512 px; a
        UNet without attention there raises, naming this field) when that side has the
        self-attention layer ``self_layers`` reads, else the nearest side that has one (8 on a
        UNet whose finest / 4 side attends only in the mid block). The cascade is every side
        from there up that has that layer.
      beta: final threshold (Eq. 12; 0.3 in the paper and the demo, 0.5 in the CLI).
      ignore_threshold: optional lower edge of a 255 band (not in SeeDiff).
    """

    name: str = "seediff-code"
    seed_rule: SeedRule = "otsu_squared"
    otsu: Otsu = "cv2"
    alpha: float = 0.5
    expansion: Expansion = "cosine"
    self_layers: Literal["mean", "first_up"] = "first_up"
    upsample: Literal["bilinear", "bicubic", "bicubic_cv2"] = "bicubic_cv2"
    background: Literal["final", "every_stage"] = "every_stage"
    ca_layer_norm: Literal["none", "max", "minmax", "minmax_damped"] = "minmax_damped"
    step_norm: Literal["none", "max"] = "none"
    seed_resolution: int | None = None
    beta: float = 0.3
    ignore_threshold: float | None = None

    def __post_init__(self):
        check_fields(self)
        check_unit("alpha", self.alpha)
        check_thresholds(self.beta, self.ignore_threshold, fg_name="beta")

    @property
    def fg_threshold(self) -> float:
        return self.beta

    def sides(self, resolutions) -> tuple[int, ...]:
        """The cascade: the seed side, then every larger side with the self layer (16 -> 32 -> 64).

        ``resolutions``: the model's sides, or its ``Layout`` (which sides have a first
        up-block layer). Raises before any sampling, naming the parameter to set.
        """
        layout = Layout.of(resolutions)
        have = layout.self_sides(self.self_layers)
        kind = "first up-block " if self.self_layers == "first_up" else ""
        if not have:
            raise ValueError(
                f"{self.name}: the model has no side with a {kind}self-attention layer "
                f"(it attends at {list(layout.sides)}); set self_layers='mean'"
            )
        seed = self.seed_resolution
        if seed is None:
            # finest / 4 must attend; if not with this layer, the nearest side that does
            seed = side(layout.sides, 4, f"{self.name} seeds", "seed_resolution")
            seed = seed if seed in have else nearest_side(have, seed)
        elif seed not in have:
            raise ValueError(
                f"{self.name}: seed_resolution={seed} has no {kind}self-attention layer "
                f"(sides with one: {list(have)}; the model attends at {list(layout.sides)}); "
                "set seed_resolution to one of those sides"
            )
        return tuple(r for r in have if r >= seed)

    def capture_spec(self, resolutions) -> CaptureSpec:
        sides = self.sides(resolutions)
        return CaptureSpec(
            cross=(sides[0],),
            self_attn=sides,
            self_layers=self.self_layers,
            step_norm=self.step_norm,
        )

    def apply(self, maps, token_weights):
        return seediff(maps, token_weights, self)


SEEDIFF_CODE = SeeDiffConfig()
SEEDIFF_PAPER = SeeDiffConfig(
    name="seediff-paper",
    seed_rule="alpha",
    expansion="mean_rows",
    self_layers="mean",
    upsample="bilinear",
    background="final",
    ca_layer_norm="none",
    step_norm="max",
)


# --- building blocks ---------------------------------------------------------------------------


def seed_score(m: Float[Array, "r r"], rule: SeedRule, otsu: Otsu = "cv2") -> Float[Array, "r r"]:
    """What a seed rule thresholds: ``m`` (``alpha``), ``m**2`` (``alpha_squared``, and
    ``otsu_squared`` with ``otsu="float"``) or the code's levels ``floor(255 * m**2)`` (its
    ``(m*m*255).astype(np.uint16)``; ``otsu_squared`` with ``otsu="cv2"``)."""
    if rule == "alpha":
        return m
    squared = m * m
    if rule == "otsu_squared" and otsu == "cv2":
        return jnp.floor(jnp.clip(squared * 255.0, 0.0, 65535.0))
    return squared


def seed_threshold(
    m: Float[Array, "r r"], rule: SeedRule, alpha: float, otsu: Otsu = "cv2"
) -> Float[Array, ""]:
    """The value the rule's ``seed_score`` must exceed (Otsu) or reach (alpha); returns it,
    the caller applies it.

    ``otsu_squared``: Otsu of the score, OpenCV's integer Otsu (``threshold_otsu_levels``)
    for ``otsu="cv2"``, a 256-bin float Otsu (``threshold_otsu``) for ``"float"``.
    """
    if rule == "otsu_squared":
        score = seed_score(m, rule, otsu)
        if otsu == "cv2":
            return threshold_otsu_levels(score).astype(jnp.float32)
        return threshold_otsu(score)
    return jnp.asarray(alpha, jnp.float32)


def initial_seeds(
    m: Float[Array, "r r"], rule: SeedRule, alpha: float, otsu: Otsu = "cv2"
) -> Bool[Array, "r r"]:
    """Seeds of a normalised map: Eq. 6 / Eq. 9 (``alpha``) or the code's Otsu rule.

    ``alpha`` rules are inclusive (``>=``, Eq. 6); Otsu is strict (``>``, cv2.THRESH_BINARY).
    A flat map has no seeds under Otsu (its levels are all 0, its threshold 0).

    >>> initial_seeds(jnp.array([[0.1, 0.9], [0.6, 0.2]]), "alpha", 0.5).tolist()
    [[False, True], [True, False]]
    """
    score, thr = seed_score(m, rule, otsu), seed_threshold(m, rule, alpha, otsu)
    return score > thr if rule == "otsu_squared" else score >= thr


def background_seeds(
    m: Float[Array, "r r"], rule: SeedRule, alpha: float, otsu: Otsu = "cv2"
) -> Bool[Array, "r r"]:
    """Background seeds: Eq. 10's inverted map thresholded like Eq. 9 (``alpha``:
    ``1 - m >= alpha``) or, for the code, the pixels at or below Otsu of ``m^2``
    (``1 - ca_map_mask``)."""
    if rule == "alpha":
        return (1.0 - m) >= alpha
    return ~initial_seeds(m, rule, alpha, otsu)


def expand(
    self_attn: Float[Array, "n n"], seeds: Bool[Array, "r r"], op: Expansion
) -> Float[Array, "r r"]:
    """Region expansion of a seed set with self-attention, min-max normalised.

    ``mean_rows`` (Eq. 7): ``M'[j] = 1/|S| sum_{s in S} A[s, j]``.
    ``cosine`` (code): ``M'[j] = sum_{s in S} cos(A[j, :], A[s, :])``, vectorised as
    ``Ahat @ (Ahat^T 1_S)`` with row-normalised ``Ahat`` (one mat-vec, not a loop over seeds).

    An empty seed set gives an all-zero map (never NaN).
    """
    r = seeds.shape[0]
    if self_attn.shape != (r * r, r * r):
        raise ValueError(
            f"self-attention must be ({r * r}, {r * r}) for {r}x{r} seeds, got {self_attn.shape}"
        )
    s = seeds.reshape(-1).astype(jnp.float32)
    dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)  # no TF32 on GPUs
    if op == "mean_rows":
        out = dot(s, self_attn) / jnp.maximum(jnp.sum(s), 1.0)
    else:
        norms = jnp.linalg.norm(self_attn, axis=1, keepdims=True)
        unit = self_attn / jnp.maximum(norms, 1e-12)
        out = dot(unit, dot(unit.T, s))
    return normalize_minmax(out.reshape(r, r))


def invert_background(
    m: Float[Array, "r r"], self_attn: Float[Array, "n n"], cfg: SeeDiffConfig
) -> Float[Array, "r r"]:
    """Mask refinement with the background mask (Eq. 10-11):
    ``M_final = minmax((1 - minmax(M_bg)) * minmax(M))`` with ``M_bg`` the expansion of the
    background seeds of ``m``.

    No background seeds (the mask covers everything) leaves ``minmax(m)`` unchanged instead of
    zeroing it (the code would divide 0 by 0).
    """
    bg_seeds = background_seeds(m, cfg.seed_rule, cfg.alpha, cfg.otsu)
    bg = expand(self_attn, bg_seeds, cfg.expansion)
    keep = jnp.where(jnp.any(bg_seeds), 1.0 - bg, 1.0)
    return normalize_minmax(keep * normalize_minmax(m))


def seediff_one(
    seed_map: Float[Array, "r0 r0"], self_attn: dict, sides: tuple[int, ...], cfg: SeeDiffConfig
) -> Float[Array, "R R"]:
    """The cascade for one class: seeds (Eq. 6) -> expand (Eq. 7) -> upsample (Eq. 8) ->
    re-seed (Eq. 9) ... -> background inversion (Eq. 10-11) at the finest side."""
    m = normalize_minmax(seed_map)
    seeds = initial_seeds(m, cfg.seed_rule, cfg.alpha, cfg.otsu)
    m = expand(self_attn[sides[0]], seeds, cfg.expansion)
    for r in sides[1:]:  # 2 static stages for SD (32, 64)
        m = resize(m, (r, r), cfg.upsample)
        if cfg.background == "every_stage":
            m = invert_background(m, self_attn[r], cfg)
        else:
            seeds = initial_seeds(m, cfg.seed_rule, cfg.alpha, cfg.otsu)
            m = expand(self_attn[r], seeds, cfg.expansion)
    if cfg.background == "final":
        m = invert_background(m, self_attn[sides[-1]], cfg)
    return m


def seediff(
    maps: AttentionMaps, token_weights: Float[Array, "k t"], cfg: SeeDiffConfig = SEEDIFF_CODE
) -> Float[Array, "k R R"]:
    """SeeDiff soft masks for every class, before the final upsampling and Eq. 12's threshold.

    Args:
      maps: cross-attention at the seed side (per layer) and self-attention at every cascade
        side, captured with ``cfg.capture_spec`` (``self_layers`` must match).
      token_weights: ``(k, t)`` averaging weights from ``class_token_weights``.

    Returns:
      ``(k, R, R)`` soft masks in [0, 1] at the finest side ``R``. A class whose seed map is
      flat (no seeds) gets an all-zero mask.

    References: SeeDiff Eq. 5-12; BAIKLAB-Admin/SeeDiff ``seediff_app.py: save_cross_attention``
    / ``aggregate_attention``.
    """
    if maps.self_attn and maps.self_layers != cfg.self_layers:
        raise ValueError(
            f"{cfg.name} needs self-attention from {cfg.self_layers!r} layers but the maps hold "
            f"{maps.self_layers!r}; capture with the method's CaptureSpec"
        )
    layout = maps.model_layout()
    if layout is not None:
        sides = cfg.sides(layout)
    else:  # model sides unknown: seeds at the coarsest captured CA side, every SA side above
        seed = cfg.seed_resolution or min(maps.cross, default=0)
        sides = tuple(sorted(r for r in maps.self_attn if r >= seed)) or (seed,)
    heads = layout.heads_at(sides[0]) if layout is not None else 1
    seed_maps = class_cross(maps.cross_at(sides[0]), token_weights, cfg.ca_layer_norm, heads)
    self_attn = {r: maps.self_at(r) for r in sides}
    return jax.vmap(lambda c: seediff_one(c, self_attn, sides, cfg))(seed_maps)
