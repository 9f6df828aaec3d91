"""Benchmark of Stable Diffusion sampling with attention capture: images/s, ms per step, compile
time, memory and MFU of ``ports.sd.sample.Sampler``, per batch size and mask method.

The model is the architecture of a real checkpoint with random weights (no checkpoint is read; the
cost of a step does not depend on the weight values): ``sd2-base`` is Stable Diffusion 2-base (UNet
320/640/1280/1280 with 5/10/20/20 heads and linear projections, VAE 128/256/512/512, the 23-layer
1024-wide gelu CLIP text encoder), 512 px; ``tiny`` is a few-layer model at 64 px for CI. Parameter
shapes come from ``jax.eval_shape`` and the values are filled on the host with numpy, per leaf.
Prompts are fixed token ids (a tokenizer is not needed to measure speed).

    python bench/sd.py --config tiny                                  # CPU smoke run, seconds
    python bench/sd.py --config sd2-base --batch 1,8,16 --steps 50 \\
        --methods none,seediff-code,ca,ca_sa --dtype bfloat16 --json sd.json --peer

Per (batch, method) it compiles the sampler once (``compile_s`` = trace + lower + XLA compile:
what a first call costs on top of one run), runs it once, then times ``--repeats`` calls
(``block_until_ready`` on images, latents and maps) and prints a markdown table and one JSON line.

FLOPs (``sampler_flops``): ``text + VAE + model_calls x (one CFG UNet call with the capture, and
guidance)``, each part costed on its own by XLA's cost analysis of its pre-optimisation HLO,
lowered (never run) for the host CPU with XLA attention (``implementation="xla"``, XLA head-mean):
on a GPU ``Lowered.cost_analysis()`` is not available and ``Compiled.cost_analysis()`` counts
cuDNN attention and Pallas kernels as 0 FLOPs, and costing the sampler as a whole would count its
``lax.scan`` body once. So attention is counted as the matmuls cuDNN performs, the capture as the
XLA path's (the fused head-mean kernel's second ``QK^T`` is not counted), the same on every
backend. MFU = that total per batch / seconds per batch / ``--peak-tflops``.

Ratios against the PyTorch peer (``/work/shared/bench/peer_torch_sd.py``) are only meaningful
from the same command on the same GPU: ``--peer`` prints the peer's command line to run beside it.
"""

import argparse
import dataclasses
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from jaxmask import methods
from jaxmask.maps import CaptureSpec
from jaxmask.masks import extract_masks
from ports.sd.capture import MAPS, NOTHING, head_mean_kernel, intercept_attention, step_maps
from ports.sd.clip import CLIPTextConfig, CLIPTextEncoder
from ports.sd.load import StableDiffusion
from ports.sd.sample import Sampler
from ports.sd.schedulers import SD_DDIM_CONFIG  # the DDIM config the peer uses

PEER = "python ../shared/bench/peer_torch_sd.py"
DEFAULT_PEAK_TFLOPS = 792.0  # bf16 8192^3 matmul, H100 80GB HBM3, jax 0.11.2 (performance.md 1.3)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """An SD architecture: diffusers Flax UNet / VAE keyword arguments, our CLIP config,
    defaults."""

    unet: dict
    vae: dict
    text: CLIPTextConfig
    steps: int  # default step count
    batches: tuple[int, ...]  # default batch sweep


def sd_unet(side: int, channels: tuple, layers: int, context: int, heads: tuple, attention: int):
    """Keyword arguments of an SD-style ``FlaxUNet2DConditionModel`` on ``side`` px latents: cross
    attention in the first ``attention`` of ``len(channels)`` levels (mirrored on the way up)."""
    plain = len(channels) - attention
    return {
        "sample_size": side,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D",) * attention + ("DownBlock2D",) * plain,
        "up_block_types": ("UpBlock2D",) * plain + ("CrossAttnUpBlock2D",) * attention,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "cross_attention_dim": context,
        "attention_head_dim": heads,  # diffusers' name for the head counts
        "use_linear_projection": True,
    }


def sd_vae(side: int, channels: tuple, layers: int):
    """Keyword arguments of an SD-style ``FlaxAutoencoderKL`` on ``side`` px images."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "down_block_types": ("DownEncoderBlock2D",) * len(channels),
        "up_block_types": ("UpDecoderBlock2D",) * len(channels),
        "block_out_channels": channels,
        "layers_per_block": layers,
        "sample_size": side,
    }


