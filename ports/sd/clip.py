"""Stable Diffusion's CLIP text encoder as a small Flax linen module, and its weight conversion.

transformers 5 dropped ``FlaxCLIPTextModel``, so this is our own: token and position embeddings,
pre-LN transformer layers under a causal mask, a final layer norm. It returns the last hidden state
``(b, t, d)``, which is what the SD 1.x and 2.x UNets take as ``encoder_hidden_states`` (the SD 2.x
checkpoints ship a 23-layer text encoder, so no "penultimate layer" trick is needed). No padding
mask: SD runs CLIP on prompts padded to 77 tokens without one, and so do we.

Parameter names mirror the PyTorch ``CLIPTextModel`` state dict
(``layers_0/self_attn/q_proj/kernel`` for ``encoder.layers.0.self_attn.q_proj.weight``), so
``convert_state_dict`` is a rename and a transpose.
"""

import dataclasses
import json
import os
import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of a transformers ``CLIPTextConfig`` the encoder uses (hashable, so a static
    argument)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"unsupported CLIP hidden_act {self.hidden_act!r}; supported: "
                f"{sorted(_ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )

    @classmethod
    def from_dict(cls, config: Mapping) -> "CLIPTextConfig":
        """From a ``text_encoder/config.json`` dict (a CLIPTextConfig, or a full
        CLIPConfig's text part)."""
        if "text_config" in config and "hidden_size" not in config:
            config = config["text_config"]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "CLIPTextConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))


class CLIPAttention(nn.Module):
    """Multi-head causal self-attention with q/k/v/out projections (PyTorch ``CLIPAttention``)."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        b, t, d = hidden.shape
        heads = self.config.num_attention_heads
        head_dim = d // heads

        def project(name):
            return nn.Dense(d, dtype=self.dtype, name=name)(hidden).reshape(b, t, heads, head_dim)

        q = project("q_proj") * jnp.asarray(head_dim**-0.5, self.dtype)
        k = project("k_proj")
        v = project("v_proj")
        logits = jnp.einsum("bqhc,bkhc->bhqk", q, k).astype(jnp.float32)
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))
        logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhc->bqhc", probs, v).reshape(b, t, d)
        return nn.Dense(d, dtype=self.dtype, name="out_proj")(out)


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        hidden = nn.Dense(self.config.intermediate_size, dtype=self.dtype, name="fc1")(hidden)
        hidden = _ACTIVATIONS[self.config.hidden_act](hidden)
        return nn.Dense(self.config.hidden_size, dtype=self.dtype, name="fc2")(hidden)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer layer: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        eps = self.config.layer_norm_eps
        residual = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="layer_norm1")(hidden)
        hidden = hidden + CLIPAttention(self.config, self.dtype, name="self_attn")(residual)
        residual = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="layer_norm2")(hidden)
        return hidden + CLIPMLP(self.config, self.dtype, name="mlp")(residual)


class CLIPTextEncoder(nn.Module):
    """CLIP text transformer; ``apply({"params": p}, token_ids)`` gives the last hidden state.

    Args (call):
      token_ids: ``int32 (b, t)`` with ``t <= max_position_embeddings`` (SD: ``t = 77``).

    Returns:
      ``(b, t, hidden_size)`` in ``dtype``: the final-layer-normed last hidden state.

    Example::

        encoder = CLIPTextEncoder(CLIPTextConfig(vocab_size=100, hidden_size=32,
                                                 intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4))
        params = encoder.init(jax.random.key(0), jnp.zeros((1, 77), jnp.int32))["params"]
        encoder.apply({"params": params}, jnp.zeros((2, 77), jnp.int32)).shape  # (2, 77, 32)
    """

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, token_ids: jax.Array) -> jax.Array:
        cfg = self.config
        if token_ids.ndim != 2:
            raise ValueError(f"token_ids must be (b, t), got shape {token_ids.shape}")
        t = token_ids.shape[1]
        if t > cfg.max_position_embeddings:
            raise ValueError(
                f"token_ids has {t} tokens; the encoder takes at most "
                f"{cfg.max_position_embeddings} (tokenize with ports.sd.tokenizer.tokenize, which "
                "truncates)"
            )
        token_embedding = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="token_embedding"
        )
        position_embedding = nn.Embed(
            cfg.max_position_embeddings,
            cfg.hidden_size,
            dtype=self.dtype,
            name="position_embedding",
        )
        hidden = token_embedding(token_ids) + position_embedding(jnp.arange(t))[None]
        for i in range(cfg.num_hidden_layers):
            hidden = CLIPEncoderLayer(cfg, self.dtype, name=f"layers_{i}")(hidden)
        return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(
            hidden
        )


_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
_IGNORED = ("embeddings.position_ids",)  # a buffer some checkpoints store; not a parameter
_DROPPED = ("vision_model.", "visual_projection.", "text_projection.", "logit_scale")


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict:
    """PyTorch ``CLIPTextModel`` state dict -> the nested Flax params of ``CLIPTextEncoder``.

    Keys may carry the ``text_model.`` prefix (SD checkpoints, transformers 4) or not
    (transformers 5 ``save_pretrained``); ``embeddings.position_ids`` and the vision
    tower / projection heads of a full ``CLIPModel`` are dropped. Linear weights are transposed to
    ``kernel``; layer-norm ``weight`` becomes ``scale``; embedding ``weight`` becomes
    ``embedding``. Unknown keys are kept under their own dotted names so that the caller's
    structure check reports them.
    """
    params: dict = {}
    for key, value in state_dict.items():
        key = key.removeprefix("text_model.")
        if key in _IGNORED or key.startswith(_DROPPED):
            continue
        value = np.asarray(value)
        if key.startswith("embeddings.") and key.endswith(".weight"):
            path = (key.split(".")[1], "embedding")
        elif match := _LAYER.match(key):
            *module, leaf = match.group(2).split(".")
            path, value = _rename_leaf((f"layers_{match.group(1)}", *module), leaf, value)
        elif key.startswith("final_layer_norm."):
            path, value = _rename_leaf(("final_layer_norm",), key.split(".")[-1], value)
        else:
            path = tuple(key.split("."))
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return params


def _rename_leaf(module: tuple[str, ...], leaf: str, value: np.ndarray):
    """PyTorch (module path, 'weight' | 'bias', array) -> (Flax path, array)."""
    if leaf != "weight":
        return (*module, leaf), value
    if "norm" in module[-1]:
        return (*module, "scale"), value
    return (*module, "kernel"), value.T
