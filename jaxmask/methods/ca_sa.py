"""Dataset-Diffusion-style masks: self-attention to a power times cross-attention."""

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxmask.maps import AttentionMaps, CaptureSpec, Layout, normalize_minmax
from jaxmask.methods._common import check_fields, check_thresholds, side
from jaxmask.refine import resize


@dataclasses.dataclass(frozen=True)
class CASAConfig:
    """Dataset Diffusion (VinAIResearch/Dataset-Diffusion ``gen_data.py``).

    Attributes:
      cross_resolution: CA side; ``None`` = finest / 4 (16 for SD at 512 px).
      self_resolution: SA side; ``None`` = finest / 2 (32 for SD at 512 px).
      power: the self-attention exponent tau (4 in the code and SeeDiff's S3 comparison).
      upsample: CA upsampling to the SA side, and the soft masks' to the image (the code:
        ``F.interpolate(mode="bicubic")``, i.e. ``bicubic_cv2``; see ``jaxmask.refine.resize``).
      fg_threshold, ignore_threshold: 0.6 and 0.5 in the code; the band becomes 255.
    """

    name: str = "ca_sa"
    cross_resolution: int | None = None
    self_resolution: int | None = None
    power: int = 4
    upsample: Literal["bilinear", "bicubic", "bicubic_cv2"] = "bicubic_cv2"
    fg_threshold: float = 0.6
    ignore_threshold: float | None = 0.5

    def __post_init__(self):
        check_fields(self)
        check_thresholds(self.fg_threshold, self.ignore_threshold)
        if self.power < 1:
            raise ValueError(f"power must be >= 1, got {self.power}")

    def sides(self, resolutions) -> tuple[int, int]:
        resolutions = Layout.of(resolutions).sides
        cr = self.cross_resolution or side(
            resolutions, 4, "ca_sa cross-attention", "cross_resolution"
        )
        sr = self.self_resolution or side(resolutions, 2, "ca_sa self-attention", "self_resolution")
        for name, r in (("cross_resolution", cr), ("self_resolution", sr)):
            if r not in resolutions:
                raise ValueError(
                    f"ca_sa: {name}={r} but the model attends at {sorted(resolutions)}"
                )
        return cr, sr

    def capture_spec(self, resolutions) -> CaptureSpec:
        cr, sr = self.sides(resolutions)
        return CaptureSpec(cross=(cr,), self_attn=(sr,), self_layers="mean")

    def apply(self, maps, token_weights):
        return ca_sa(maps, token_weights, self)


CA_SA = CASAConfig()


def ca_sa(
    maps: AttentionMaps, token_weights: Float[Array, "k t"], cfg: CASAConfig = CA_SA
) -> Float[Array, "k r r"]:
    """Self-attention exponentiation times cross-attention, min-max per class.

    ``M_c = minmax( A_SA^tau . vec(up(mean_l A_CA[..., c])) )``

    computed as ``tau`` matrix-vector products (the same numbers as ``matrix_power`` followed
    by one product, at ``tau * n^2`` instead of ``(tau - 1) * n^3`` work).

    Args:
      maps: captured maps with CA at ``cross_resolution`` and layer-mean SA at
        ``self_resolution``.
      token_weights: ``(k, t)`` averaging weights.

    Returns:
      ``(k, r, r)`` soft masks in [0, 1] at the self-attention side.

    References: Dataset Diffusion ``gen_data.py`` steps 1-4; SeeDiff Table 5 row "CA x SA".
    """
    layout = maps.model_layout()
    if layout is not None:
        cr, sr = cfg.sides(layout)
    else:  # model sides unknown: SA at the finest captured side, CA at half of it
        sr = cfg.self_resolution or max(maps.self_attn, default=0)
        cr = cfg.cross_resolution or (
            sr // 2 if sr // 2 in maps.cross else min(maps.cross, default=0)
        )
    if maps.self_attn and maps.self_layers != "mean":
        raise ValueError("ca_sa needs layer-mean self-attention; capture with its CaptureSpec")
    cross = jnp.mean(maps.cross_at(cr), axis=0)  # (r, r, t)
    classes = jnp.einsum("ijt,kt->kij", cross, token_weights)
    classes = resize(classes, (sr, sr), cfg.upsample)
    self_attn = maps.self_at(sr)
    vec = classes.reshape(classes.shape[0], sr * sr).T  # (n, k)
    for _ in range(cfg.power):  # tau is small and static
        vec = self_attn @ vec
    out = vec.T.reshape(-1, sr, sr)
    return jax.vmap(normalize_minmax)(out)