def sd_text(width: int, hidden: int, layers: int, heads: int) -> CLIPTextConfig:
    """An SD-style CLIP text encoder (CLIP's vocabulary, 77 tokens, GELU) of ``width``."""
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act="gelu",
    )


CONFIGS = {
    "sd2-base": ModelConfig(
        unet=sd_unet(64, (320, 640, 1280, 1280), 2, 1024, (5, 10, 20, 20), attention=3),
        vae=sd_vae(512, (128, 256, 512, 512), 2),
        text=sd_text(1024, 4096, 23, 16),
        steps=50,
        batches=(1, 8, 16),
    ),
    # Like tests/ports/sd/tiny.py's SD 2.x model, with a third level so that every method finds
    # its sides (attention at 16/8/4 = SD's 64/32/16 pattern): 64 px, latent 16x16, VAE factor 4.
    "tiny": ModelConfig(
        unet=sd_unet(16, (32, 32, 64), 1, 32, (2, 2, 4), attention=3),
        vae=sd_vae(64, (32, 32, 64), 1),
        text=sd_text(32, 64, 3, 4),
        steps=4,
        batches=(1, 2),
    ),
}

# "a photo of a cat" in CLIP's vocabulary, and the empty negative prompt, padded to 77.
_BOS, _EOS = 49406, 49407
_PROMPT = (_BOS, 320, 1125, 539, 320, 2368, _EOS)


# ------------------------------------------------------------------------------------ the model


def random_params(shapes, dtype, seed: int = 0):
    """Device params of the ``jax.eval_shape`` tree ``shapes``, filled on the host with numpy.

    Kernels and embeddings are N(0, 1/fan_in) (embeddings N(0, 0.02)), so activations stay of order
    one through the random network (no overflow in bf16, no denormals on CPU); norm scales are 1,
    biases 0. Each leaf is a view into one random buffer per scale, cast to ``dtype`` once, at a
    random offset: filling ~1.3 G parameters costs a few casts, not one per leaf (and no jit).
    """
    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(dtype)
    flat, tree = jax.tree_util.tree_flatten_with_path(shapes)
    scales = {}
    for path, leaf in flat:
        scale = _scale(path, leaf.shape)
        if scale:
            scales[scale] = max(scales.get(scale, 0), math.prod(leaf.shape))
    buffers = {
        scale: (rng.standard_normal(size, np.float32) * np.float32(scale)).astype(dtype)
        for scale, size in scales.items()
    }
    leaves = []
    for path, leaf in flat:
        size = math.prod(leaf.shape)
        scale = _scale(path, leaf.shape)
        if scale is None:
            fill = np.ones if _name(path) == "scale" else np.zeros
            value = fill(leaf.shape, dtype)
        else:
            buffer = buffers[scale]
            start = int(rng.integers(0, buffer.size - size + 1))
            value = buffer[start : start + size].reshape(leaf.shape)
        leaves.append(jax.device_put(value))
    return jax.tree_util.tree_unflatten(tree, leaves)


def _name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def _scale(path, shape) -> float | None:
    """The std of a random leaf, or None for a constant one (norm scale 1, bias 0)."""
    name = _name(path)
    if name in ("scale", "bias") or len(shape) < 2:
        return None
    if name == "embedding":
        return 0.02
    return 1.0 / math.sqrt(math.prod(shape[:-1]))  # Flax kernels: (..., fan_in, fan_out)


