"""The Stable Diffusion sampler: one ``jax.jit`` from token ids to images and attention maps.

    text    = CLIP([negative ids; ids])                    (2b, 77, d): [unconditional; conditional]
    noise_i = N(0, I) from fold_in(key, item_id_i), x init_noise_sigma
    lax.scan over the scheduler's timesteps:               one UNet body, any step count
        eps_u, eps_c = UNet([x; x], t, text)               under intercept_attention
        x            = scheduler.step(eps_u + g (eps_c - eps_u), t, x)
        sums        += w_t * this step's maps              w_t from spec.steps_mask (no branch)
    images  = VAE.decode(x / scaling_factor) / 2 + 0.5, clipped to [0, 1]
    maps    = sums / number of captured steps              (AttentionMaps, one per item)

This is diffusers' ``StableDiffusionPipeline`` loop (same order of CFG halves,
``scale_model_input``, ``init_noise_sigma``, decode and post-processing), so on the same weights,
noise and guidance it gives the PyTorch pipeline's latents and images
(tests/ports/sd/test_sample.py). Compiles once per (batch size, image size, steps, scheduler,
capture spec); the key, the item ids, the guidance scale and the prompts are traced arguments, so a
new seed or prompt never recompiles. Each item's noise depends only on ``(key, item_id)``, never on
the batch it is in. Running sums of float32 maps sit in the scan carry (never stacked per step: a
64x64 self-attention map is 64 MiB per image); nothing leaves the device inside the loop.

Example::

    sampler = Sampler(sd)
    out = sampler(tokenize(sd.tokenizer, prompts), tokenize(sd.tokenizer, [""] * len(prompts)),
                  jax.random.key(0), steps=50, spec=CaptureSpec(cross=(16,)))
    out.images        # (b, h, w, 3) float32 in [0, 1]
    out.maps.cross    # {16: (b, l, 16, 16, 77)}
"""

import math
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxmask.maps import AttentionMaps, CaptureSpec
from ports import executables
from ports.errors import bad_arg, with_cli
from ports.sd import schedulers
from ports.sd.capture import MAPS, NOTHING, intercept_attention, step_maps

_VAE_SCALING = 0.18215  # SD 1.x / 2.x; a VAE config's scaling_factor wins


@flax.struct.dataclass
class Samples:
    """What one sampler call returns (device arrays, leading axis ``b``).

    Attributes:
      images: ``(b, h, w, 3)`` float32 in [0, 1] (``round(255 x)`` is diffusers' uint8 image).
      latents: ``(b, c, h/f, w/f)`` float32, the final latents before decoding (diffusers'
        ``output_type="latent"``).
      maps: ``AttentionMaps`` with a leading ``b`` on every array (``jax.vmap`` over it); empty
        dicts when the spec captures nothing; a tuple of them, one per spec, when the spec was a
        tuple.
    """

    images: jax.Array
    latents: jax.Array
    maps: AttentionMaps


