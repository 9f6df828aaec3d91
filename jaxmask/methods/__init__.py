"""Mask methods: a typed registry from name to a frozen config whose ``apply`` is the method.

Each method is a pure function ``(maps, token_weights, cfg) -> soft masks (k, r, r)`` in
[0, 1] at the finest captured resolution, for ONE example. A config also says what to
capture (``capture_spec``) and how its soft masks become labels (``fg_threshold``,
``ignore_threshold``).

| name            | what                                                                 |
|-----------------|----------------------------------------------------------------------|
| ``ca``          | DiffuMask-style cross-attention, max-normalised, mean over 16/32/64    |
| ``ca_sa``       | Dataset Diffusion: self-attention^tau times upsampled cross-attention  |
| ``seediff-paper`` | SeeDiff as the paper writes it (Eq. 6-12)                          |
| ``seediff-code``  | SeeDiff as its released code runs it (docs/methods.md, SeeDiff)    |
"""

import dataclasses

from jaxmask.methods.ca import CA, CAConfig, ca
from jaxmask.methods.ca_sa import CA_SA, CASAConfig, ca_sa
from jaxmask.methods.seediff import (
    SEEDIFF_CODE,
    SEEDIFF_PAPER,
    SeeDiffConfig,
    background_seeds,
    expand,
    initial_seeds,
    invert_background,
    seed_score,
    seed_threshold,
    seediff,
)

MethodConfig = CAConfig | CASAConfig | SeeDiffConfig

PRESETS: dict[str, MethodConfig] = {
    "ca": CA,
    "ca_sa": CA_SA,
    "seediff-paper": SEEDIFF_PAPER,
    "seediff-code": SEEDIFF_CODE,
}


def get(name: str, **overrides) -> MethodConfig:
    """The preset called ``name``, with fields replaced by ``overrides``.

    >>> get("seediff-code", beta=0.5).beta
    0.5
    """
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]
    if overrides:
        fields = {f.name for f in dataclasses.fields(cfg)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(
                f"method {name!r} has no parameter(s) {unknown}; it has {sorted(fields)}"
            )
        cfg = dataclasses.replace(cfg, **overrides)
    return cfg


__all__ = [
    "CA",
    "CA_SA",
    "SEEDIFF_CODE",
    "SEEDIFF_PAPER",
    "PRESETS",
    "MethodConfig",
    "CAConfig",
    "CASAConfig",
    "SeeDiffConfig",
    "ca",
    "ca_sa",
    "seediff",
    "get",
    "background_seeds",
    "expand",
    "initial_seeds",
    "invert_background",
    "seed_score",
    "seed_threshold",
]
