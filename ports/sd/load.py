"""Load a Stable Diffusion 1.x / 2.x checkpoint (diffusers format) as Flax modules and params.

``load(model)`` takes a local diffusers-format folder (``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``) or a Hugging Face Hub id, reads the ``*.safetensors`` weights with
``safetensors.numpy`` (no torch needed; ``*.bin`` is read with torch when it is installed), renames
and reshapes the PyTorch keys with diffusers' own PyTorch-to-Flax rules, and checks the result
against the parameter shapes ``jax.eval_shape`` gives for ``FlaxUNet2DConditionModel``,
``FlaxAutoencoderKL`` and our ``CLIPTextEncoder`` (no eager ``init_weights``: it would allocate and
initialise a second copy of the model). When JAX's persistent compilation cache is on (the commands
turn it on, ``ports.compile_cache``), those shape trees are kept as JSON next to the compiled
programs, so a warm load reads them instead of tracing each model's init (see ``_param_shapes``).

Example::

    sd = load("stabilityai/stable-diffusion-2-base", dtype=jnp.bfloat16)
    ids = tokenize(sd.tokenizer, ["a photo of a cat"])
    text = sd.text_encoder.apply({"params": sd.text_params}, ids)  # (1, 77, 1024)
    # latents: (1, 4, 64, 64)
    eps = sd.unet.apply({"params": sd.unet_params}, latents, t, text).sample
    image = sd.vae.apply({"params": sd.vae_params}, latents, method=sd.vae.decode).sample
"""

import dataclasses
import hashlib
import inspect
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxmask.maps import Layout
from ports import compile_cache
from ports.sd.clip import CLIPTextConfig, CLIPTextEncoder
from ports.sd.clip import convert_state_dict as convert_clip_state_dict

REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

# Weight file stems diffusers / transformers write, per component.
_WEIGHT_STEMS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}

_FOLDER_HINT = (
    "a diffusers-format Stable Diffusion folder has unet/, vae/, text_encoder/, tokenizer/ and "
    "scheduler/ (what StableDiffusionPipeline.save_pretrained writes); a single-file "
    ".ckpt/.safetensors checkpoint can be converted with diffusers: "
    "StableDiffusionPipeline.from_single_file(path).save_pretrained(folder)"
)

# PyTorch config values the diffusers Flax UNet hard-codes or lacks: any other value is an
# architecture it cannot run. (key: value the Flax port implements; a missing key means that value.)
_UNET_FIXED: dict[str, Any] = {
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "center_input_sample": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_embedding_type": "positional",
    "time_cond_proj_dim": None,
    "timestep_post_act": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "dual_cross_attention": False,
    "attention_type": "default",
    "cross_attention_norm": None,
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "reverse_transformer_layers_per_block": None,
}
_UNET_DOWN = {"CrossAttnDownBlock2D", "DownBlock2D"}
_UNET_UP = {"CrossAttnUpBlock2D", "UpBlock2D"}
_UNET_MID = {"UNetMidBlock2DCrossAttn", None}

_VAE_FIXED: dict[str, Any] = {
    "act_fn": "silu",
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
}