def build(config: str | ModelConfig, dtype=jnp.float32, seed: int = 0) -> StableDiffusion:
    """A ``StableDiffusion`` of ``config``'s architecture with random weights (no checkpoint)."""
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel

    cfg = CONFIGS[config] if isinstance(config, str) else config
    dtype = jnp.dtype(dtype)
    key = jax.random.PRNGKey(0)
    unet = FlaxUNet2DConditionModel(**cfg.unet, dtype=dtype)
    vae = FlaxAutoencoderKL(**cfg.vae, dtype=dtype)
    text = CLIPTextEncoder(cfg.text, dtype=dtype)
    unet_shapes = jax.eval_shape(unet.init_weights, key)
    vae_shapes = jax.eval_shape(vae.init_weights, key)
    text_shapes = jax.eval_shape(
        text.init, key, jnp.zeros((1, cfg.text.max_position_embeddings), jnp.int32)
    )["params"]
    return StableDiffusion(
        unet=unet,
        unet_params=random_params(unet_shapes, dtype, seed),
        vae=vae,
        vae_params=random_params(vae_shapes, dtype, seed + 1),
        text_encoder=text,
        text_params=random_params(text_shapes, dtype, seed + 2),
        tokenizer=None,
        scheduler_config=dict(SD_DDIM_CONFIG),
        latent_channels=cfg.vae["latent_channels"],
        vae_scale_factor=2 ** (len(cfg.vae["block_out_channels"]) - 1),
        source=f"random:{config if isinstance(config, str) else 'custom'}",
        fingerprint=f"random-seed-{seed}",
        dtype=dtype,
    )


