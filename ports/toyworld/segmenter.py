"""A small supervised segmenter for the shapes world (flax.linen + optax): the quality oracle.

``ports.toyworld.quality`` trains it twice: on real world scenes with their exact labels (the
oracle that scores jaxmask's masks on generated images), and on jaxmask's synthetic pairs (the
papers' protocol: train a segmenter on generated data, test it on real data).

The network is a plain conv UNet: per level two 3x3 convs (GroupNorm, GELU), 2x2 max-pool down,
nearest upsampling and a skip concatenation up, a 1x1 conv to ``num_classes`` logits. At the
default widths ``(16, 32, 64, 64)`` it has about 190k parameters and a receptive field wider than
the world's largest object (~28 px at 64 px).

Everything is a pure function of (params, arrays, key); ``train`` only loops and reports::

    params = segmenter.init(jax.random.key(0))
    params, losses = segmenter.train((images, labels), steps=500, batch=32, key=jax.random.key(1))
    pred = segmenter.predict(params, images)          # (b, h, w) uint8 class ids
    segmenter.save(path, params); params = segmenter.load(path)

Labels are ``(h, w)`` uint8 class ids, 0 background, 1..8 ``scenes.CLASSES`` index + 1, and
``IGNORE`` (255) for pixels that carry no supervision: they add nothing to the loss or its
gradient.
"""

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmask.labels import IGNORE
from jaxmask.metrics import confusion_matrix, iou, mean_iou
from ports.progress import reporter

NUM_CLASSES = 9  # background + scenes.CLASSES