def check_steps(steps, trained: int | None = None) -> int:
    """``steps`` as an int in ``[1, trained]`` (the scheduler's training timesteps, when known):
    more steps than the model was trained with repeat timestep 1 and sample noise."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise bad_arg("steps", f"{{}} must be a whole number of denoising steps, got {steps!r}")
    if steps < 1 or (trained is not None and steps > trained):
        bound = f"[1, {trained}] (the scheduler's training timesteps)" if trained else ">= 1"
        raise bad_arg("steps", f"{{}} must lie in {bound}, got {steps}")
    return int(steps)


def check_guidance(guidance) -> float:
    """``guidance`` as a finite float >= 0 (1 is no guidance; SD's usual is 7.5)."""
    number = isinstance(guidance, (int, float, np.integer, np.floating))
    if isinstance(guidance, bool) or not number or not math.isfinite(guidance) or guidance < 0:
        raise bad_arg(
            "guidance", f"{{}} must be a finite number >= 0 (1: no guidance), got {guidance!r}"
        )
    return float(guidance)


def available_memory() -> int | None:
    """Bytes one device can hold: the accelerator's limit, or the host's available RAM on CPU."""
    device = jax.local_devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        return stats.get("bytes_limit")
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None


def initial_noise(key: jax.Array, item_ids: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Each item's starting noise: ``N(0, I)`` of ``shape`` from ``fold_in(key, item_id)``, float32.

    Args:
      key: a PRNG key (``jax.random.key(seed)`` or ``jax.random.PRNGKey(seed)``).
      item_ids: ``(b,)`` int, the items' global indices.
      shape: one item's latent shape ``(c, h/f, w/f)``.

    Returns:
      ``(b, *shape)`` float32; row ``i`` depends only on ``(key, item_ids[i])``.
    """
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32))(
        item_ids
    )


class Sampler:
    """The jitted sampler of one loaded model (``ports.sd.load.StableDiffusion``).

    The model's modules are static (held here), its params are arguments of the jitted function
    (never baked into the program). One ``Sampler`` per loaded model: its jit cache is the compile
    cache.
    """

    def __init__(self, sd, mesh=None):
        self.sd = sd
        self.mesh = mesh  # a ``ports.scale.mesh.data_mesh``: batches split over its "data" axis
        self._schedulers: dict[str, Any] = {}
        # kept on disk beside JAX's compilation cache: a later process skips tracing as well
        self._run = executables.Jit(
            self._sample,
            static_argnames=("steps", "side", "scheduler", "spec"),
            key=self._program_key,
            name="ports.sd.sample.Sampler",
        )

    def _program_key(self) -> dict:
        """What the sampler's program depends on beyond its arguments: the modules' configs (their
        reprs list every field), the scheduler config and the latent geometry."""
        sd = self.sd
        return {
            "unet": repr(sd.unet),
            "vae": repr(sd.vae),
            "text_encoder": repr(sd.text_encoder),
            "scheduler": sd.scheduler_config,
            "latent": [sd.latent_channels, sd.vae_scale_factor, jnp.dtype(sd.dtype).name],
        }

    def scheduler(self, name: str):
        """The diffusers Flax scheduler ``name`` for this checkpoint (built once, then reused)."""
        key = schedulers.canonical_name(name)
        if key not in self._schedulers:
            self._schedulers[key] = schedulers.make(key, self.sd.scheduler_config)
        return self._schedulers[key]

    def num_model_calls(self, steps: int, scheduler: str = "ddim") -> int:
        """UNet evaluations (scan length) of ``steps`` steps: what ``spec.steps_mask`` counts."""
        return schedulers.num_model_calls(self.scheduler(scheduler), steps)

    def native_size(self) -> int:
        """The image side the UNet was trained at: ``sample_size x vae_scale_factor``."""
        return int(self.sd.unet.sample_size) * self.sd.vae_scale_factor

    def cache_size(self) -> int:
        """How many programs the jitted sampler has compiled (for no-recompile tests)."""
        return self._run.cache_size()

    def check(
        self,
        b: int,
        *,
        steps: int = 50,
        guidance: float = 7.5,
        scheduler: str = "ddim",
        size: int | None = None,
        spec: CaptureSpec | tuple[CaptureSpec, ...] = NOTHING,
    ) -> tuple[int, str]:
        """Validate one call's arguments without compiling anything: ``(size, scheduler name)``.

        Raises:
          ValueError: steps outside ``[1, num_train_timesteps]`` (more steps than the model was
            trained with repeat timestep 1: pure noise), a negative or non-finite guidance, an
            unknown scheduler, an image size the UNet cannot take, a spec this UNet cannot fill,
            or a batch and size whose attention would not fit in memory (see
            :meth:`memory_estimate`).
        """
        check_steps(steps, int(self.sd.scheduler_config.get("num_train_timesteps", 1000)))
        check_guidance(guidance)
        size = self.native_size() if size is None else int(size)
        resolutions = self.sd.attention_resolutions(size, size)  # validates the size
        name = schedulers.canonical_name(scheduler)
        calls = self.num_model_calls(steps, name)
        if spec == ():
            raise ValueError("spec is an empty tuple; pass CaptureSpec() to capture nothing")
        for one in spec if isinstance(spec, tuple) else (spec,):
            missing = sorted((set(one.cross) | set(one.self_attn)) - set(resolutions))
            if missing:
                raise ValueError(
                    f"the capture spec asks for resolution(s) {missing}, but at {size}x{size} px "
                    f"this UNet attends at {list(resolutions)}; build the spec from these "
                    "resolutions"
                )
            if _captures(one) and not any(one.steps_mask(calls)):
                raise ValueError(
                    f"the spec's step window {one.step_window} (every {one.every}) selects none "
                    f"of the {calls} denoising steps; widen the window or take more steps"
                )
        need, have = self.memory_estimate(b, size, spec), available_memory()
        if have is not None and need > have:
            text = (
                f"{b} image(s) of {size} px need at least {need / 2**30:.1f} GiB (attention "
                f"and weights), more than the {have / 2**30:.1f} GiB this device has; lower {{}}"
            )
            raise with_cli(
                ValueError(text.format("the batch size or the image size")),
                text.format("--batch-size or --size"),
            )
        return size, name

    def memory_estimate(
        self, b: int, size: int, spec: CaptureSpec | tuple[CaptureSpec, ...] = NOTHING
    ) -> int:
        """A lower bound on one sampler call's peak memory in bytes, from the shapes alone.

        The terms that grow fastest: the self-attention scores at the finest side for both CFG
        branches (``2b x heads x n^2``, ``n = side^2`` tokens, in the compute dtype), the captured
        self maps (``b x n^2`` float32 per captured side) and the params. It is an estimate to
        refuse what cannot fit before compiling; XLA needs more than this.
        """
        sd = self.sd
        layout = sd.attention_layout(size, size)
        itemsize = jnp.dtype(sd.dtype).itemsize
        top = max(layout.sides)
        scores = 2 * b * layout.heads_at(top) * top**4 * itemsize
        captured = sum(
            b * r**4 * 4
            for one in (spec if isinstance(spec, tuple) else (spec,))
            for r in one.self_attn
        )
        params = sum(
            x.size * x.dtype.itemsize
            for x in jax.tree.leaves((sd.unet_params, sd.vae_params, sd.text_params))
        )
        return int(scores + captured + params)

    def __call__(
        self,
        ids,
        negative_ids,
        key: jax.Array,
        *,
        item_ids=None,
        steps: int = 50,
        guidance: float = 7.5,
        scheduler: str = "ddim",
        size: int | None = None,
        spec: CaptureSpec | tuple[CaptureSpec, ...] = NOTHING,
        mesh=None,
    ) -> Samples:
        """Sample ``b`` images and their attention maps.

        Args:
          ids: ``(b, 77)`` int token ids of the prompts (``ports.sd.tokenizer.tokenize``).
          negative_ids: ``(b, 77)`` token ids of the negative prompts (``""`` for plain CFG).
          key: a PRNG key; traced, so a new key does not recompile.
          item_ids: ``(b,)`` global item indices for the noise (default ``0..b-1``).
          steps: inference steps (PNDM evaluates the UNet ``steps + 1`` times, see ``schedulers``).
          guidance: classifier-free guidance scale (traced).
          scheduler: ``"ddim"``, ``"pndm"`` or ``"dpm++"``.
          size: square image side in pixels (default: the model's native size); a multiple of
            ``vae_scale_factor * 2 ** (down blocks - 1)``.
          spec: what to capture (static); a tuple of specs captures for each in the same run
            (``Samples.maps`` is then a tuple of ``AttentionMaps``, one per spec).
          mesh: a ``ports.scale.mesh.data_mesh`` to split the batch over its "data" axis (data
            parallel; default: the one this sampler was built with, if any).

        Returns:
          ``Samples``.

        Raises:
          ValueError: mismatched id shapes, an image size the UNet cannot take, a spec naming a side
            the UNet does not attend at, or a step window that selects no step.
        """
        ids = np.asarray(ids, np.int32)
        negative_ids = np.asarray(negative_ids, np.int32)
        if ids.ndim != 2 or negative_ids.shape != ids.shape:
            raise ValueError(
                "ids and negative_ids must both have shape (b, 77); "
                f"got {ids.shape} and {negative_ids.shape}"
            )
        b = ids.shape[0]
        if item_ids is None:
            item_ids = np.arange(b, dtype=np.int32)
        item_ids = jnp.asarray(item_ids, jnp.int32)
        if item_ids.shape != (b,):
            raise ValueError(f"item_ids must have shape ({b},), got {item_ids.shape}")
        size, name = self.check(
            b, steps=steps, guidance=guidance, scheduler=scheduler, size=size, spec=spec
        )
        sd = self.sd
        params = {"unet": sd.unet_params, "vae": sd.vae_params, "text": sd.text_params}
        batch = (ids, negative_ids, item_ids)
        mesh = self.mesh if mesh is None else mesh
        if mesh is not None:  # data parallel: inputs split on "data", the jit follows them
            from ports.scale.mesh import shard_batch

            batch = shard_batch(batch, mesh)
        return self._run(
            params,
            *batch,
            key,
            jnp.float32(guidance),
            steps=int(steps),
            side=size // sd.vae_scale_factor,
            scheduler=name,
            spec=spec,
        )

    # ------------------------------------------------------------------------------------ traced

    def _sample(
        self, params, ids, negative_ids, item_ids, key, guidance, *, steps, side, scheduler, spec
    ):
        sd = self.sd
        sched = self.scheduler(scheduler)
        b = ids.shape[0]
        latent_shape = (sd.latent_channels, side, side)

        text = sd.text_encoder.apply(
            {"params": params["text"]}, jnp.concatenate([negative_ids, ids])
        )
        state = schedulers.init_state(sched, steps, (b, *latent_shape))
        latents = initial_noise(key, item_ids, latent_shape) * state.init_noise_sigma
        several = isinstance(spec, tuple)
        specs = spec if several else (spec,)
        masks = [one.steps_mask(state.timesteps.shape[0]) for one in specs]
        weights = jnp.asarray(masks, jnp.float32).T  # (steps, specs)

        def denoise(latents, t, state, weight):
            x = sched.scale_model_input(state, jnp.concatenate([latents, latents]), t)
            gates = tuple(weight[g] for g in range(len(specs))) if several else weight[0]
            with intercept_attention(spec, weight=gates):
                out, variables = sd.unet.apply(
                    {"params": params["unet"]},
                    x.astype(sd.dtype),
                    jnp.broadcast_to(t, (2 * b,)),
                    text,
                    mutable=[MAPS],
                )
            collection = variables.get(MAPS)
            maps = tuple(
                step_maps(collection, one, g if several else None) if _captures(one) else ({}, {})
                for g, one in enumerate(specs)
            )
            return out.sample.astype(jnp.float32), maps

        _, shapes = jax.eval_shape(denoise, latents, state.timesteps[0], state, weights[0])
        sums = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)

        def body(carry, xs):
            latents, state, sums = carry
            t, weight = xs
            eps, maps = denoise(latents, t, state, weight)
            eps_uncond, eps_cond = jnp.split(eps, 2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
            latents, state = schedulers.step(sched, state, eps, t, latents)
            sums = tuple(
                jax.tree_util.tree_map(lambda s, m, w=weight[g]: s + w * m, sums[g], maps[g])
                for g in range(len(specs))
            )
            return (latents, state, sums), None

        (latents, _, sums), _ = jax.lax.scan(
            body, (latents, state, sums), (state.timesteps, weights)
        )

        layout = sd.attention_layout(side * sd.vae_scale_factor, side * sd.vae_scale_factor)
        maps = tuple(
            AttentionMaps(
                cross={r: m / max(sum(mask), 1) for r, m in cross.items()},
                self_attn={r: m / max(sum(mask), 1) for r, m in self_attn.items()},
                self_layers=one.self_layers,
                resolutions=layout.sides,
                layout=layout,
            )
            for one, mask, (cross, self_attn) in zip(specs, masks, sums, strict=True)
        )
        maps = maps if several else maps[0]
        scaling = float(getattr(sd.vae, "scaling_factor", _VAE_SCALING))
        decoded = sd.vae.apply(
            {"params": params["vae"]}, (latents / scaling).astype(sd.dtype), method=sd.vae.decode
        ).sample
        images = jnp.clip(
            jnp.transpose(decoded.astype(jnp.float32), (0, 2, 3, 1)) / 2 + 0.5, 0.0, 1.0
        )
        return Samples(images=images, latents=latents, maps=maps)


def _captures(spec: CaptureSpec) -> bool:
    return bool(spec.cross or spec.self_attn)


def to_uint8(images) -> np.ndarray:
    """``(b, h, w, 3)`` float images in [0, 1] to uint8 as diffusers does (``round(255 x)``)."""
    return np.round(np.asarray(images, np.float32) * 255.0).astype(np.uint8)
