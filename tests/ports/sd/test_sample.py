"""ports.sd.sample and ports.sd.schedulers: whole sampling runs against diffusers' PyTorch
``StableDiffusionPipeline`` on the same tiny weights, initial noise, prompts, negative prompts and
guidance (latents, images, and the attention maps a PyTorch processor records in the same run);
capture does not change the image; a new key, prompt or guidance does not recompile.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmask.maps import CaptureSpec
from ports.sd import schedulers
from ports.sd.load import load
from ports.sd.sample import Sampler, initial_noise, to_uint8
from ports.sd.tokenizer import tokenize
from tests.ports.sd.parity import assert_rel_close as _close
from tests.ports.sd.test_capture import MapRecorder, assert_maps_close, expected_maps

torch = pytest.importorskip("torch")

pytestmark = [
    # diffusers' PyTorch loaders, on these machines without accelerate/torchvision
    pytest.mark.filterwarnings("ignore::UserWarning:diffusers.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:transformers.*"),
]

PROMPTS = ["a photo of a cat", "a red dog on the table"]
NEGATIVE = ["", "a photo"]
STEPS = 4
GUIDANCE = 7.5
SEED = 3

# DDIM (SD 2.x tiny): every map SD has, layer-mean self maps, all steps.
SPEC_DDIM = CaptureSpec(cross=(8, 16), self_attn=(8, 16))
# PNDM (SD 1.x tiny, STEPS + 1 UNet calls): first-up self maps, SeeDiff's per-step max, a window.
SPEC_PNDM = CaptureSpec(
    cross=(16,),
    self_attn=(8, 16),
    self_layers="first_up",
    step_norm="max",
    step_window=(0.2, 1.0),
    every=2,
)

_TORCH_SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}


def _torch_pipeline(path, scheduler):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        path, safety_checker=None, requires_safety_checker=False
    )
    extra = {"final_sigmas_type": "sigma_min"} if scheduler == "dpm++" else {}  # see schedulers.py
    cls = getattr(diffusers, _TORCH_SCHEDULERS[scheduler])
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _torch_run(path, scheduler, noise, record=True):
    """The PyTorch pipeline on ``noise``: (final latents, images in [0, 1], recorded maps)."""
    pipe = _torch_pipeline(path, scheduler)
    recorder = MapRecorder(pipe.unet) if record else None
    final = {}

    def keep_latents(pipe, i, t, tensors):
        final["latents"] = tensors["latents"].numpy().copy()
        return tensors

    with torch.no_grad():
        out = pipe(
            PROMPTS,
            negative_prompt=NEGATIVE,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            latents=torch.tensor(np.array(noise)),
            output_type="np",
            callback_on_step_end=keep_latents,
        )
    return final["latents"], out.images, dict(recorder.calls) if record else None


def _ids(sd):
    return tokenize(sd.tokenizer, PROMPTS), tokenize(sd.tokenizer, NEGATIVE)


def _noise(sd):
    return initial_noise(
        jax.random.key(SEED), jnp.arange(len(PROMPTS)), (sd.latent_channels, 16, 16)
    )


@pytest.fixture(scope="module")
def sampler1(sd1):
    return Sampler(sd1)


def _runs(path, sd, sampler, scheduler, spec=None):
    """Ours and PyTorch's sampling of the model at ``path`` with ``scheduler`` from the same noise;
    maps captured (and recorded on the PyTorch side) where ``spec`` is given."""
    capture = {} if spec is None else {"spec": spec}
    ours = sampler(
        *_ids(sd),
        jax.random.key(SEED),
        steps=STEPS,
        guidance=GUIDANCE,
        scheduler=scheduler,
        **capture,
    )
    return ours, _torch_run(path, scheduler, _noise(sd), record=spec is not None)


@pytest.fixture(scope="module")
def ddim_runs(tiny_sd2_path):
    """DDIM on the SD 2.x tiny model (linear projections, per-block heads): ours and PyTorch's."""
    sd = load(tiny_sd2_path)
    return _runs(tiny_sd2_path, sd, Sampler(sd), "ddim", SPEC_DDIM)


