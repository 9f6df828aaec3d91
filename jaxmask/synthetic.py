"""Synthetic attention maps of a known scene: the demo's input and the tests' known answers.

A scene is a set of axis-aligned boxes, one per class, in fractional image coordinates. At
every side ``r`` the maps are what an ideal model would attend:

* self-attention is block-structured: a query attends (almost) uniformly to the pixels of its
  own region (a box or the background), so expansion from any seed inside a region recovers
  exactly that region;
* a class token's cross-attention is ``peak`` (one strong pixel at the box centre, faint
  elsewhere, like SD's sparse class-token response) or ``region`` (the whole box); the BOS
  token takes the rest of each pixel's attention, as in real prompts.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxmask.maps import AttentionMaps

Box = tuple[float, float, float, float]  # (top, left, bottom, right) as fractions of the side


def region_labels(boxes: tuple[Box, ...], r: int) -> Int[Array, "r r"]:
    """Label of each pixel centre at side ``r``: 0 background, ``c + 1`` inside box ``c``
    (later boxes are drawn over earlier ones)."""
    centres = (jnp.arange(r, dtype=jnp.float32) + 0.5) / r
    yy, xx = jnp.meshgrid(centres, centres, indexing="ij")
    labels = jnp.zeros((r, r), jnp.int32)
    for c, (top, left, bottom, right) in enumerate(boxes):
        inside = (yy >= top) & (yy < bottom) & (xx >= left) & (xx < right)
        labels = jnp.where(inside, c + 1, labels)
    return labels


def block_self_attention(labels: Int[Array, "r r"], leak: float = 0.05) -> Float[Array, "n n"]:
    """Row-stochastic self-attention: ``(1 - leak)`` spread over the query's own region,
    ``leak`` spread over all pixels."""
    flat = labels.reshape(-1)
    n = flat.shape[0]
    same = (flat[:, None] == flat[None, :]).astype(jnp.float32)
    own = same / jnp.sum(same, axis=1, keepdims=True)
    return (1.0 - leak) * own + leak / n


def cross_attention(
    labels: Int[Array, "r r"],
    num_classes: int,
    num_tokens: int,
    mode: str,
    key: jax.Array,
    noise: float = 0.02,
) -> Float[Array, "r r t"]:
    """Cross-attention of one layer: token 0 is BOS, class ``c`` sits at token ``c + 1``."""
    r = labels.shape[0]
    logits = jnp.zeros((r, r, num_tokens), jnp.float32)
    logits = logits.at[..., 0].set(3.0)  # BOS soaks up most attention, as in SD
    for c in range(num_classes):
        region = (labels == c + 1).astype(jnp.float32)
        if mode == "peak":
            ys, xs = jnp.nonzero(region > 0, size=r * r, fill_value=-1)
            count = jnp.maximum(jnp.sum(region > 0), 1)
            cy, cx = ys[count // 2], xs[count // 2]  # a pixel inside the box
            strength = jnp.zeros((r, r)).at[cy, cx].set(4.0) + 1.0 * region
        else:
            strength = 3.0 * region
        logits = logits.at[..., c + 1].set(strength)
    logits = logits + noise * jax.random.normal(key, logits.shape)
    return jax.nn.softmax(logits, axis=-1)


def scene_maps(
    boxes: tuple[Box, ...],
    sides: tuple[int, ...],
    key: jax.Array,
    num_tokens: int = 8,
    layers: int = 2,
    mode: str = "peak",
    self_layers: str = "mean",
) -> AttentionMaps:
    """AttentionMaps of a box scene at every side (cross per layer, self block-structured).

    >>> m = scene_maps(((0.25, 0.25, 0.75, 0.75),), (4, 8), jax.random.key(0))
    >>> m.cross[8].shape, m.self_attn[4].shape
    ((2, 8, 8, 8), (16, 16))
    """
    if len(boxes) + 1 > num_tokens:
        raise ValueError(f"{len(boxes)} classes need at least {len(boxes) + 1} tokens")
    cross, self_attn = {}, {}
    for i, r in enumerate(sorted(sides)):
        labels = region_labels(boxes, r)
        keys = jax.random.split(jax.random.fold_in(key, i), layers)
        cross[r] = jnp.stack(
            [cross_attention(labels, len(boxes), num_tokens, mode, k) for k in keys]
        )
        self_attn[r] = block_self_attention(labels)
    return AttentionMaps(
        cross=cross, self_attn=self_attn, self_layers=self_layers, resolutions=tuple(sorted(sides))
    )


def class_weights(num_classes: int, num_tokens: int = 8) -> Float[Array, "k t"]:
    """Token weights of ``scene_maps``' classes (class ``c`` at token ``c + 1``)."""
    return jax.nn.one_hot(jnp.arange(num_classes) + 1, num_tokens, dtype=jnp.float32)