def token_ids(batch: int, length: int = 77) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, negative_ids)``, each ``(batch, length)`` int32: a fixed prompt and ``""``."""
    ids = np.full((batch, length), _EOS, np.int32)
    ids[:, : len(_PROMPT)] = _PROMPT
    negative = np.full((batch, length), _EOS, np.int32)
    negative[:, 0] = _BOS
    return ids, negative


def capture_spec(sd: StableDiffusion, method: str, size: int, window=None, every=None):
    """The method's ``CaptureSpec`` at ``size`` px (``NOTHING`` for ``"none"``), with the step
    window and stride replaced where given."""
    if method == "none":
        return NOTHING
    spec = methods.get(method).capture_spec(sd.attention_layout(size, size))
    changes = {}
    if window is not None:
        changes["step_window"] = tuple(float(w) for w in window)
    if every is not None:
        changes["every"] = int(every)
    return dataclasses.replace(spec, **changes) if changes else spec


# ----------------------------------------------------------------------------------- measuring


def sampler_args(sampler: Sampler, batch: int, steps: int, spec: CaptureSpec, guidance=7.5):
    """The positional and static arguments ``Sampler.__call__`` passes to its jitted function.

    (Mirrors ``Sampler.__call__``; the sampler exposes no ``lower``, see BENCHMARKS.md.)
    """
    sd = sampler.sd
    ids, negative = token_ids(batch)
    params = {"unet": sd.unet_params, "vae": sd.vae_params, "text": sd.text_params}
    args = (
        params,
        jnp.asarray(ids),
        jnp.asarray(negative),
        jnp.arange(batch, dtype=jnp.int32),
        jax.random.key(0),
        jnp.float32(guidance),
    )
    static = {
        "steps": int(steps),
        "side": sampler.native_size() // sd.vae_scale_factor,
        "scheduler": "ddim",
        "spec": spec,
    }
    return args, static


def _flops(cost) -> float:
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float((cost or {}).get("flops", 0.0))


def _abstract(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def cost_flops(fn, *args) -> float:
    """XLA's FLOP count of ``fn(*args)`` (pre-optimisation HLO), lowered for the host CPU.

    On a GPU ``Lowered.cost_analysis()`` is unavailable (the PJRT plugin has none: it returned
    nothing and the bench printed 0 FLOPs) and ``Compiled.cost_analysis()`` counts custom calls
    (cuDNN attention, Pallas kernels) as 0, so the program is lowered, not compiled, for the CPU
    backend from abstract arguments; only the CPU's cost model is used, nothing runs there.
    """
    args = _abstract(args)
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS excludes the CPU: the default backend's, maybe 0
        cpu = None
    if cpu is None:
        return _flops(jax.jit(fn).lower(*args).cost_analysis())
    with jax.default_device(cpu):
        return _flops(jax.jit(fn).lower(*args).cost_analysis())


def model_call_flops(sd: StableDiffusion, batch: int, side: int, spec: CaptureSpec) -> float:
    """FLOPs of one denoising step: the CFG UNet call on ``2 batch`` latents with ``spec``'s
    capture (XLA attention, XLA head-mean), then guidance.

    Counted with ``implementation="xla"`` and ``kernel=False`` whatever the backend, so cuDNN's
    fused attention is costed as the two matmuls it performs, and the capture as the XLA path's
    one ``QK^T`` per captured head (the fused head-mean kernel recomputes it once more; that
    recomputation is not counted). The scheduler update and the running sums of the maps (a few
    elementwise ops per latent / map entry, < 0.1%) are left out.
    """
    text_dim = sd.text_encoder.config.hidden_size
    length = sd.text_encoder.config.max_position_embeddings

    def step(params, latents, t, text, guidance):
        x = jnp.concatenate([latents, latents])
        with intercept_attention(spec, implementation="xla", kernel=False):
            out, variables = sd.unet.apply(
                {"params": params},
                x.astype(sd.dtype),
                jnp.broadcast_to(t, (2 * batch,)),
                text,
                mutable=[MAPS],
            )
        maps = step_maps(variables.get(MAPS), spec)
        eps_uncond, eps_cond = jnp.split(out.sample.astype(jnp.float32), 2)
        return eps_uncond + guidance * (eps_cond - eps_uncond), maps

    return cost_flops(
        step,
        sd.unet_params,
        jax.ShapeDtypeStruct((batch, sd.latent_channels, side, side), jnp.float32),
        jax.ShapeDtypeStruct((), jnp.int32),
        jax.ShapeDtypeStruct((2 * batch, length, text_dim), sd.dtype),
        jax.ShapeDtypeStruct((), jnp.float32),
    )


def sampler_flops(sampler: Sampler, batch: int, steps: int, spec: CaptureSpec):
    """FLOPs of one sampler call: ``text + VAE + model_calls x model_call_flops``.

    Each part is costed on its own (``cost_flops``: lowered for the CPU, XLA attention), so the
    count is the same on every backend and does not rest on how XLA costs a ``while`` loop.

    Returns ``{"total", "per_model_call", "text", "vae", "model_calls"}`` (FLOPs).
    """
    sd = sampler.sd
    ids, negative = token_ids(batch)
    text = cost_flops(
        lambda p, i: sd.text_encoder.apply({"params": p}, i),
        sd.text_params,
        jnp.concatenate([jnp.asarray(negative), jnp.asarray(ids)]),
    )
    side = sampler.native_size() // sd.vae_scale_factor
    vae = cost_flops(
        lambda p, x: sd.vae.apply({"params": p}, x, method=sd.vae.decode).sample,
        sd.vae_params,
        jax.ShapeDtypeStruct((batch, sd.latent_channels, side, side), sd.dtype),
    )
    calls = sampler.num_model_calls(steps)
    body = model_call_flops(sd, batch, side, spec)
    return {
        "total": text + vae + calls * body,
        "per_model_call": body,
        "text": text,
        "vae": vae,
        "model_calls": calls,
    }


def _gib(n):
    return None if n is None else round(n / 2**30, 3)


def _program_bytes(compiled) -> int | None:
    """XLA's static size of the program: arguments + outputs + temporaries - aliased."""
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):  # not every backend implements it
        return None
    if m is None:
        return None
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def measure(
    sampler: Sampler,
    batch: int,
    method: str,
    steps: int,
    *,
    repeats: int = 3,
    window=None,
    every=None,
    peak_tflops: float | None = DEFAULT_PEAK_TFLOPS,
    masks: bool = True,
) -> dict[str, Any]:
    """One table row: compile, time, FLOPs and memory of ``batch`` images with ``method``; with
    ``masks``, also the method's mask extraction on the sampler's output (one class, no PAMR)."""
    sd = sampler.sd
    size = sampler.native_size()
    spec = capture_spec(sd, method, size, window, every)
    calls = sampler.num_model_calls(steps)
    captured = sum(spec.steps_mask(calls)) if (spec.cross or spec.self_attn) else 0
    if (spec.cross or spec.self_attn) and not captured:
        raise ValueError(
            f"window {spec.step_window} every {spec.every} selects none of the {calls} steps"
        )
    args, static = sampler_args(sampler, batch, steps, spec)

    t0 = time.perf_counter()
    lowered = sampler._run.lower(*args, **static)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    first_run_s = time.perf_counter() - t2
    finite = bool(np.isfinite(np.asarray(out.images)).all())
    maps = {
        "cross": {str(r): list(m.shape) for r, m in sorted(out.maps.cross.items())},
        "self": {str(r): list(m.shape) for r, m in sorted(out.maps.self_attn.items())},
    }
    maps_finite = all(
        bool(np.isfinite(np.asarray(m)).all()) for m in jax.tree_util.tree_leaves(out.maps)
    )
    mask = None
    if masks and method != "none":
        mask = _time_masks(out, methods.get(method), repeats)
    del out

    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    run_s = float(np.mean(times))

    flops = sampler_flops(sampler, batch, steps, spec)
    device = jax.devices()[0]
    on_accelerator = device.platform != "cpu"
    stats = device.memory_stats() if on_accelerator else None
    peak = (stats or {}).get("peak_bytes_in_use")
    achieved = flops["total"] / run_s / 1e12
    with_masks = run_s + mask["s"] if mask else run_s
    mfu = achieved / peak_tflops if (on_accelerator and peak_tflops) else None
    return {
        "method": method,
        "batch": batch,
        "steps": steps,
        "model_calls": calls,
        "size": size,
        "dtype": jnp.dtype(sd.dtype).name,
        "spec": {
            "cross": list(spec.cross),
            "self_attn": list(spec.self_attn),
            "self_layers": spec.self_layers,
            "step_window": list(spec.step_window),
            "every": spec.every,
            "step_norm": spec.step_norm,
        },
        "captured_steps": captured,
        "lower_s": round(t1 - t0, 3),
        "compile_s": round(t2 - t0, 3),
        "first_run_s": round(first_run_s, 4),
        "run_s": round(run_s, 4),
        "run_s_min": round(min(times), 4),
        "repeats": repeats,
        "images_per_s": round(batch / run_s, 4),
        "ms_per_step": round(1e3 * run_s / calls, 3),
        "tflop_per_batch": round(flops["total"] / 1e12, 6),
        "gflop_per_model_call": round(flops["per_model_call"] / 1e9, 4),
        "gflop_text": round(flops["text"] / 1e9, 4),
        "gflop_vae": round(flops["vae"] / 1e9, 4),
        "flops": flops["total"],
        "achieved_tflops": round(achieved, 4),
        "mfu": None if mfu is None else round(mfu, 4),
        "peak_gib": _gib(peak),
        "program_gib": _gib(_program_bytes(compiled)),
        "mask_compile_s": mask and round(mask["compile_s"], 3),
        "mask_ms_per_image": mask and round(1e3 * mask["s"] / batch, 3),
        "label_maps_shape": mask and mask["shape"],
        "images_per_s_with_masks": round(batch / with_masks, 4),
        "images_finite": finite,
        "maps_finite": maps_finite,
        "maps": maps,
    }


