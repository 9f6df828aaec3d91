"""ports.sd.load / clip / tokenizer: parity with PyTorch diffusers and transformers on the tiny
SD 1.x and SD 2.x checkpoints, bf16, the errors, and tokenization.

Every expected value comes from PyTorch (diffusers ``UNet2DConditionModel``, ``AutoencoderKL``,
transformers ``CLIPTextModel``, ``CLIPTokenizer``) run on the same weights and inputs.
"""

import json
import logging
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from ports.sd.clip import convert_state_dict
from ports.sd.load import SHAPES_FOLDER, StableDiffusion, _check_tree, _fingerprint, load
from ports.sd.tokenizer import class_ids, tokenize
from tests.ports.conftest import compilation_cache_on
from tests.ports.sd.parity import assert_rel_close as _close

torch = pytest.importorskip("torch")

pytestmark = [
    # diffusers' PyTorch loaders, on these machines without accelerate/torchvision
    pytest.mark.filterwarnings("ignore::UserWarning:diffusers.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:transformers.*"),
]

BATCH = 2
LATENT = 16  # tiny UNet sample_size; the tiny VAE maps it to 64x64 images


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def model(request):
    """(checkpoint folder, loaded StableDiffusion) for each flavour."""
    path = request.getfixturevalue("tiny_sd_path" if request.param == "sd1" else "tiny_sd2_path")
    return path, request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return {
        "latents": rng.standard_normal((BATCH, 4, LATENT, LATENT)).astype(np.float32),
        "timesteps": np.array([10, 731]),
        "text": rng.standard_normal((BATCH, 77, 32)).astype(np.float32),
        "images": rng.uniform(-1, 1, (BATCH, 3, 64, 64)).astype(np.float32),
    }


def _torch_unet(path, *, like_flax=False):
    """diffusers' PyTorch UNet; ``like_flax`` reproduces the two numerical choices of diffusers'
    Flax UNet (tanh-approximate GELU in GEGLU; GroupNorm eps 1e-5 in Transformer2D, PyTorch
    has 1e-6) so that what remains is the weight conversion alone."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(path / "unet").eval()
    if like_flax:
        for module in unet.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.eps = 1e-5
            if type(module).__name__ == "GEGLU":
                module.gelu = lambda gate: torch.nn.functional.gelu(gate, approximate="tanh")
    return unet


def test_load_returns_stable_diffusion(model):
    path, sd = model
    assert isinstance(sd, StableDiffusion)
    assert sd.source == str(path)
    assert sd.latent_channels == 4 and sd.vae_scale_factor == 4
    assert sd.fingerprint.startswith("sha256:")
    assert sd.scheduler_config["beta_schedule"] == "scaled_linear"
    assert "params" not in repr(sd)  # the repr does not print weights


def test_unet_matches_pytorch(model, inputs):
    path, sd = model
    unet_call = jax.jit(
        lambda params, x, t, text: sd.unet.apply({"params": params}, x, t, text).sample
    )
    out = unet_call(sd.unet_params, inputs["latents"], inputs["timesteps"], inputs["text"])
    args = [torch.from_numpy(inputs[k]) for k in ("latents", "timesteps", "text")]
    with torch.no_grad():
        exact = _torch_unet(path, like_flax=True)(*args).sample.numpy()
        stock = _torch_unet(path)(*args).sample.numpy()
    _close(out, exact, 1e-5)  # the conversion itself
    _close(out, stock, 1e-4)  # against stock PyTorch, incl. diffusers' Flax GELU / eps differences


def test_vae_matches_pytorch(model, inputs):
    from diffusers import AutoencoderKL

    path, sd = model
    vae = AutoencoderKL.from_pretrained(path / "vae").eval()

    def decode(params, z):
        return sd.vae.apply({"params": params}, z, method=sd.vae.decode).sample

    def encode(params, x):
        dist = sd.vae.apply({"params": params}, x, method=sd.vae.encode).latent_dist
        return dist.mean, dist.std

    image = jax.jit(decode)(sd.vae_params, inputs["latents"])
    mean, std = jax.jit(encode)(sd.vae_params, inputs["images"])
    with torch.no_grad():
        image_pt = vae.decode(torch.from_numpy(inputs["latents"])).sample.numpy()
        dist_pt = vae.encode(torch.from_numpy(inputs["images"])).latent_dist
    assert image.shape == (BATCH, 3, 64, 64)
    _close(image, image_pt, 1e-5)
    # diffusers' Flax encoder returns NHWC moments
    _close(np.moveaxis(np.asarray(mean), -1, 1), dist_pt.mean.numpy(), 1e-5)
    _close(np.moveaxis(np.asarray(std), -1, 1), dist_pt.std.numpy(), 1e-5)


def test_text_encoder_matches_pytorch(model):
    from transformers import CLIPTextModel, CLIPTokenizer

    path, sd = model
    prompts = ["a photo of a cat", "a red potted plant on the table, zebra"]
    ids = tokenize(sd.tokenizer, prompts)
    out = jax.jit(lambda p, i: sd.text_encoder.apply({"params": p}, i))(sd.text_params, ids)
    tokenizer_pt = CLIPTokenizer.from_pretrained(path / "tokenizer")
    ids_pt = tokenizer_pt(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        expected = CLIPTextModel.from_pretrained(path / "text_encoder").eval()(ids_pt.input_ids)
    np.testing.assert_array_equal(ids, ids_pt.input_ids.numpy())
    assert out.shape == (2, 77, 32)
    _close(out, expected.last_hidden_state.numpy(), 1e-5)


def test_clip_keys_with_and_without_text_model_prefix(tiny_sd_path):
    from safetensors.numpy import load_file

    bare = load_file(tiny_sd_path / "text_encoder" / "model.safetensors")
    assert not any(k.startswith("text_model.") for k in bare)
    prefixed = {f"text_model.{k}": v for k, v in bare.items()}
    prefixed["text_model.embeddings.position_ids"] = np.arange(77)[
        None
    ]  # a buffer older files carry
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, convert_state_dict(prefixed), convert_state_dict(bare)
    )


def test_attention_resolutions_match_pytorch(model):
    """The sides where PyTorch's UNet runs self-attention (attn1 sequence length = side**2)."""
    path, sd = model
    unet = _torch_unet(path)
    for image_side in (64, 128):
        sides = set()

        def record(module, args, out, sides=sides):
            sides.add(int(args[0].shape[1] ** 0.5))

        hooks = [
            module.register_forward_hook(record)
            for name, module in unet.named_modules()
            if name.endswith("attn1")
        ]
        latent = image_side // sd.vae_scale_factor
        with torch.no_grad():
            unet(torch.zeros(1, 4, latent, latent), torch.tensor([1]), torch.zeros(1, 77, 32))
        for hook in hooks:
            hook.remove()
        assert sd.attention_resolutions(image_side, image_side) == tuple(sorted(sides))