@pytest.fixture(scope="module")
def pndm_runs(tiny_sd_path, sd1, sampler1):
    return _runs(tiny_sd_path, sd1, sampler1, "pndm", SPEC_PNDM)


@pytest.fixture(scope="module")
def dpm_runs(tiny_sd_path, sd1, sampler1):
    """DPM-Solver++ (2nd order) without capture; its step maths is also checked, fast, below."""
    return _runs(tiny_sd_path, sd1, sampler1, "dpm++")


@pytest.mark.parametrize(
    "runs", ["ddim_runs", "pndm_runs", pytest.param("dpm_runs", marks=pytest.mark.slow)]
)
def test_sampling_reproduces_pytorch_pipeline(runs, request):
    ours, (latents, images, _) = request.getfixturevalue(runs)
    assert ours.images.shape == (2, 64, 64, 3) and ours.images.dtype == jnp.float32
    assert ours.latents.shape == (2, 4, 16, 16)
    # the Flax UNet itself deviates ~5e-5 from PyTorch's (timestep embedding in float32); guidance
    # 7.5 amplifies that over the steps
    latent_error = _close(ours.latents, latents, rel=3e-4)
    image_error = float(np.abs(np.asarray(ours.images) - images).max())
    print(
        f"{runs}: latents relative error {latent_error:.2e}, images max abs error {image_error:.2e}"
    )
    assert image_error <= 3e-4
    assert np.abs(to_uint8(ours.images).astype(int) - to_uint8(images).astype(int)).max() <= 1


@pytest.mark.parametrize("runs, spec", [("ddim_runs", SPEC_DDIM), ("pndm_runs", SPEC_PNDM)])
def test_maps_equal_pytorch_processor(runs, spec, request):
    """The run's AttentionMaps equal the conditional-half, head-mean probabilities a PyTorch
    attention processor records in the PyTorch run, per layer and resolution, averaged over the
    captured steps."""
    ours, (_, _, calls) = request.getfixturevalue(runs)
    assert ours.maps.self_layers == spec.self_layers and ours.maps.resolutions == (8, 16)
    num_calls = len(next(iter(calls.values())))
    assert num_calls == STEPS + (
        runs == "pndm_runs"
    )  # PNDM (skip_prk_steps) calls the UNet once more
    worst = assert_maps_close(
        (ours.maps.cross, ours.maps.self_attn),
        expected_maps(calls, spec),
        rel=3e-4 if spec.step_norm == "none" else 1e-3,
    )
    print(f"{runs}: maps worst relative error {worst:.2e}")


def test_capture_does_not_change_the_image(sd1, sampler1, pndm_runs):
    captured, _ = pndm_runs
    plain = sampler1(
        *_ids(sd1), jax.random.key(SEED), steps=STEPS, guidance=GUIDANCE, scheduler="pndm"
    )
    assert plain.maps.cross == {} and plain.maps.self_attn == {}
    np.testing.assert_allclose(
        np.asarray(plain.latents), np.asarray(captured.latents), rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(plain.images), np.asarray(captured.images), rtol=0, atol=1e-6
    )