@dataclasses.dataclass(frozen=True)
class SegmenterConfig:
    """Widths per level (one 2x pooling between levels), output classes, GroupNorm groups."""

    features: tuple[int, ...] = (32, 64, 96)
    num_classes: int = NUM_CLASSES
    groups: int = 8  # every width must be a multiple

    def __post_init__(self):
        if not self.features or any(f % self.groups for f in self.features):
            raise ValueError(
                f"features must be non-empty multiples of groups={self.groups}, got {self.features}"
            )

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this (the stem halves them, each level again)."""
        return 2 ** len(self.features)


DEFAULT = SegmenterConfig()


def _conv(x, features: int, groups: int, kernel: int = 3):
    x = nn.Conv(features, (kernel, kernel))(x)
    return nn.gelu(nn.GroupNorm(num_groups=groups)(x))


class UNet(nn.Module):
    """Conv UNet: ``(b, h, w, 3)`` float images in [0, 1] -> ``(b, h, w, k)`` logits.

    Stem: 2x2 space-to-depth (each pixel stays visible, the convs run at half size). Encoder:
    per level two 3x3 convs, 2x2 max-pool between levels. Decoder (FPN-like, cheap): nearest 2x
    upsampling, a 1x1 projection added to the skip, one 3x3 conv. Head: 1x1 conv to ``4 k`` logits,
    depth-to-space back to full size (sub-pixel).
    """

    cfg: SegmenterConfig = DEFAULT

    @nn.compact
    def __call__(self, images):
        b, h, w, c = images.shape
        g = self.cfg.groups
        x = images * 2.0 - 1.0
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, h // 2, w // 2, 4 * c)
        skips = []
        for level, width in enumerate(self.cfg.features):
            if level:
                x = nn.max_pool(x, (2, 2), (2, 2))
            x = _conv(_conv(x, width, g), width, g)
            skips.append(x)
        for width, skip in zip(reversed(self.cfg.features[:-1]), reversed(skips[:-1]), strict=True):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            x = _conv(nn.Dense(width)(x) + skip, width, g)
        k = self.cfg.num_classes
        x = nn.Conv(4 * k, (1, 1))(x)
        x = x.reshape(b, h // 2, w // 2, 2, 2, k).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h, w, k)


# ------------------------------------------------------------------------------ pure functions


def _check_size(h: int, w: int, cfg: SegmenterConfig) -> None:
    m = cfg.multiple
    if h % m or w % m:
        raise ValueError(f"image sides must be multiples of {m} for this segmenter, got {h}x{w}")


def init(key: jax.Array, size: int = 64, cfg: SegmenterConfig = DEFAULT) -> dict:
    """Fresh parameters for ``size x size`` images (the convs do not depend on the size)."""
    _check_size(size, size, cfg)
    return UNet(cfg).init(key, jnp.zeros((1, size, size, 3), jnp.float32))["params"]


def to_float(images) -> jax.Array:
    """uint8 ``(..., 3)`` images to float32 in [0, 1]; float images pass through."""
    images = jnp.asarray(images)
    if jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def apply(params, images, cfg: SegmenterConfig = DEFAULT) -> jax.Array:
    """Logits ``(b, h, w, k)`` of ``(b, h, w, 3)`` images (uint8, or float in [0, 1])."""
    images = to_float(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape (b, h, w, 3), got {images.shape}")
    _check_size(images.shape[1], images.shape[2], cfg)
    return UNet(cfg).apply({"params": params}, images)


def loss(params, images, labels, cfg: SegmenterConfig = DEFAULT) -> jax.Array:
    """Mean pixel cross-entropy over the pixels whose label is not ``IGNORE`` (0 if none is).

    ``L = sum_p [y_p != 255] CE(logits_p, y_p) / max(1, sum_p [y_p != 255])``
    """
    logits = apply(params, images, cfg)
    labels = jnp.asarray(labels).astype(jnp.int32)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must have shape {logits.shape[:-1]} (b, h, w), got {labels.shape}"
        )
    valid = labels != IGNORE
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    weight = valid.astype(jnp.float32)
    return jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def augment(key: jax.Array, images: jax.Array, labels: jax.Array):
    """Random flips and 90-degree turns per batch (the world's shapes are rotated at random)."""
    k_flip, k_turn = jax.random.split(key)
    flip = jax.random.bernoulli(k_flip)
    images = jnp.where(flip, images[:, :, ::-1], images)
    labels = jnp.where(flip, labels[:, :, ::-1], labels)
    turns = jax.random.randint(k_turn, (), 0, 4)
    if images.shape[1] == images.shape[2]:
        branches = [
            lambda xy, k=k: (jnp.rot90(xy[0], k, (1, 2)), jnp.rot90(xy[1], k, (1, 2)))
            for k in range(4)
        ]
        images, labels = jax.lax.switch(turns, branches, (images, labels))
    return images, labels


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    step: jax.Array


def optimizer(steps: int, lr: float = 3e-3, weight_decay: float = 1e-4):
    """adamw on a warmup-cosine schedule (5% warmup, down to 5% of ``lr``)."""
    warmup = max(1, min(100, steps // 20))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, max(steps, warmup + 1), lr * 0.05
    )
    return optax.adamw(schedule, weight_decay=weight_decay)


@dataclasses.dataclass(frozen=True)
class _Trainer:
    """The jitted step of one run (the optimiser and config are static)."""

    tx: optax.GradientTransformation
    cfg: SegmenterConfig
    augment: bool
    batch: int

    def step(self, state: TrainState, images, labels, key):
        """One adamw step on a batch drawn (with augmentation) from the device-resident set."""
        k_pick, k_aug = jax.random.split(jax.random.fold_in(key, state.step))
        n = images.shape[0]
        idx = jax.random.choice(k_pick, n, (self.batch,), replace=n < self.batch)
        x, y = to_float(images[idx]), labels[idx]
        if self.augment:
            x, y = augment(k_aug, x, y)
        value, grads = jax.value_and_grad(loss)(state.params, x, y, self.cfg)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, state.step + 1), value


def train(
    data,
    steps: int,
    batch: int,
    key: jax.Array,
    *,
    params=None,
    cfg: SegmenterConfig = DEFAULT,
    lr: float = 3e-3,
    augment: bool = True,
    progress: bool | Callable[[int, float], None] = True,
    label: str = "segmenter",
) -> tuple[Any, np.ndarray]:
    """Train on ``(images, labels)`` pairs; return the params and the per-step losses.

    Args:
      data: ``(images (n, h, w, 3) uint8, labels (n, h, w) uint8)`` arrays, kept on the device,
        each step drawing ``batch`` of them at random; or an iterator of such batches (one per
        step, e.g. rendered on the fly).
      steps: optimiser steps.
      batch: pairs per step.
      key: initialisation (unless ``params`` is given), batch draws and augmentation derive from it
        (``fold_in(key, step)``): the same key and data give the same params.
      params: start from these instead of ``init``.
      lr: peak learning rate of the warmup-cosine adamw schedule.
      augment: random flips and quarter turns.
      progress: True: a text bar on stderr; a callable ``(done_steps, loss)`` called every few
        steps; False: silent.

    Returns:
      ``(params, losses)``, losses ``(steps,)`` float32.
    """
    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be >= 1, got steps={steps}, batch={batch}")
    k_init, k_data = jax.random.split(key)
    iterator = _as_iterator(data)
    first_images, first_labels = next(iterator) if iterator is not None else data
    first_images, first_labels = np.asarray(first_images), np.asarray(first_labels)
    if first_images.ndim != 4 or first_labels.shape != first_images.shape[:3]:
        raise ValueError(
            "data must be images (n, h, w, 3) and labels (n, h, w), got "
            f"{first_images.shape} and {first_labels.shape}"
        )
    if params is None:
        params = init(k_init, first_images.shape[1], cfg)
    tx = optimizer(steps, lr)
    trainer = _Trainer(tx, cfg, augment, batch)
    step = jax.jit(trainer.step, donate_argnums=0)
    state = TrainState(params, tx.init(params), jnp.int32(0))
    images = jnp.asarray(first_images)
    labels = jnp.asarray(first_labels)
    losses = []
    report = reporter(progress, steps, label)
    every = max(1, steps // 50)
    for i in range(steps):
        if iterator is not None and i > 0:
            images, labels = (jnp.asarray(a) for a in next(iterator))
        state, value = step(state, images, labels, k_data)
        losses.append(value)
        if (i + 1) % every == 0 or i + 1 == steps:
            report(i + 1, float(value))
    return state.params, np.asarray(jax.device_get(losses), np.float32)


def _as_iterator(data) -> Iterator | None:
    if isinstance(data, (tuple, list)) and len(data) == 2 and hasattr(data[0], "shape"):
        return None
    return iter(data)


def _argmax(params, images, cfg):
    return jnp.argmax(apply(params, images, cfg), axis=-1).astype(jnp.uint8)


_argmax_jit = jax.jit(_argmax, static_argnums=2)


def predict(params, images, *, cfg: SegmenterConfig = DEFAULT, batch: int = 256) -> np.ndarray:
    """Class ids ``(b, h, w)`` uint8 (the argmax of the logits), computed ``batch`` at a time."""
    images = np.asarray(images)
    out = np.empty(images.shape[:3], np.uint8)
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        out[start : start + len(chunk)] = np.asarray(_argmax_jit(params, jnp.asarray(chunk), cfg))
    return out


# ------------------------------------------------------------------------------------ scoring

_confusion_batch = jax.jit(
    jax.vmap(confusion_matrix, in_axes=(0, 0, None, None)), static_argnums=(2, 3)
)


def confusion(labels, preds, num_classes: int = NUM_CLASSES, batch: int = 256) -> np.ndarray:
    """The dataset's ``(k, k)`` confusion matrix (int64, rows ground truth), ``IGNORE`` dropped."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    if labels.shape != preds.shape:
        raise ValueError(f"labels {labels.shape} and preds {preds.shape} must have the same shape")
    conf = np.zeros((num_classes, num_classes), np.int64)
    for start in range(0, len(labels), batch):
        part = _confusion_batch(
            jnp.asarray(labels[start : start + batch]),
            jnp.asarray(preds[start : start + batch]),
            num_classes,
            IGNORE,
        )
        conf += np.asarray(part, np.int64).sum(0)
    return conf


def scores(conf: np.ndarray) -> dict:
    """``{"miou", "iou": per class (None where absent), "pixel_accuracy"}``
    of a confusion matrix."""
    values, present = iou(jnp.asarray(conf, jnp.float32))
    total = conf.sum()
    return {
        "miou": float(mean_iou(jnp.asarray(conf, jnp.float32))),
        "iou": [
            float(v) if p else None
            for v, p in zip(np.asarray(values), np.asarray(present), strict=True)
        ],
        "pixel_accuracy": float(np.trace(conf) / total) if total else 0.0,
    }


# ------------------------------------------------------------------------------- persistence


def save(path, params, cfg: SegmenterConfig = DEFAULT) -> Path:
    """Write params and config as msgpack (``flax.serialization``), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "config": {
            "features": np.asarray(cfg.features, np.int64),
            "num_classes": cfg.num_classes,
            "groups": cfg.groups,
        },
        "params": jax.device_get(params),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(flax.serialization.msgpack_serialize(record))
    tmp.replace(path)
    return path


def load(path) -> tuple[Any, SegmenterConfig]:
    """``(params, cfg)`` written by ``save``."""
    record = flax.serialization.msgpack_restore(Path(path).read_bytes())
    c = record["config"]
    cfg = SegmenterConfig(
        features=tuple(int(f) for f in np.asarray(c["features"])),
        num_classes=int(c["num_classes"]),
        groups=int(c["groups"]),
    )
    return jax.tree_util.tree_map(jnp.asarray, record["params"]), cfg