@pytest.mark.parametrize("flavour", ["tiny_sd_path", "tiny_sd2_path", "tiny_sd3_path"])
def test_attention_layout_matches_pytorch(flavour, request):
    """Sides, first up-block layers and heads, read off PyTorch's attn1 modules as they run
    (the 3-level UNet attends at its deepest side only in the mid block)."""
    from diffusers import UNet2DConditionModel

    from ports.sd.load import load

    path = request.getfixturevalue(flavour)
    sd = load(path)
    unet = UNet2DConditionModel.from_pretrained(path / "unet").eval()
    heads, first_up = {}, set()
    hooks = []
    for name, module in unet.named_modules():
        if not name.endswith("attn1"):
            continue

        def record(module, args, out, name=name):
            side = int(args[0].shape[1] ** 0.5)
            assert heads.setdefault(side, module.heads) == module.heads  # one count per side
            if name.startswith("up_blocks.") and ".attentions.0.transformer_blocks.0." in name:
                first_up.add(side)

        hooks.append(module.register_forward_hook(record))
    with torch.no_grad():
        unet(torch.zeros(1, 4, 16, 16), torch.tensor([1]), torch.zeros(1, 77, 32))
    for hook in hooks:
        hook.remove()
    layout = sd.attention_layout(64, 64)
    assert layout.sides == tuple(sorted(heads))
    assert layout.first_up == tuple(sorted(first_up))
    assert layout.heads == tuple(heads[r] for r in layout.sides)
    if flavour == "tiny_sd3_path":
        assert layout.sides == (4, 8, 16) and layout.first_up == (8, 16)


def test_attention_resolutions_errors(model):
    _, sd = model
    with pytest.raises(ValueError, match="square"):
        sd.attention_resolutions(64, 128)
    with pytest.raises(ValueError, match="multiple of 8"):
        sd.attention_resolutions(60, 60)