def test_several_specs_in_one_run_equal_separate_runs(sd1, sampler1, pndm_runs):
    """A tuple of specs: each spec's maps equal its own run's (same images), including specs
    that differ in self layers, step norm and window, and two that share one computation (same
    norm, different windows)."""
    early_max = CaptureSpec(cross=(16,), step_norm="max", step_window=(0.0, 0.5))
    early_mean = CaptureSpec(cross=(8,), self_attn=(8, 16), step_window=(0.0, 0.6))
    specs = (SPEC_PNDM, early_max, early_mean, CaptureSpec())
    run = dict(steps=STEPS, guidance=GUIDANCE, scheduler="pndm")
    ids, negative = _ids(sd1)
    together = sampler1(ids, negative, jax.random.key(SEED), spec=specs, **run)
    assert isinstance(together.maps, tuple) and len(together.maps) == len(specs)
    captured, _ = pndm_runs
    np.testing.assert_array_equal(np.asarray(together.images), np.asarray(captured.images))
    alone = [captured] + [
        sampler1(ids, negative, jax.random.key(SEED), spec=spec, **run) for spec in specs[1:]
    ]
    for spec, maps, single in zip(specs, together.maps, alone, strict=True):
        assert maps.self_layers == spec.self_layers
        assert sorted(maps.cross) == sorted(spec.cross)
        assert sorted(maps.self_attn) == sorted(spec.self_attn)
        for r in spec.cross:
            np.testing.assert_allclose(maps.cross[r], single.maps.cross[r], rtol=1e-6, atol=1e-7)
        for r in spec.self_attn:
            np.testing.assert_allclose(
                maps.self_attn[r], single.maps.self_attn[r], rtol=1e-6, atol=1e-7
            )
    # the windows really differ: the early-window maps are not the all-steps ones
    assert not np.allclose(together.maps[1].cross[16], together.maps[0].cross[16])


def test_new_key_prompt_guidance_do_not_recompile(sd1, sampler1, pndm_runs):
    ids, negative = _ids(sd1)
    sampler1(ids, negative, jax.random.key(SEED), steps=STEPS, scheduler="pndm", spec=SPEC_PNDM)
    before = sampler1.cache_size()
    other = sampler1(
        ids[::-1],
        negative,
        jax.random.key(SEED + 1),
        steps=STEPS,
        guidance=3.0,
        scheduler="pndm",
        spec=SPEC_PNDM,
        item_ids=np.array([7, 8]),
    )
    assert sampler1.cache_size() == before
    assert not np.allclose(np.asarray(other.images), np.asarray(pndm_runs[0].images))


def test_noise_depends_only_on_key_and_item():
    key = jax.random.key(0)
    both = initial_noise(key, jnp.array([0, 5]), (4, 2, 2))
    alone = initial_noise(key, jnp.array([5]), (4, 2, 2))
    np.testing.assert_array_equal(np.asarray(both[1]), np.asarray(alone[0]))
    assert both.dtype == jnp.float32 and not np.allclose(both[0], both[1])


def test_errors(sd1, sampler1):
    ids, negative = _ids(sd1)
    key = jax.random.key(0)
    before = sampler1.cache_size()
    with pytest.raises(ValueError, match="multiple of 8"):
        sampler1(ids, negative, key, size=60)
    with pytest.raises(ValueError, match=r"resolution\(s\) \[32\].*attends at \[8, 16\]"):
        sampler1(ids, negative, key, spec=CaptureSpec(cross=(32,)))
    with pytest.raises(ValueError, match="selects none of the 4 denoising steps"):
        sampler1(ids, negative, key, steps=4, spec=CaptureSpec(cross=(8,), step_window=(0.9, 1.0)))
    with pytest.raises(ValueError, match="empty tuple"):
        sampler1(ids, negative, key, steps=4, spec=())
    with pytest.raises(ValueError, match="unknown scheduler 'euler'"):
        sampler1(ids, negative, key, scheduler="euler")
    with pytest.raises(ValueError, match=r"shape \(b, 77\)"):
        sampler1(ids, negative[:1], key)
    assert sampler1.cache_size() == before  # all caught before tracing


# ----------------------------------------------------------------------------------- schedulers


