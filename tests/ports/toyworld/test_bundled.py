"""The bundled toy model: shipped as package data, loaded by the normal loader as the default; its
VAE reconstructs world scenes, its UNet denoises them and depends on the caption, and the masks
it yields sit on the object the prompt names."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmask
from ports import api
from ports.toyworld import scenes, train

MODEL = api.DEFAULT_MODEL


def test_the_folder_is_small_complete_package_data():
    import tomllib

    files = [p for p in MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    globs = tomllib.loads((Path(__file__).parents[3] / "pyproject.toml").read_text())["tool"][
        "setuptools"
    ]["package-data"]["ports.toyworld"]
    packaged = {p for g in globs for p in MODEL.parent.glob(g)}
    assert set(files) == packaged, sorted(str(p) for p in set(files) ^ packaged)
    record = json.loads((MODEL / "training.json").read_text())
    assert record["seed"] == 0 and record["command"].startswith("jaxmask train-toy")
    assert record["unet_loss"][-1] < 0.5 * record["unet_loss"][0]
    # The folder is what the record's config builds (the record describes these weights).
    config = record["config"]
    made = train.TrainConfig(**_tuples(config))
    vae = json.loads((MODEL / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] == pytest.approx(record["scaling_factor"], abs=1e-6)
    assert vae == train.vae_config(made, vae["scaling_factor"])
    unet = json.loads((MODEL / "unet" / "config.json").read_text())
    assert unet == json.loads(json.dumps(train.unet_config(made)))
    if record.get("world", 1) == scenes.VERSION:  # made by today's code: the preset reproduces it
        assert config == json.loads(json.dumps(dataclasses.asdict(train.PRESETS["cpu"])))


def _tuples(config: dict) -> dict:
    known = {f.name for f in dataclasses.fields(train.TrainConfig)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in known}


@pytest.fixture(scope="module")
def pipe():
    return jaxmask.load()  # no model: the bundled one


def test_load_without_a_model_is_the_bundled_one(pipe):
    assert Path(pipe.sd.source) == MODEL
    assert pipe.native_size == 64 and pipe.resolutions() == (4, 8, 16)


def _real(n: int):
    scenes_ = [scenes.scene(np.random.SeedSequence((9, i)), train.SIZE) for i in range(n)]
    return np.stack([s.image for s in scenes_]), [s.caption for s in scenes_]


def test_vae_reconstructs_world_scenes(pipe):
    sd = pipe.sd
    images, _ = _real(8)
    z, _ = train.encode_dataset(sd.vae, sd.vae_params, jnp.asarray(images))  # posterior mean
    assert z.shape == (8, 4, 16, 16)
    # jitted: eager Flax modules compile every op on its own (minutes on the 2-core CPU)
    recon = jax.jit(lambda p, z: sd.vae.apply({"params": p}, z, method=sd.vae.decode))(
        sd.vae_params, z
    )
    recon = (jnp.clip(recon.sample, -1, 1) + 1) * 127.5
    error = float(jnp.abs(recon.transpose(0, 2, 3, 1) - images).mean())
    assert error < 45.0, error  # grey levels; a constant-grey guess is ~90


def test_unet_denoises_real_latents_and_listens_to_the_caption(pipe):
    """Epsilon MSE on noised latents of real scenes (1.0 = predicting zero), with the captions and
    with the empty prompt: a wrongly loaded or untrained UNet sits at ~1."""
    from ports.sd.tokenizer import tokenize

    sd = pipe.sd
    images, captions = _real(8)
    z0, _ = train.encode_dataset(sd.vae, sd.vae_params, jnp.asarray(images))
    z0 = z0 * json.loads((MODEL / "vae" / "config.json").read_text())["scaling_factor"]
    encode = jax.jit(lambda ids: sd.text_encoder.apply({"params": sd.text_params}, ids))
    text = encode(jnp.asarray(tokenize(sd.tokenizer, captions)))
    empty = encode(jnp.asarray(tokenize(sd.tokenizer, [""] * 8)))
    noise = jax.random.normal(jax.random.key(0), z0.shape)
    a = train.alphas_cumprod()[400]
    noisy, t = jnp.sqrt(a) * z0 + jnp.sqrt(1 - a) * noise, jnp.full((8,), 400)
    unet = jax.jit(lambda ctx: sd.unet.apply({"params": sd.unet_params}, noisy, t, ctx).sample)
    cond, uncond = unet(text), unet(empty)
    assert float(jnp.mean((cond - noise) ** 2)) < 0.3
    assert float(jnp.mean((cond - noise) ** 2)) < float(jnp.mean((uncond - noise) ** 2))
    assert float(jnp.sqrt(jnp.mean((cond - uncond) ** 2))) > 0.01  # the caption changes it


def test_generate_runs_on_the_default_model(pipe):
    out = pipe.generate("a red star on a plain background", 0, classes="star", steps=4)
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.soft_masks).all()
    assert set(np.unique(out.label_maps).tolist()) <= {0, 1, 255}


def test_masks_sit_on_the_named_colour(pipe):
    """Behaviour end to end (prompt -> image -> attention -> seediff-code mask): for one-object
    prompts on a plain background, the pixels labelled as the named class are nearer the named
    colour (mean RGB) than the pixels labelled background. A mask in the wrong place, a model
    that ignores the prompt, or a capture that reads the wrong token fails it."""
    colours = list(scenes.COLOURS)
    named = [
        (colours[(i + 3 * j) % len(colours)], cls)
        for i, cls in enumerate(scenes.CLASSES)
        for j in range(2)
    ]
    out = pipe.generate(
        [f"a {colour} {cls} on a plain background" for colour, cls in named],
        0,
        classes=[[cls] for _, cls in named],
        steps=20,
    )
    nearer = []
    for image, labels, (colour, _) in zip(out.images, out.label_maps, named, strict=True):
        target = np.asarray(scenes.COLOURS[colour], np.float64)
        fg, bg = image[labels == 1].astype(np.float64), image[labels == 0].astype(np.float64)
        assert len(fg) and len(bg), (colour, "empty mask or no background")
        nearer.append(np.linalg.norm(fg.mean(0) - target) < np.linalg.norm(bg.mean(0) - target))
    assert sum(nearer) >= 12, list(zip(named, nearer, strict=True))  # chance is ~8 of 16