def test_bf16(tiny_sd_path, sd1):
    sd = load(tiny_sd_path, dtype=jnp.bfloat16)
    reference = sd1
    for params in (sd.unet_params, sd.vae_params, sd.text_params):
        assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {
            jnp.dtype(jnp.bfloat16)
        }
    assert sd.dtype == jnp.bfloat16 and sd.unet.dtype == jnp.bfloat16
    ids = tokenize(sd.tokenizer, ["a photo of a dog"])
    out = jax.jit(sd.text_encoder.apply)({"params": sd.text_params}, ids)
    expected = jax.jit(reference.text_encoder.apply)({"params": reference.text_params}, ids)
    assert out.dtype == jnp.bfloat16
    _close(out, expected, 5e-2)


def test_bin_weights_load_like_safetensors(tiny_sd_path, tmp_path):
    from safetensors.numpy import load_file

    from ports.sd.load import _read_weights

    folder = tmp_path / "text_encoder"
    folder.mkdir()
    state = load_file(tiny_sd_path / "text_encoder" / "model.safetensors")
    torch.save(
        {f"text_model.{k}": torch.from_numpy(v) for k, v in state.items()}, folder / "model.bin"
    )
    jax.tree_util.tree_map(
        np.testing.assert_array_equal,
        convert_state_dict(_read_weights(folder)),
        convert_state_dict(state),
    )


def test_bin_weights_without_torch_say_so(tmp_path, monkeypatch):
    from ports.sd.load import _read_weights

    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(ImportError, match="needs torch.*safetensors"):
        _read_weights(folder)


def test_fingerprint_is_stable_and_tracks_weights(tiny_sd_path, tmp_path):
    copy = shutil.copytree(tiny_sd_path, tmp_path / "copy")
    assert _fingerprint(copy) == _fingerprint(tiny_sd_path)
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert _fingerprint(copy) != _fingerprint(tiny_sd_path)


# ------------------------------------------------------------------------------- kept param shapes


@pytest.fixture
def shapes_cache(tmp_path):
    """JAX's persistent compilation cache on in ``tmp_path`` (as the commands turn it on); yields
    the folder where ``load`` keeps the params' shape trees. The config is restored after."""
    with compilation_cache_on(tmp_path / "xla") as folder:
        yield folder / SHAPES_FOLDER


def _entries(folder):
    """{module class name: [entry files]} of the kept shape trees."""
    entries = {}
    for path in sorted(folder.glob("*.json")):
        module = json.loads(path.read_text())["key"]["module"].rsplit(".", 1)[-1]
        entries.setdefault(module, []).append(path)
    return entries


_MODULES = {"FlaxUNet2DConditionModel", "FlaxAutoencoderKL", "CLIPTextEncoder"}


def _count_traces(monkeypatch):
    """Make ``jax.eval_shape`` record the class of each model whose init it traces."""
    traced = []
    eval_shape = jax.eval_shape

    def spy(fn, *args, **kwargs):
        name = type(getattr(fn, "__self__", None)).__name__
        if name in _MODULES:
            traced.append(name)
        return eval_shape(fn, *args, **kwargs)

    monkeypatch.setattr(jax, "eval_shape", spy)
    return traced