_extract = jax.jit(jax.vmap(extract_masks, in_axes=(0, None, 0, None, None)), static_argnums=(3, 4))


def _time_masks(samples, cfg, repeats: int) -> dict[str, Any]:
    """Compile and time ``vmap(extract_masks)`` (as ``jaxmask.generate`` runs it) on one batch."""
    weights = jnp.zeros((1, 77), jnp.float32).at[0, _PROMPT.index(2368)].set(1.0)  # "cat"
    t0 = time.perf_counter()
    _, labels = jax.block_until_ready(_extract(samples.maps, weights, samples.images, cfg, None))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(_extract(samples.maps, weights, samples.images, cfg, None))
        times.append(time.perf_counter() - t)
    return {"compile_s": compile_s, "s": float(np.mean(times)), "shape": list(labels.shape)}


# ----------------------------------------------------------------------------------- reporting


def _fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def table(rows) -> str:
    lines = [
        (
            "| method | batch | img/s | img/s with masks | ms/step | compile s | TFLOP/img "
            "| achieved TFLOP/s | MFU | peak GiB | program GiB |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['batch']} | {r['images_per_s']:.3f} "
            f"| {r['images_per_s_with_masks']:.3f} | {r['ms_per_step']:.1f} "
            f"| {r['compile_s']:.1f} | {r['tflop_per_batch'] / r['batch']:.4g} "
            f"| {r['achieved_tflops']:.3g} | {_fmt(r['mfu'], '.1%')} "
            f"| {_fmt(r['peak_gib'], '.2f')} "
            f"| {_fmt(r['program_gib'], '.2f')} |"
        )
    return "\n".join(lines)


def _ints(text):
    return tuple(int(x) for x in text.split(",") if x.strip())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--batch", type=_ints, default=None, help="comma list (config default)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (config default)")
    parser.add_argument(
        "--methods",
        default="none,seediff-code",
        help=f"comma list of 'none' and {sorted(methods.PRESETS)}",
    )
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32", "float16"),
        default=None,
        help="params and compute dtype (default: bfloat16 for sd2-base, float32 for tiny)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per row")
    parser.add_argument(
        "--window", default=None, help="capture step window 'start,stop' as fractions, e.g. 0,0.5"
    )
    parser.add_argument("--every", type=int, default=None, help="capture every k-th step")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=DEFAULT_PEAK_TFLOPS,
        help="device peak for MFU (default: H100 bf16 matmul as measured, 792)",
    )
    parser.add_argument(
        "--compilation-cache",
        default=None,
        metavar="DIR",
        help="use JAX's persistent compilation cache in DIR (compile_s then shows a warm cache)",
    )
    parser.add_argument(
        "--no-masks", action="store_true", help="time the sampler only (no mask extraction)"
    )
    parser.add_argument(
        "--head-mean",
        choices=("auto", "kernel", "xla"),
        default="auto",
        help="how captured maps are head-meaned: auto (the fused Pallas kernel for large maps on "
        "one GPU), kernel (wherever its shapes fit; interpreted on a CPU), xla",
    )
    parser.add_argument("--peer", action="store_true", help="print the PyTorch peer's command")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.window is not None:
        parts = [float(x) for x in args.window.split(",")]
        if len(parts) != 2:
            parser.error(f"--window takes 'start,stop', got {args.window!r}")
        args.window = tuple(parts)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(names) - set(methods.PRESETS) - {"none"})
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from none, {sorted(methods.PRESETS)}")
    args.methods = names
    if args.dtype is None:
        args.dtype = "float32" if args.config == "tiny" else "bfloat16"
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    choice = {"auto": None, "kernel": True, "xla": False}[args.head_mean]
    with head_mean_kernel(choice):
        return _main(args)


