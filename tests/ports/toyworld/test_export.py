"""``ports.toyworld.export``: Flax params written as a diffusers folder that both ``ports.sd.load``
and diffusers' PyTorch classes read back to the same numbers (the toy model's only way out)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from ports.toyworld import export, scenes, train
from tests.ports.sd.parity import assert_rel_close

CFG = train.PRESETS["smoke"]
QUIET = {"low_cpu_mem_usage": False}  # no `accelerate` here; say so instead of a warning


def _random_like(shapes, seed: int):
    """Random values in the shapes' tree: std 0.05, so every weight shapes the output."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32), shapes
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel

    from ports.sd.clip import CLIPTextConfig, CLIPTextEncoder
    from ports.sd.load import flax_fields

    words = train.WORDS
    folder = tmp_path_factory.mktemp("export") / "toy"
    vocab = export.write_clip_tokenizer(tmp_path_factory.mktemp("vocab"), words)
    u_cfg, v_cfg, t_cfg = (
        train.unet_config(CFG),
        train.vae_config(CFG, 0.7),
        train.text_config(CFG, vocab),
    )
    unet = FlaxUNet2DConditionModel.from_config(flax_fields(FlaxUNet2DConditionModel, u_cfg))
    vae = FlaxAutoencoderKL.from_config(flax_fields(FlaxAutoencoderKL, v_cfg))
    text = CLIPTextEncoder(CLIPTextConfig.from_dict(t_cfg))
    params = {
        "unet": _random_like(jax.eval_shape(unet.init_weights, jax.random.key(0)), 1),
        "vae": _random_like(jax.eval_shape(vae.init_weights, jax.random.key(0)), 2),
        "text": _random_like(
            jax.eval_shape(text.init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32))["params"],
            3,
        ),
    }
    export.save_pipeline(
        folder,
        unet_config=u_cfg,
        unet_params=params["unet"],
        vae_config=v_cfg,
        vae_params=params["vae"],
        text_config=t_cfg,
        text_params=params["text"],
        words=words,
        scheduler_config=train.SCHEDULER_CONFIG,
        dtype=np.float32,
        extra_files={"training.json": "{}\n"},
    )
    return folder, params, (unet, vae, text)


def test_ports_loader_reads_back_the_same_params(exported):
    from ports.sd.load import load

    folder, params, _ = exported
    sd = load(folder)
    for name, loaded in (
        ("unet", sd.unet_params),
        ("vae", sd.vae_params),
        ("text", sd.text_params),
    ):
        want, got = flatten_dict(params[name]), flatten_dict(jax.device_get(loaded))
        assert set(got) == set(want), name
        for path in want:
            np.testing.assert_array_equal(got[path], want[path], err_msg=f"{name} {path}")
    assert sd.vae_scale_factor == 2 ** (len(CFG.vae_channels) - 1)
    assert (folder / "training.json").is_file()
    assert not folder.with_name("toy.partial").exists()


def test_pytorch_diffusers_reads_the_folder_to_the_same_outputs(exported):
    torch = pytest.importorskip("torch")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder, params, (unet, vae, text) = exported
    rng = np.random.default_rng(0)

    pt_unet, info = UNet2DConditionModel.from_pretrained(
        folder / "unet", output_loading_info=True, **QUIET
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    side = CFG.latent_side
    x = rng.standard_normal((2, 4, side, side)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, CFG.text_width)).astype(np.float32)
    t = np.array([10, 700])
    want = pt_unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample
    # jitted: eager Flax modules compile every op on its own (minutes on the 2-core CPU)
    got = jax.jit(lambda *a: unet.apply({"params": params["unet"]}, *a).sample)(
        x, jnp.asarray(t), ctx
    )
    assert_rel_close(got, want.detach().numpy(), 2e-4)  # Flax's tanh-GELU vs PyTorch's erf

    pt_vae, info = AutoencoderKL.from_pretrained(folder / "vae", output_loading_info=True, **QUIET)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    z = rng.standard_normal((1, 4, side, side)).astype(np.float32)
    want = pt_vae.decode(torch.from_numpy(z)).sample.detach().numpy()
    got = jax.jit(lambda z: vae.apply({"params": params["vae"]}, z, method=vae.decode).sample)(z)
    assert_rel_close(got, want, 1e-4)
    assert pt_vae.config.scaling_factor == pytest.approx(0.7)

    pt_text, info = CLIPTextModel.from_pretrained(
        folder / "text_encoder", output_loading_info=True, **QUIET
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    ids = tokenizer(
        ["a red star on a striped background"], padding="max_length", max_length=77
    ).input_ids
    for word in scenes.CLASSES:  # class words are whole tokens (their cross-attention is one map)
        assert tokenizer.tokenize(word) == [word + "</w>"], word
    want = pt_text(torch.tensor(ids)).last_hidden_state.detach().numpy()
    got = jax.jit(lambda ids: text.apply({"params": params["text"]}, ids))(jnp.asarray(ids))
    assert_rel_close(got, want, 1e-4)
