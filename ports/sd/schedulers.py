"""Noise schedulers for the sampler: diffusers 0.39's Flax DDIM, PNDM and DPM-Solver++ by name.

``make(name, scheduler_config)`` builds the diffusers Flax scheduler from the checkpoint's
``scheduler/scheduler_config.json`` (whatever scheduler class the checkpoint ships: its beta
schedule, ``steps_offset``, ``prediction_type``, ... carry over, exactly as
``DDIMScheduler.from_config(pipe.scheduler.config)`` does in PyTorch), with its state in float32
whatever the model's dtype (bf16 scheduler state accumulates errors; HF's SDXL-on-TPU notes). The
scheduler objects are pure: their ``create_state`` / ``set_timesteps`` / ``scale_model_input`` /
``step`` trace into the sampler's jit.

| name      | diffusers class                     | UNet calls for ``steps``                      |
|-----------|-------------------------------------|-----------------------------------------------|
| ``ddim``  | ``FlaxDDIMScheduler`` (eta 0)       | ``steps``                                     |
| ``pndm``  | ``FlaxPNDMScheduler``               | ``steps + 1`` with ``skip_prk_steps`` (SD's   |
|           |                                     | config), else ``steps + 9`` (Runge-Kutta)     |
| ``dpm++`` | ``FlaxDPMSolverMultistepScheduler`` | ``steps`` (``solver_order`` 2 unless the      |
|           |                                     | config says otherwise; ``dpmsolver++``)       |

``num_model_calls`` gives the number of UNet evaluations (the sampler's scan length); capture step
windows (``CaptureSpec.steps_mask``) count those, like the reference codes' ``cur_step`` does.

.. warning::
   The Flax schedulers implement a subset of the PyTorch ones' options. Options that would silently
   change the result (e.g. ``timestep_spacing="trailing"`` for DDIM, Karras sigmas) raise
   ``ValueError``. DPM-Solver++'s last step goes to timestep 0 as PyTorch's
   ``final_sigmas_type="sigma_min"`` does; PyTorch's default ``"zero"`` takes a last first-order
   step to sigma 0 instead, so against the PyTorch default the final image differs slightly.

Example::

    scheduler = make("ddim", sd.scheduler_config)
    state = scheduler.set_timesteps(scheduler.create_state(), 50, latents.shape)
"""

import inspect
import math
import types
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

NAMES = ("ddim", "pndm", "dpm++")
_ALIASES = {"dpmsolver++": "dpm++", "dpm-solver++": "dpm++", "dpmpp": "dpm++"}

#: Stable Diffusion's DDIM scheduler config (SD 1.x / 2-base ``scheduler/scheduler_config.json``):
#: the ``scaled_linear`` beta schedule from 0.00085 to 0.012 over 1000 training steps, epsilon
#: prediction. Read-only; copy it (``dict(SD_DDIM_CONFIG)``) to pass or extend it.
SD_DDIM_CONFIG: Mapping[str, Any] = types.MappingProxyType(
    {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "epsilon",
    }
)

# Config values the Flax scheduler does not implement: {key: values it does implement}.
# A key missing from the checkpoint's config means the PyTorch default, which is always supported.
_SUPPORTED = {
    "ddim": {
        "timestep_spacing": ("leading",),
        "prediction_type": ("epsilon", "sample", "v_prediction"),
        "thresholding": (False,),
        "rescale_betas_zero_snr": (False,),
    },
    "pndm": {
        "timestep_spacing": ("leading",),
        "prediction_type": ("epsilon", "v_prediction"),
        "rescale_betas_zero_snr": (False,),
    },
    "dpm++": {
        "timestep_spacing": ("linspace", "leading", "trailing"),
        "algorithm_type": ("dpmsolver++",),
        "use_karras_sigmas": (False,),
        "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,),
        "use_lu_lambdas": (False,),
        "use_flow_sigmas": (False,),
        "euler_at_final": (False,),
        "rescale_betas_zero_snr": (False,),
        "variance_type": (None,),
        "lambda_min_clipped": (-math.inf,),
        "prediction_type": ("epsilon", "sample", "v_prediction"),
    },
}