def _forbid_traces(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("jax.eval_shape was called: the kept param shapes were not used")

    monkeypatch.setattr(jax, "eval_shape", refuse)


def test_param_shapes_are_read_back_instead_of_traced(tiny_sd_path, shapes_cache, monkeypatch):
    checked = []  # the shape trees load checks the weights against, in order

    def spy(params, shapes, component):
        checked.append(
            (component, {k: (v.shape, v.dtype) for k, v in flatten_dict(shapes).items()})
        )
        _check_tree(params, shapes, component)

    monkeypatch.setattr("ports.sd.load._check_tree", spy)
    traced = _count_traces(monkeypatch)
    first = load(tiny_sd_path)
    assert sorted(traced) == sorted(_MODULES)
    assert {k: len(v) for k, v in _entries(shapes_cache).items()} == dict.fromkeys(_MODULES, 1)
    traced_shapes, checked[:] = list(checked), []

    _forbid_traces(monkeypatch)
    second = load(tiny_sd_path)
    assert checked == traced_shapes  # the same shapes and dtypes, leaf for leaf
    for name in ("unet_params", "vae_params", "text_params"):
        jax.tree_util.tree_map(
            np.testing.assert_array_equal, getattr(second, name), getattr(first, name)
        )
        assert jax.tree_util.tree_map(lambda a: a.dtype, getattr(second, name)) == (
            jax.tree_util.tree_map(lambda a: a.dtype, getattr(first, name))
        )


def test_a_damaged_or_other_shape_entry_is_not_used(
    tiny_sd_path, tiny_sd2_path, shapes_cache, monkeypatch
):
    load(tiny_sd_path)
    entries = {name: paths[0] for name, paths in _entries(shapes_cache).items()}
    unet_text = entries["FlaxUNet2DConditionModel"].read_text()
    vae_text = entries["FlaxAutoencoderKL"].read_text()
    entries["FlaxUNet2DConditionModel"].write_text(unet_text[: len(unet_text) // 2])  # truncated
    entries["FlaxAutoencoderKL"].write_text(entries["CLIPTextEncoder"].read_text())  # another key

    traced = _count_traces(monkeypatch)
    load(tiny_sd_path)
    assert sorted(traced) == ["FlaxAutoencoderKL", "FlaxUNet2DConditionModel"]  # not CLIP's
    # rewritten in place, whole
    assert json.loads(entries["FlaxUNet2DConditionModel"].read_text()) == json.loads(unet_text)
    assert json.loads(entries["FlaxAutoencoderKL"].read_text()) == json.loads(vae_text)
    assert not list(shapes_cache.glob(".*"))  # no temporary file left behind

    # another dtype, another config: their own entries, traced once, then read back
    traced.clear()
    load(tiny_sd_path, dtype=jnp.bfloat16)
    assert sorted(traced) == sorted(_MODULES)
    bf16 = _entries(shapes_cache)
    assert {k: len(v) for k, v in bf16.items()} == dict.fromkeys(_MODULES, 2)
    dtypes = {json.loads(p.read_text())["key"]["dtype"] for p in bf16["CLIPTextEncoder"]}
    assert dtypes == {"float32", "bfloat16"}
    traced.clear()
    sd2 = load(tiny_sd2_path)
    assert {"FlaxUNet2DConditionModel", "CLIPTextEncoder"} <= set(traced)
    assert len(_entries(shapes_cache)["FlaxUNet2DConditionModel"]) == 3

    _forbid_traces(monkeypatch)
    assert load(tiny_sd_path, dtype=jnp.bfloat16).dtype == jnp.bfloat16
    again = load(tiny_sd2_path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again.unet_params, sd2.unet_params)


# ------------------------------------------------------------------------------------------- errors


@pytest.fixture
def broken(tiny_sd_path, tmp_path):
    """A fresh copy of the tiny SD 1.x folder to break."""
    return shutil.copytree(tiny_sd_path, tmp_path / "sd")


def _edit_json(path, **changes):
    import json

    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint folder at .*Hub id"):
        load(tmp_path / "nothing-here")


def test_file_instead_of_folder(tiny_sd_path):
    with pytest.raises(FileNotFoundError, match="is a file, not a folder.*from_single_file"):
        load(tiny_sd_path / "model_index.json")


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder", "tokenizer", "scheduler"])
def test_missing_subfolder(broken, component):
    shutil.rmtree(broken / component)
    with pytest.raises(FileNotFoundError, match=f"no {component}/ subfolder.*save_pretrained"):
        load(broken)


def test_sdxl_text_encoder_2_is_refused(broken):
    (broken / "text_encoder_2").mkdir()
    with pytest.raises(ValueError, match="SDXL.*1.x / 2.x only"):
        load(broken)


def test_addition_embed_type_is_refused(broken):
    _edit_json(broken / "unet" / "config.json", addition_embed_type="text_time")
    with pytest.raises(ValueError, match="addition_embed_type.*SD 1.x / 2.x only"):
        load(broken)


def test_inpainting_unet_is_refused(broken):
    _edit_json(broken / "unet" / "config.json", in_channels=9)
    with pytest.raises(ValueError, match="inpainting"):
        load(broken)


def test_missing_weight_file(broken):
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError, match="no weight file in .*unet.*safe_serialization=True"
    ):
        load(broken)


def test_weights_not_matching_config(broken):
    from safetensors.numpy import load_file, save_file

    file = broken / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    del state["conv_in.weight"]
    state["extra.weight"] = np.zeros(3, np.float32)
    save_file(state, file)
    with pytest.raises(ValueError, match="missing: conv_in/kernel; unexpected: extra/kernel"):
        load(broken)


def test_bad_hub_id_names_the_fix(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # Offline and an empty cache: no network access, fails at once.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError, match="fetching it from the Hugging Face Hub failed.*local"):
        load("no-such-owner/no-such-model")


def test_hub_id_downloads_configs_then_weights(tiny_sd_path, sd1, tmp_path, monkeypatch):
    """A fake ``snapshot_download`` serving the tiny folder (its text encoder as a .bin only): the
    loader asks for configs first, then safetensors, then .bin where a component has none."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects
    from safetensors.numpy import load_file

    repo = shutil.copytree(tiny_sd_path, tmp_path / "repo")
    state = load_file(repo / "text_encoder" / "model.safetensors")
    torch.save(
        {k: torch.from_numpy(v) for k, v in state.items()}, repo / "text_encoder" / "model.bin"
    )
    (repo / "text_encoder" / "model.safetensors").unlink()
    snapshot = tmp_path / "cache" / "snapshots" / "0123abcd"
    requests = []

    def fake_snapshot_download(repo_id, *, revision=None, allow_patterns=None):
        requests.append(list(allow_patterns))
        files = [p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()]
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(repo / name, snapshot / name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    sd = load("someone/tiny-sd")
    assert sd.source == "someone/tiny-sd" and sd.fingerprint == "someone/tiny-sd@0123abcd"
    assert len(requests) == 3 and requests[2] == ["text_encoder/model.bin"]
    assert not any(p.name.endswith(".bin") for p in snapshot.rglob("*") if "unet" in p.parts)
    jax.tree_util.tree_map(np.testing.assert_array_equal, sd.text_params, sd1.text_params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, sd.unet_params, sd1.unet_params)


def test_flax_deprecation_message_is_silenced(capfd, model):
    _, sd = model
    jax.eval_shape(sd.unet.init_weights, jax.random.PRNGKey(0))  # runs every module's setup
    assert "Flax classes are deprecated" not in capfd.readouterr().err
    record = logging.LogRecord(
        "diffusers.models.attention_flax",
        logging.WARNING,
        __file__,
        0,
        "Flax classes are deprecated and will be removed in Diffusers v0.40.0.",
        None,
        None,
    )
    assert not logging.getLogger("diffusers.models.attention_flax").filter(record)


# ---------------------------------------------------------------------------------------- tokenizer


def test_tokenize_matches_transformers(tiny_sd_path):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_path / "tokenizer")
    prompts = ["a photo of a cat", "A Red Potted Plant.", ""]
    ids = tokenize(tokenizer, prompts)
    expected = tokenizer(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    assert ids.dtype == np.int32 and ids.shape == (3, 77)
    np.testing.assert_array_equal(ids, np.array(expected))


def test_tokenize_truncates_long_prompts_with_a_warning(tiny_sd_path):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_path / "tokenizer")
    prompt = "a cat " * 80  # 160 tokens + BOS/EOS
    with pytest.warns(UserWarning, match=r"prompt 'a cat a cat .* 85 tokens dropped"):
        ids = tokenize(tokenizer, [prompt])
    expected = tokenizer([prompt], padding="max_length", max_length=77, truncation=True).input_ids
    np.testing.assert_array_equal(ids, np.array(expected))


def test_tokenize_rejects_a_bare_string(tiny_sd_path):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_path / "tokenizer")
    with pytest.raises(TypeError, match="wrap it"):
        tokenize(tokenizer, "a cat")


def test_class_ids(tiny_sd_path):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_path / "tokenizer")
    prompt = tokenizer("a red potted plant").input_ids
    plant = class_ids(tokenizer, "potted plant")
    assert len(plant) == 2 and plant == prompt[3:5]  # [BOS, a, red, potted, plant, EOS]
    zebra = class_ids(tokenizer, "zebra")  # unknown word: character tokens
    assert zebra == tokenizer("zebra", add_special_tokens=False).input_ids and len(zebra) > 1
    assert tokenizer.bos_token_id not in zebra and tokenizer.eos_token_id not in zebra
    with pytest.raises(ValueError, match="non-empty"):
        class_ids(tokenizer, "  ")