@dataclasses.dataclass
class StableDiffusion:
    """A loaded Stable Diffusion 1.x / 2.x: Flax modules, their params, tokenizer, scheduler config.

    Attributes:
      unet: ``FlaxUNet2DConditionModel``; ``unet.apply({"params": unet_params}, latents, t, text)``
        with ``latents (b, latent_channels, h/f, w/f)`` (NCHW), ``t`` int or ``(b,)``,
        ``text (b, 77, d)``; returns an output whose ``.sample`` is the NCHW noise (or v)
        prediction.
      vae: ``FlaxAutoencoderKL``; ``method=vae.decode`` maps latents (already divided by
        ``vae.scaling_factor``) to images in ``[-1, 1]`` (NCHW), ``method=vae.encode`` the reverse.
      text_encoder: our ``CLIPTextEncoder``;
        ``apply({"params": text_params}, ids)`` -> ``(b, 77, d)``.
      tokenizer: the checkpoint's transformers ``CLIPTokenizer`` (see ``ports.sd.tokenizer``).
      scheduler_config: ``scheduler/scheduler_config.json`` as a dict.
      latent_channels: channels of the latents (4 for SD 1.x / 2.x).
      vae_scale_factor: image side / latent side,
        ``2 ** (len(vae.block_out_channels) - 1)`` (8 for SD).
      source: the folder or hub id it was loaded from.
      fingerprint: identifies the weights: ``"<hub id>@<commit hash>"``, or for a local folder
        ``"sha256:..."`` over the files' names, sizes and sampled contents (see ``_fingerprint``).
      dtype: the dtype of the params and of the modules' computation.
    """

    unet: Any = dataclasses.field(repr=False)
    unet_params: Any = dataclasses.field(repr=False)
    vae: Any = dataclasses.field(repr=False)
    vae_params: Any = dataclasses.field(repr=False)
    text_encoder: CLIPTextEncoder = dataclasses.field(repr=False)
    text_params: Any = dataclasses.field(repr=False)
    tokenizer: Any = dataclasses.field(repr=False)
    scheduler_config: dict
    latent_channels: int
    vae_scale_factor: int
    source: str
    fingerprint: str
    dtype: Any = jnp.float32

    def attention_resolutions(self, height: int, width: int) -> tuple[int, ...]:
        """The latent sides ``r`` at which the UNet has (self- and cross-) attention, ascending.

        Read from the UNet's block types: down block ``i`` runs at ``side / 2**i``, the mid block at
        the smallest side, up block ``j`` at ``side / 2**(n-1-j)``; blocks named ``CrossAttn*`` (and
        the ``UNetMidBlock2DCrossAttn`` mid block) hold attention. SD 1.x / 2.x at 512x512:
        ``(8, 16, 32, 64)``.

        Args:
          height, width: the image size in pixels. jaxmask's attention maps are square (``r x r``),
            so they must be equal, and divisible by ``vae_scale_factor * 2**(len(blocks) - 1)`` so
            that the UNet's down and up paths line up.
        """
        return self.attention_layout(height, width).sides

    def attention_layout(self, height: int, width: int) -> Layout:
        """Where the UNet attends at ``height x width`` px: a ``jaxmask.Layout``.

        ``sides`` as ``attention_resolutions``; ``first_up``: the sides of the ``CrossAttn`` up
        blocks (their first layer is SeeDiff code's ``out_self[0]``); ``heads``: the heads of
        the level at each side (``num_attention_heads``, else diffusers' historical
        ``attention_head_dim``, per level; the mid block has the deepest level's). SD 1.x at
        512x512: sides ``(8, 16, 32, 64)``, first up ``(16, 32, 64)``, 8 heads everywhere.
        """
        unet = self.unet
        levels = len(unet.block_out_channels)
        multiple = self.vae_scale_factor * 2 ** (levels - 1)
        if height != width:
            raise ValueError(
                f"height {height} != width {width}: jaxmask's attention maps are square (r x r); "
                "use a square image size"
            )
        if height <= 0 or height % multiple:
            raise ValueError(
                f"image side {height} must be a positive multiple of {multiple} for this model "
                f"(VAE factor {self.vae_scale_factor} x UNet downsampling {2 ** (levels - 1)})"
            )
        side = height // self.vae_scale_factor
        heads = unet.num_attention_heads or unet.attention_head_dim
        heads = (heads,) * levels if isinstance(heads, int) else tuple(heads)
        per_side: dict[int, int] = {}  # side -> heads
        first_up = set()
        for i, block in enumerate(unet.down_block_types):
            if block.startswith("CrossAttn"):
                per_side[side // 2**i] = heads[i]
        if unet.mid_block_type == "UNetMidBlock2DCrossAttn":
            per_side[side // 2 ** (levels - 1)] = heads[-1]
        for j, block in enumerate(unet.up_block_types):
            if block.startswith("CrossAttn"):
                level = levels - 1 - j
                per_side[side // 2**level] = heads[level]
                first_up.add(side // 2**level)
        sides = tuple(sorted(per_side))
        return Layout(
            sides, first_up=tuple(sorted(first_up)), heads=tuple(per_side[r] for r in sides)
        )


def load(
    model: str | os.PathLike, *, dtype: Any = jnp.float32, revision: str | None = None
) -> StableDiffusion:
    """Load a Stable Diffusion 1.x / 2.x checkpoint from a diffusers-format folder or a Hub id.

    Args:
      model: a local folder (see ``StableDiffusion``'s layout) or a Hugging Face Hub id such as
        ``"stabilityai/stable-diffusion-2-base"`` (downloaded with
        ``huggingface_hub.snapshot_download``, only the files needed: configs, tokenizer, the
        safetensors weights; ``.bin`` only where a component has no safetensors).
      dtype: ``jnp.float32`` or ``jnp.bfloat16`` (or ``float16``): params are cast to it and the
        modules compute in it. Checkpoints stored in another float dtype are cast.
      revision: a Hub branch, tag or commit (Hub ids only).

    Returns:
      A ``StableDiffusion``.

    Raises:
      FileNotFoundError: the folder, a component subfolder or a weight file is missing.
      OSError: a Hub id could not be fetched.
      ValueError: an architecture other than SD 1.x / 2.x (e.g. SDXL), or weights that do not match
        the config (the message names the missing and unexpected parameters).
    """
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"dtype must be a float dtype such as jnp.float32 or jnp.bfloat16, got {dtype}"
        )
    folder, fingerprint = _resolve(model, revision)
    unet_config, vae_config, text_config = _check_architecture(folder)

    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
    from transformers import CLIPTokenizer

    unet_fields = flax_fields(FlaxUNet2DConditionModel, unet_config)
    unet = FlaxUNet2DConditionModel.from_config(unet_fields, dtype=dtype)
    unet_shapes = _param_shapes(
        unet, unet_fields, lambda: jax.eval_shape(unet.init_weights, jax.random.PRNGKey(0))
    )
    unet_params = _convert_diffusers(_read_weights(folder / "unet"), unet_shapes, "unet")

    vae_fields = flax_fields(FlaxAutoencoderKL, vae_config)
    vae = FlaxAutoencoderKL.from_config(vae_fields, dtype=dtype)
    vae_shapes = _param_shapes(
        vae, vae_fields, lambda: jax.eval_shape(vae.init_weights, jax.random.PRNGKey(0))
    )
    vae_params = _convert_diffusers(_read_weights(folder / "vae"), vae_shapes, "vae")

    text_encoder = CLIPTextEncoder(text_config, dtype=dtype)
    text_shapes = _param_shapes(
        text_encoder,
        dataclasses.asdict(text_config),
        lambda: jax.eval_shape(
            text_encoder.init,
            jax.random.PRNGKey(0),
            jnp.zeros((1, text_config.max_position_embeddings), jnp.int32),
        )["params"],
    )
    text_params = convert_clip_state_dict(_read_weights(folder / "text_encoder"))
    _check_tree(text_params, text_shapes, "text_encoder")

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    with open(folder / "scheduler" / "scheduler_config.json") as f:
        scheduler_config = json.load(f)

    return StableDiffusion(
        unet=unet,
        unet_params=_to_device(unet_params, dtype),
        vae=vae,
        vae_params=_to_device(vae_params, dtype),
        text_encoder=text_encoder,
        text_params=_to_device(text_params, dtype),
        tokenizer=tokenizer,
        scheduler_config=scheduler_config,
        latent_channels=int(vae_config.get("latent_channels", 4)),
        vae_scale_factor=2 ** (len(vae_config["block_out_channels"]) - 1),
        source=str(model),
        fingerprint=fingerprint,
        dtype=dtype,
    )


def cast_floating(tree, dtype):
    """Cast every floating leaf of a params tree to ``dtype`` (``FlaxModelMixin.to_bf16`` is broken
    on new jax); other leaves are left as they are."""
    dtype = jnp.dtype(dtype)

    def cast(leaf):
        leaf = jnp.asarray(leaf)
        return leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

    return jax.tree_util.tree_map(cast, tree)


# ----------------------------------------------------------------------------------------- locating


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_HUB_CONFIGS = [
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "tokenizer/*",
    "scheduler/scheduler_config.json",
]


def _resolve(model: str | os.PathLike, revision: str | None) -> tuple[Path, str]:
    """(local folder holding the checkpoint, fingerprint)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{str(model)!r} is a file, not a folder: {_FOLDER_HINT}")
        if revision is not None:
            raise ValueError(
                f"revision={revision!r} is for Hub ids; {str(model)!r} is a local folder"
            )
        return path, _fingerprint(path)
    text = os.fspath(model)
    looks_like_path = (
        isinstance(model, os.PathLike)
        or text.startswith((".", "~", os.sep, "/"))
        or text.count("/") > 1
        or (os.altsep is not None and os.altsep in text)
        or not _HUB_ID.match(text)
    )
    if looks_like_path:
        raise FileNotFoundError(
            f"no checkpoint folder at {text!r}: pass an existing folder or a Hugging Face Hub id "
            f"such as 'stabilityai/stable-diffusion-2-base'; {_FOLDER_HINT}"
        )
    return _fetch(text, revision)


def _fetch(repo_id: str, revision: str | None) -> tuple[Path, str]:
    """Download the configs, check the architecture, then download the weights it needs."""
    from huggingface_hub import snapshot_download

    def download(patterns):
        try:
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
        except Exception as error:  # network, auth, missing repo or revision: all end the same way
            raise OSError(
                f"{repo_id!r} is not a local folder, and fetching it from the Hugging Face Hub "
                f"failed ({type(error).__name__}: {error}). Fix: check the id and revision, the "
                "network (HF_HUB_OFFLINE must be unset to download), and for gated models accept "
                "the licence on the model page and log in (`hf auth login` or HF_TOKEN); or pass a "
                f"local diffusers-format folder ({_FOLDER_HINT})"
            ) from error

    folder = download(_HUB_CONFIGS)
    _check_architecture(folder)
    stems = {f"{name}/{stem}" for name, stem in _WEIGHT_STEMS.items()}
    folder = download([f"{stem}.safetensors" for stem in sorted(stems)])
    missing = [s for s in sorted(stems) if not (folder / f"{s}.safetensors").exists()]
    if missing:  # older repos: pickled weights only
        folder = download([f"{s}.bin" for s in missing])
    # snapshot folders are named by the resolved commit hash
    return folder, f"{repo_id}@{folder.name}"


_HEAD = 1 << 20  # bytes hashed at each file's start and end
_SAMPLES = 32  # and this many 64 KiB chunks spread evenly between them
_SAMPLE = 1 << 16


def _fingerprint(folder: Path) -> str:
    """sha256 over the checkpoint files' relative names and sizes, their first and last MiB and 32
    evenly spaced 64 KiB chunks (about 4 MiB read per file, so cheap on a 5 GB folder, yet a
    fine-tune that changes only some layers, e.g. a merged LoRA, still changes it)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = file.relative_to(folder).as_posix()
        if relative.startswith(".") or "/." in relative:  # .cache, .git, ...
            continue
        size = file.stat().st_size
        digest.update(f"{relative}\0{size}\0".encode())
        with open(file, "rb") as f:
            if size <= 2 * _HEAD + _SAMPLES * _SAMPLE:
                digest.update(f.read())
                continue
            digest.update(f.read(_HEAD))
            for i in range(_SAMPLES):
                f.seek(_HEAD + (size - 2 * _HEAD) * i // _SAMPLES)
                digest.update(f.read(_SAMPLE))
            f.seek(size - _HEAD)
            digest.update(f.read(_HEAD))
    return "sha256:" + digest.hexdigest()


# ------------------------------------------------------------------------------------- architecture


def _read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def _check_architecture(folder: Path) -> tuple[dict, dict, CLIPTextConfig]:
    """Check the folder holds an SD 1.x / 2.x the Flax port can run; return the unet, vae and text
    configs."""
    if (folder / "text_encoder_2").exists():
        raise ValueError(
            f"{folder} has a text_encoder_2/ folder: this looks like SDXL (or another two-encoder "
            "model). jaxmask loads Stable Diffusion 1.x / 2.x only; use e.g. "
            "'stable-diffusion-v1-5/stable-diffusion-v1-5' or 'stabilityai/stable-diffusion-2-base'"
        )
    for name in REQUIRED:
        if not (folder / name).is_dir():
            raise FileNotFoundError(f"{folder} has no {name}/ subfolder; {_FOLDER_HINT}")
    for name in ("unet", "vae", "text_encoder"):
        if not (folder / name / "config.json").is_file():
            raise FileNotFoundError(f"{folder / name} has no config.json; {_FOLDER_HINT}")
    if not (folder / "scheduler" / "scheduler_config.json").is_file():
        raise FileNotFoundError(
            f"{folder / 'scheduler'} has no scheduler_config.json; {_FOLDER_HINT}"
        )

    unet = _read_json(folder / "unet" / "config.json")
    vae = _read_json(folder / "vae" / "config.json")
    text = _read_json(folder / "text_encoder" / "config.json")

    def unsupported(what: str) -> ValueError:
        return ValueError(
            f"{folder} is not a Stable Diffusion 1.x / 2.x checkpoint the Flax port can run: "
            f"{what}. jaxmask loads SD 1.x / 2.x only (e.g. "
            "'stable-diffusion-v1-5/stable-diffusion-v1-5', "
            "'stabilityai/stable-diffusion-2-base'); SDXL, inpainting and other UNet variants are "
            "not supported"
        )

    if unet.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise unsupported(f"unet/ is a {unet['_class_name']}, not a UNet2DConditionModel")
    if unet.get("addition_embed_type") is not None:
        raise unsupported(
            f"unet addition_embed_type={unet['addition_embed_type']!r} "
            "(SDXL-style added conditioning)"
        )
    for key, value in _UNET_FIXED.items():
        if unet.get(key, value) != value:
            raise unsupported(
                f"unet {key}={unet[key]!r} (the Flax UNet implements {key}={value!r})"
            )
    for key, allowed in (
        ("down_block_types", _UNET_DOWN),
        ("up_block_types", _UNET_UP),
    ):
        bad = [b for b in unet.get(key, ()) if b not in allowed]
        if bad:
            raise unsupported(f"unet {key} has {bad} (supported: {sorted(allowed)})")
    mid = unet.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in _UNET_MID:
        raise unsupported(f"unet mid_block_type={mid!r} (supported: UNetMidBlock2DCrossAttn)")

    if vae.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise unsupported(f"vae/ is a {vae['_class_name']}, not an AutoencoderKL")
    for key, value in _VAE_FIXED.items():
        if vae.get(key, value) != value:
            raise unsupported(f"vae {key}={vae[key]!r} (the Flax VAE implements {key}={value!r})")
    if "block_out_channels" not in vae:
        raise unsupported("vae/config.json has no block_out_channels")

    latent_channels = vae.get("latent_channels", 4)
    in_channels = unet.get("in_channels", 4)
    if in_channels != latent_channels or unet.get("out_channels", 4) != latent_channels:
        raise unsupported(
            f"unet in/out channels ({in_channels}, {unet.get('out_channels', 4)}) differ from the "
            f"VAE's {latent_channels} latent channels (inpainting / depth-conditioned UNet)"
        )
    text_config = CLIPTextConfig.from_dict(text)
    cross = unet.get("cross_attention_dim", 1280)
    if cross != text_config.hidden_size:
        raise unsupported(
            f"unet cross_attention_dim {cross} != text encoder hidden_size "
            f"{text_config.hidden_size}"
        )
    return unet, vae, text_config


def flax_fields(cls, config: Mapping) -> dict:
    """The config entries the Flax class has fields for (diffusers would log the rest as
    unexpected), JSON lists as tuples so that the module stays hashable (a static argument to
    ``jax.jit``)."""
    names = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "dtype"}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in names}


# ------------------------------------------------------------------------------------------ weights


def _weight_files(component: Path) -> list[Path]:
    """The weight files of one component: canonical safetensors, else
    sharded, else any, else .bin."""
    stem = _WEIGHT_STEMS[component.name]
    candidates = [
        [component / f"{stem}.safetensors"],
        _shards(component / f"{stem}.safetensors.index.json"),
        sorted(component.glob("*.safetensors"))[:1],
        [component / f"{stem}.bin"],
        _shards(component / f"{stem}.bin.index.json"),
        sorted(component.glob("*.bin"))[:1],
    ]
    for files in candidates:
        if files and all(f.is_file() for f in files):
            return files
    raise FileNotFoundError(
        f"no weight file in {component}: expected {stem}.safetensors (or {stem}.bin); "
        "re-save the model with save_pretrained(..., safe_serialization=True) or re-download it"
    )


def _shards(index: Path) -> list[Path]:
    if not index.is_file():
        return []
    names = sorted(set(_read_json(index)["weight_map"].values()))
    return [index.parent / name for name in names]


def _read_weights(component: Path) -> dict[str, np.ndarray]:
    """The component's PyTorch state dict as numpy arrays."""
    state: dict[str, np.ndarray] = {}
    for file in _weight_files(component):
        try:
            if file.suffix == ".safetensors":
                from safetensors.numpy import load_file

                state.update(load_file(file))
            else:
                state.update(_read_bin(file))
        except (ImportError, MemoryError):
            raise
        except Exception as error:  # safetensors' SafetensorError, torch's unpickling errors, ...
            raise ValueError(
                f"cannot read the weights in {file}: it is damaged or truncated "
                f"({type(error).__name__}: {error}). Copy or download the checkpoint again."
            ) from error
    return state


def _read_bin(file: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{file} is a pickled PyTorch file and reading it needs torch, which is not installed. "
            "Install torch, or convert the weights to safetensors (load the model in PyTorch and "
            "save_pretrained(..., safe_serialization=True))"
        ) from None
    state = torch.load(file, map_location="cpu", weights_only=True)
    out = {}
    for key, tensor in state.items():
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        out[key] = tensor.numpy()
    return out


def _convert_diffusers(state: Mapping[str, np.ndarray], shapes, component: str) -> dict:
    """A diffusers PyTorch state dict -> Flax params, with diffusers' own key rules, checked against
    the ``eval_shape`` tree ``shapes``."""
    from diffusers.models.modeling_flax_pytorch_utils import (
        rename_key,
        rename_key_and_reshape_tensor,
    )

    expected = flatten_dict(shapes)
    flat = {}
    for key, tensor in state.items():
        pt_key = tuple(rename_key(key).split("."))
        try:
            flax_key, tensor = rename_key_and_reshape_tensor(pt_key, np.asarray(tensor), expected)
        except AssertionError:  # diffusers asserts the shape of attention projections
            raise ValueError(
                f"{component} weight {key} has shape {tuple(np.shape(tensor))}, which does not "
                f"match {component}/config.json. Fix: make sure {component}/ holds the weights "
                "saved with its config.json"
            ) from None
        flat[flax_key] = tensor
    params = unflatten_dict(flat)
    _check_tree(params, shapes, component)
    return params


def _check_tree(params, shapes, component: str) -> None:
    """Raise ValueError naming missing, unexpected and mis-shaped parameters."""
    got = flatten_dict(params)
    expected = flatten_dict(shapes)
    missing = sorted("/".join(k) for k in expected.keys() - got.keys())
    unexpected = sorted("/".join(k) for k in got.keys() - expected.keys())
    wrong = sorted(
        f"{'/'.join(k)}: {tuple(got[k].shape)} (config expects {tuple(expected[k].shape)})"
        for k in expected.keys() & got.keys()
        if tuple(got[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong:

        def show(names):
            return ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")

        parts = [
            f"{label}: {show(names)}"
            for label, names in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", wrong),
            )
            if names
        ]
        raise ValueError(
            f"{component} weights do not match {component}/config.json ({'; '.join(parts)}). Fix: "
            f"make sure {component}/ holds the weights saved with its config.json (a Stable "
            "Diffusion 1.x / 2.x checkpoint in diffusers format)"
        )


def _to_device(params, dtype):
    """numpy params -> jax arrays of ``dtype``: cast on the host first (so bf16 moves half the
    bytes), then one ``jax.device_put`` of the whole tree (one batched transfer, not one per
    leaf)."""

    def cast(leaf):
        leaf = np.asarray(leaf)
        if np.issubdtype(leaf.dtype, np.floating) or leaf.dtype == jnp.bfloat16:
            leaf = leaf.astype(dtype)
        return leaf

    return jax.device_put(jax.tree_util.tree_map(cast, params))


# ---------------------------------------------------------------------------------- param shapes

#: Subfolder of JAX's compilation cache folder that keeps the params' shape trees.
SHAPES_FOLDER = "jaxmask-param-shapes"


def _param_shapes(module, config: Mapping, trace: Callable[[], Any]):
    """The shape tree of ``module``'s params (``jax.ShapeDtypeStruct`` leaves): ``trace()``, a
    ``jax.eval_shape`` of the module's init, or its result kept from an earlier load.

    With JAX's persistent compilation cache on (``jax_compilation_cache_dir`` a local folder), the
    tree is kept as JSON in ``<that folder>/jaxmask-param-shapes/``, one file per key: the module
    class, a sha256 of the source file defining it, ``config``, the dtype and the diffusers, flax
    and jax versions. An entry that is missing, unreadable, damaged or made for another key is
    traced again and rewritten (atomically: a temporary file, then ``os.replace``); a folder that
    cannot be written to only means the next load traces again. With the cache off, ``trace()``.
    """
    folder = compile_cache.subfolder(SHAPES_FOLDER)
    if folder is None:
        return trace()
    key = _shapes_key(module, config)
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    path = folder / f"{name}.json"
    shapes = _read_shapes(path, key)
    if shapes is None:
        shapes = trace()
        _write_shapes(path, key, shapes)
    return shapes


def _shapes_key(module, config: Mapping) -> dict:
    """What the shape tree depends on, as plain JSON values."""
    import diffusers
    import flax

    cls = type(module)
    source = inspect.getsourcefile(cls)
    with open(source, "rb") as f:
        source_hash = hashlib.sha256(f.read()).hexdigest()
    key = {
        "module": f"{cls.__module__}.{cls.__qualname__}",
        "source": source_hash,
        "config": dict(config),
        "dtype": jnp.dtype(module.dtype).name,
        "versions": {
            "diffusers": diffusers.__version__,
            "flax": flax.__version__,
            "jax": jax.__version__,
        },
    }
    return json.loads(json.dumps(key, sort_keys=True, default=repr))  # tuples -> lists, as read


def _read_shapes(path: Path, key: dict):
    """The shape tree kept in ``path`` for ``key``, or None (missing, damaged, another key)."""
    try:
        entry = json.loads(path.read_text())
        if entry["key"] != key:
            return None
        flat = {}
        for names, shape, dtype in entry["params"]:
            if not names or not all(isinstance(n, str) for n in names):
                return None
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                return None
            flat[tuple(names)] = jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return unflatten_dict(flat) if flat else None


def _write_shapes(path: Path, key: dict, shapes) -> None:
    """Keep ``shapes`` for ``key`` in ``path`` (``compile_cache.write_entry``: atomic, a failed
    write ignored)."""
    entry = {
        "key": key,
        "params": [
            [list(names), list(leaf.shape), jnp.dtype(leaf.dtype).name]
            for names, leaf in flatten_dict(shapes).items()
        ],
    }
    compile_cache.write_entry(path, json.dumps(entry).encode())