def canonical_name(name: str) -> str:
    """``name`` as one of ``NAMES`` (case-insensitive; ``dpmsolver++`` is ``dpm++``)."""
    if not isinstance(name, str):
        raise TypeError(f"scheduler must be a name string, one of {NAMES}; got {name!r}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in NAMES:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {list(NAMES)}")
    return key


def make(name: str, scheduler_config: Mapping[str, Any]):
    """The diffusers Flax scheduler ``name``, configured from the checkpoint's scheduler config.

    Args:
      name: ``"ddim"``, ``"pndm"`` or ``"dpm++"`` (alias ``"dpmsolver++"``).
      scheduler_config: the checkpoint's ``scheduler_config.json`` as a dict (any scheduler class).

    Returns:
      A ``FlaxDDIMScheduler`` / ``FlaxPNDMScheduler`` / ``FlaxDPMSolverMultistepScheduler`` with
      float32 state.

    Raises:
      ValueError: an unknown name, or a config option the Flax scheduler does not implement.
    """
    from diffusers import (
        FlaxDDIMScheduler,
        FlaxDPMSolverMultistepScheduler,
        FlaxPNDMScheduler,
    )

    key = canonical_name(name)
    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    if key == "dpm++":
        # The name says which solver; a DPM-Solver checkpoint config may carry its own solver_order.
        config["algorithm_type"] = "dpmsolver++"
    for option, supported in _SUPPORTED[key].items():
        value = config.get(option, supported[0])
        if value is None and None not in supported:
            continue
        if value not in supported:
            raise ValueError(
                f"the checkpoint's scheduler config sets {option}={value!r}, which diffusers' "
                f"Flax {key} scheduler does not implement (it implements {option} in "
                f"{list(supported)}); choose another scheduler (one of {list(NAMES)}) or edit "
                "scheduler_config.json"
            )
    cls = {
        "ddim": FlaxDDIMScheduler,
        "pndm": FlaxPNDMScheduler,
        "dpm++": FlaxDPMSolverMultistepScheduler,
    }[key]
    # Options checked above that the Flax class does not take (at their default, so they change
    # nothing) would only make diffusers log "config attributes ... will be ignored".
    accepted = inspect.signature(cls.__init__).parameters
    for option in _SUPPORTED[key]:
        if option not in accepted:
            config.pop(option, None)
    return cls.from_config(config, dtype=jnp.float32)


def init_state(scheduler, num_steps: int, shape: tuple[int, ...]):
    """The state after ``set_timesteps(num_steps)`` for latents of ``shape`` (traceable)."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"steps must be a positive int, got {num_steps!r}")
    if _uses_prk(scheduler) and num_steps < scheduler.pndm_order:
        raise ValueError(
            f"PNDM with Runge-Kutta warm-up steps (skip_prk_steps=False) needs steps >= "
            f"{scheduler.pndm_order}, got {num_steps}"
        )
    return scheduler.set_timesteps(scheduler.create_state(), num_steps, tuple(shape))


def _uses_prk(scheduler) -> bool:
    return hasattr(scheduler, "pndm_order") and not scheduler.config.skip_prk_steps


def num_model_calls(scheduler, num_steps: int) -> int:
    """How many UNet evaluations ``num_steps`` inference steps take (PNDM takes more, see above)."""
    state = jax.eval_shape(lambda: init_state(scheduler, num_steps, (1,)))
    return int(state.timesteps.shape[0])


def step(scheduler, state, model_output, timestep, sample):
    """One scheduler step: ``(previous sample, new state)``, traceable inside ``lax.scan``."""
    out = scheduler.step(state, model_output, timestep, sample)
    return out.prev_sample, out.state
