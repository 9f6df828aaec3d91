"""Stable Diffusion 1.x / 2.x in JAX: checkpoint loading, CLIP text encoder, tokenizer, sampler.

Importing any ``ports.sd`` module silences diffusers 0.39's Flax deprecation message ("Flax classes
are deprecated and will be removed in Diffusers v0.40.0"). It is a ``logger.warning`` in the
``setup`` of every diffusers Flax module and scheduler, so it would otherwise print once per module
each time a UNet is traced. Only that message is dropped; the loggers' other records pass.
"""

import logging

_FLAX_DEPRECATION = "Flax classes are deprecated"

# Every diffusers 0.39 module that logs the message (diffusers 0.40 removed them
# all; the list is final).
_DIFFUSERS_FLAX_LOGGERS = (
    "diffusers.models.attention_flax",
    "diffusers.models.controlnets.controlnet_flax",
    "diffusers.models.embeddings_flax",
    "diffusers.models.modeling_flax_utils",
    "diffusers.models.resnet_flax",
    "diffusers.models.unets.unet_2d_blocks_flax",
    "diffusers.models.unets.unet_2d_condition_flax",
    "diffusers.models.vae_flax",
    "diffusers.pipelines.pipeline_flax_utils",
    "diffusers.schedulers.scheduling_ddim_flax",
    "diffusers.schedulers.scheduling_ddpm_flax",
    "diffusers.schedulers.scheduling_dpmsolver_multistep_flax",
    "diffusers.schedulers.scheduling_euler_discrete_flax",
    "diffusers.schedulers.scheduling_karras_ve_flax",
    "diffusers.schedulers.scheduling_lms_discrete_flax",
    "diffusers.schedulers.scheduling_pndm_flax",
    "diffusers.schedulers.scheduling_sde_ve_flax",
    "diffusers.schedulers.scheduling_utils_flax",
)


class _DropFlaxDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_FLAX_DEPRECATION)


def silence_flax_deprecation() -> None:
    """Drop diffusers' Flax deprecation message from its loggers (idempotent; needs no diffusers
    import: ``logging.getLogger`` returns the same logger objects diffusers later writes to)."""
    for name in _DIFFUSERS_FLAX_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropFlaxDeprecation) for f in logger.filters):
            logger.addFilter(_DropFlaxDeprecation())


silence_flax_deprecation()
