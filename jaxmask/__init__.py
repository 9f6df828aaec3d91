"""jaxmask: segmentation masks from Stable Diffusion's own attention, as pure JAX functions.

The core (this package) is pure: functions on ONE example's arrays, jit-able, batched with
``jax.vmap``. ``jaxmask.generate`` and ``jaxmask.load`` are reached lazily through
``ports.api`` (the one sanctioned edge from the core to the shell, see docs/architecture.md).
"""

from jaxmask import augment, labels, maps, methods, metrics, refine, synthetic, threshold, tokens
from jaxmask.labels import VOC_PALETTE, colorize, label_map
from jaxmask.maps import (
    AttentionMaps,
    CaptureSpec,
    Layout,
    class_cross,
    head_mean_probs,
    normalize_max,
    normalize_minmax,
    normalize_minmax_damped,
)
from jaxmask.masks import check_maps, extract_masks, mask_confidence
from jaxmask.methods import ca, ca_sa, seediff
from jaxmask.metrics import confusion_matrix, iou, mean_iou
from jaxmask.refine import PAMR_DEFAULT, PAMR_SEEDIFF, PAMRConfig, pamr, resize
from jaxmask.threshold import threshold_otsu, threshold_otsu_levels
from jaxmask.tokens import class_token_weights, match_tokens, token_positions, weights_from_matches

__version__ = "0.1.0"

__all__ = [
    "augment",
    "labels",
    "maps",
    "methods",
    "metrics",
    "refine",
    "synthetic",
    "threshold",
    "tokens",
    "VOC_PALETTE",
    "colorize",
    "label_map",
    "AttentionMaps",
    "CaptureSpec",
    "Layout",
    "class_cross",
    "head_mean_probs",
    "normalize_max",
    "normalize_minmax",
    "normalize_minmax_damped",
    "check_maps",
    "extract_masks",
    "mask_confidence",
    "ca",
    "ca_sa",
    "seediff",
    "confusion_matrix",
    "iou",
    "mean_iou",
    "PAMR_DEFAULT",
    "PAMR_SEEDIFF",
    "PAMRConfig",
    "pamr",
    "resize",
    "threshold_otsu",
    "threshold_otsu_levels",
    "class_token_weights",
    "match_tokens",
    "token_positions",
    "weights_from_matches",
    "generate",
    "load",
    "Pipeline",
    "GenerateResult",
]

_LAZY = ("generate", "load", "Pipeline", "GenerateResult")


def __getattr__(name):
    if name in _LAZY:
        import ports.api  # the shell; imported only when the facade is used

        return getattr(ports.api, name)
    raise AttributeError(f"module 'jaxmask' has no attribute {name!r}")