def _main(args) -> dict:
    if args.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    cfg = CONFIGS[args.config]
    steps = args.steps or cfg.steps
    batches = args.batch or cfg.batches

    t0 = time.perf_counter()
    sd = build(args.config, jnp.dtype(args.dtype))
    jax.block_until_ready((sd.unet_params, sd.vae_params, sd.text_params))
    build_s = time.perf_counter() - t0
    sampler = Sampler(sd)

    rows = []
    for batch in batches:
        for method in args.methods:
            row = measure(
                sampler,
                batch,
                method,
                steps,
                repeats=args.repeats,
                window=args.window,
                every=args.every,
                peak_tflops=args.peak_tflops,
                masks=not args.no_masks,
            )
            rows.append(row)
            print(
                json.dumps({k: v for k, v in row.items() if k != "maps"}),
                file=sys.stderr,
                flush=True,
            )

    device = jax.devices()[0]
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(sd.unet_params))
    result = {
        "config": args.config,
        "device": f"{device.device_kind} ({device.platform}, {jax.device_count()} device(s))",
        "platform": device.platform,
        "jax": jax.__version__,
        "host": platform.processor() or platform.machine(),
        "date": datetime.date.today().isoformat(),
        "dtype": args.dtype,
        "steps": steps,
        "guidance": 7.5,
        "scheduler": "ddim",
        "size": sampler.native_size(),
        "unet_params": int(n_params),
        "build_s": round(build_s, 2),
        "peak_tflops": args.peak_tflops if device.platform != "cpu" else None,
        "window": list(args.window) if args.window else None,
        "every": args.every,
        "head_mean": args.head_mean,
        "peer_command": f"{PEER} {steps}",
        "results": rows,
    }
    print(
        f"device: {result['device']}; jax {jax.__version__}; {args.config} {args.dtype}, "
        f"{result['size']} px, DDIM {steps} steps, guidance 7.5; "
        f"UNet {n_params / 1e6:.1f} M params; build {build_s:.1f} s; head-mean {args.head_mean}"
    )
    print(table(rows))
    if args.peer:
        print(
            "\nPeer (PyTorch diffusers, same architecture, fp16, SDPA, plain and with a capture "
            f"store; batches 1, 8, 16), run in the SAME device command:\n  {result['peer_command']}"
        )
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
