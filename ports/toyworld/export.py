"""Write Flax parameters as a diffusers-format Stable Diffusion folder (the inverse of
``ports.sd.load``).

The folder is what ``StableDiffusionPipeline.save_pretrained`` writes: ``unet/``, ``vae/`` and
``text_encoder/`` with ``config.json`` and PyTorch-named safetensors weights, ``tokenizer/``,
``scheduler/`` and ``model_index.json``; so both ``ports.sd.load`` and diffusers' PyTorch pipeline
read it.

Key names invert diffusers' ``rename_key`` / ``rename_key_and_reshape_tensor``
(``diffusers.models.modeling_flax_pytorch_utils``): a Flax module ``down_blocks_0`` is PyTorch's
``down_blocks.0`` (except ``linear_1`` / ``linear_2`` of the time embedding, whose PyTorch names
carry the underscore), attention ``query/key/value/proj_attn`` are ``to_q/to_k/to_v/to_out.0``,
``scale`` is ``weight``, a 4-d ``kernel`` (h, w, in, out) is a conv ``weight`` (out, in, h, w) and a
2-d one is a transposed linear ``weight``. The CLIP names invert
``ports.sd.clip.convert_state_dict``.
"""

import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from flax.traverse_util import flatten_dict

from ports.toyworld.vocab import write_clip_tokenizer

_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_KEEP_UNDERSCORE = re.compile(r"^linear_\d+$")  # TimestepEmbedding.linear_1 / linear_2
_INDEXED = re.compile(r"^(.+)_(\d+)$")
DIFFUSERS_VERSION = "0.39.0"


def diffusers_state_dict(params: Mapping) -> dict[str, np.ndarray]:
    """Flax UNet / VAE params -> the PyTorch ``state_dict`` diffusers saves (numpy arrays)."""
    state = {}
    for path, value in flatten_dict(params).items():
        value = np.asarray(value)
        *modules, leaf = path
        names = []
        for i, name in enumerate(modules):
            if i == len(modules) - 1 and name in _ATTENTION:
                names.append(_ATTENTION[name])
            elif (m := _INDEXED.match(name)) and not _KEEP_UNDERSCORE.match(name):
                names.append(f"{m.group(1)}.{m.group(2)}")
            else:
                names.append(name)
        if leaf == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
            leaf = "weight"
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        state[".".join([*names, leaf])] = np.ascontiguousarray(value)
    return state


def clip_state_dict(params: Mapping) -> dict[str, np.ndarray]:
    """``ports.sd.clip.CLIPTextEncoder`` params -> a transformers ``CLIPTextModel`` state dict."""
    state = {}
    for path, value in flatten_dict(params).items():
        value = np.asarray(value)
        *modules, leaf = path
        if modules[0] in ("token_embedding", "position_embedding"):
            key = f"embeddings.{modules[0]}.weight"
        else:
            if m := _INDEXED.match(modules[0]):  # layers_3 -> encoder.layers.3
                modules = ["encoder", m.group(1), m.group(2), *modules[1:]]
            if leaf == "kernel":
                value, leaf = value.T, "weight"
            elif leaf == "scale":
                leaf = "weight"
            key = ".".join([*modules, leaf])
        state[f"text_model.{key}"] = np.ascontiguousarray(value)
    return state


def save_pipeline(
    folder: str | os.PathLike,
    *,
    unet_config: Mapping,
    unet_params: Mapping,
    vae_config: Mapping,
    vae_params: Mapping,
    text_config: Mapping,
    text_params: Mapping,
    words: Iterable[str],
    scheduler_config: Mapping,
    dtype=np.float16,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write a diffusers-format folder; weights stored as ``dtype`` (float16
    keeps the toy model small).

    The folder is written under a temporary name and renamed into place, so an interrupted save
    leaves the previous folder (or none), never a half-written one. ``extra_files`` maps file names
    to text written at the top level (training record, README).
    """
    from safetensors.numpy import save_file

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    def weights(name: str, state: dict, config: Mapping) -> None:
        (tmp / name).mkdir()
        cast = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in state.items()}
        save_file(cast, str(tmp / name / _WEIGHT_FILES[name]), metadata={"format": "pt"})
        (tmp / name / "config.json").write_text(json.dumps(dict(config), indent=2) + "\n")

    weights("unet", diffusers_state_dict(unet_params), unet_config)
    weights("vae", diffusers_state_dict(vae_params), vae_config)
    weights("text_encoder", clip_state_dict(text_params), text_config)
    write_clip_tokenizer(
        tmp / "tokenizer", words, int(text_config.get("max_position_embeddings", 77))
    )
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(dict(scheduler_config), indent=2) + "\n"
    )
    (tmp / "model_index.json").write_text(json.dumps(_model_index(scheduler_config), indent=2))
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


_WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}


def _model_index(scheduler_config: Mapping) -> dict:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_config["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