@pytest.mark.parametrize("name", ["ddim", "pndm", "dpm++"])
@pytest.mark.parametrize("skip_prk_steps", [True, False])
def test_scheduler_timesteps_match_pytorch(tiny_sd_path, sd1, name, skip_prk_steps):
    """Timesteps (hence the scan length) equal the PyTorch scheduler's from the same config."""
    import diffusers

    config = dict(sd1.scheduler_config, skip_prk_steps=skip_prk_steps)
    ours = schedulers.make(name, config)
    extra = {"final_sigmas_type": "sigma_min"} if name == "dpm++" else {}
    theirs = getattr(diffusers, _TORCH_SCHEDULERS[name]).from_config(config, **extra)
    for steps in (4, 50) if name == "pndm" and not skip_prk_steps else (1, 4, 50):
        theirs.set_timesteps(steps)
        state = schedulers.init_state(ours, steps, (1, 4, 2, 2))
        np.testing.assert_array_equal(np.asarray(state.timesteps), theirs.timesteps.numpy())
        assert schedulers.num_model_calls(ours, steps) == len(theirs.timesteps)
        assert state.common.alphas_cumprod.dtype == jnp.float32
    if name == "pndm":
        assert schedulers.num_model_calls(ours, 50) == (51 if skip_prk_steps else 59)
        if not skip_prk_steps:
            with pytest.raises(ValueError, match="needs steps >= 4, got 3"):
                schedulers.init_state(ours, 3, (1,))


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("ddim", {}),
        ("ddim", {"clip_sample": False, "prediction_type": "v_prediction"}),
        ("pndm", {}),
        ("pndm", {"skip_prk_steps": False}),
        ("dpm++", {}),
        ("dpm++", {"solver_order": 3, "timestep_spacing": "trailing"}),
    ],
)
def test_scheduler_steps_match_pytorch(sd1, name, overrides):
    """A whole denoising loop with a stand-in model ``eps(x, t)``: ours (jitted lax.scan) equals the
    PyTorch scheduler's loop from the same config, PNDM's warm-up and DPM-Solver's orders
    included."""
    import diffusers

    config = dict(sd1.scheduler_config, **overrides)
    steps = 12
    extra = {"final_sigmas_type": "sigma_min"} if name == "dpm++" else {}
    theirs = getattr(diffusers, _TORCH_SCHEDULERS[name]).from_config(config, **extra)
    ours = schedulers.make(name, config)
    x0 = np.random.default_rng(0).standard_normal((2, 4, 4, 4)).astype(np.float32)

    def model(x, t, xp):
        return 0.5 * xp.sin(x) + 0.1 * x * (t / 1000.0)

    theirs.set_timesteps(steps)
    x = torch.tensor(x0) * theirs.init_noise_sigma
    for t in theirs.timesteps:
        eps = model(theirs.scale_model_input(x, t), float(t), torch)
        x = theirs.step(eps, t, x).prev_sample

    @jax.jit
    def loop(x):
        state = schedulers.init_state(ours, steps, x.shape)
        x = x * state.init_noise_sigma

        def body(carry, t):
            x, state = carry
            eps = model(ours.scale_model_input(state, x, t), t.astype(jnp.float32), jnp)
            return schedulers.step(ours, state, eps, t, x), None

        return jax.lax.scan(body, (x, state), state.timesteps)[0][0]

    _close(loop(jnp.asarray(x0)), x.numpy(), rel=2e-5)


def test_scheduler_errors(sd1):
    with pytest.raises(
        ValueError, match=r"unknown scheduler 'lms'; choose one of \['ddim', 'pndm', 'dpm\+\+'\]"
    ):
        schedulers.make("lms", sd1.scheduler_config)
    with pytest.raises(ValueError, match="timestep_spacing='trailing'.*ddim"):
        schedulers.make("ddim", dict(sd1.scheduler_config, timestep_spacing="trailing"))
    with pytest.raises(ValueError, match="use_karras_sigmas=True"):
        schedulers.make("dpm++", dict(sd1.scheduler_config, use_karras_sigmas=True))
    assert schedulers.canonical_name("DPMSolver++") == "dpm++"
    with pytest.raises(ValueError, match="positive int"):
        schedulers.init_state(schedulers.make("ddim", sd1.scheduler_config), 0, (1,))
