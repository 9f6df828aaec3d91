"""How good are jaxmask's masks? One measurement on the toy world, against a supervised oracle.

The toy world has exact labels for real scenes but not for generated images, so quality is
measured the way the papers do it when no annotator is at hand, in three parts:

a. **The oracle.** A small supervised segmenter (``ports.toyworld.segmenter``) is trained on real
   world scenes with their exact labels; its mIoU on held-out real scenes says how far to trust it.
b. **Masks vs the oracle.** The text-to-image model draws ``per_class`` images of each of the 8
   classes from one-object prompts of the world's caption grammar ("a red star on a striped
   background"). Every method (with and without PAMR) labels each image from the model's
   attention; the oracle labels the same image; mIoU is computed over all images at once (one
   confusion matrix, background + 8 classes). The oracle's 9-class prediction is reduced to
   {background, the named class}: a pixel it gives to any other class counts as background, as
   jaxmask's map only knows the named class. jaxmask's ignore band (255) counts as background too
   (the share is reported). "Named object present" is the share of images where the oracle finds
   at least ``min_pixels`` pixels of the named class; mIoU is also reported on those images alone.
c. **Train on synthetic, test on real** (DiffuMask / Dataset Diffusion / SeeDiff protocol, in
   small): the same segmenter, same steps and batch, trained only on jaxmask's pairs (generated
   image + one method's label map, 255 kept as ignore), tested on the held-out real scenes beside
   the oracle (trained on real scenes).

Every random choice derives from ``seed``: real scene ``i`` of stream ``s`` is
``scenes.scene(SeedSequence((seed, s, i)))`` (stream 0 oracle training, 1 held-out evaluation,
2 prompts), generated item ``i`` uses ``fold_in(key(seed), i)``, segmenter training uses
``fold_in(key(seed), 1_000_000)``. The same seed gives the same numbers.

    jaxmask quality --per-class 8            # a few minutes on a laptop CPU
    result = quality.measure(model, per_class=200); print(quality.render_markdown(result))
"""

import dataclasses
import datetime
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxmask
from jaxmask.refine import PAMR_DEFAULT
from ports import toyworld
from ports.generate import Filters, filter_reason
from ports.progress import Bars, Clock
from ports.toyworld import scenes, segmenter

DEFAULT_MODEL = toyworld.MODEL
METHODS = ("ca", "ca_sa", "seediff-paper", "seediff-code")
NUM_CLASSES = len(scenes.CLASSES) + 1

_STREAM_ORACLE, _STREAM_EVAL, _STREAM_PROMPTS = 0, 1, 2
_SEGMENTER_KEY = 1_000_000  # fold_in index of the segmenters' key (item ids stay below it)


def auto_oracle_steps(per_class: int) -> int:
    """Segmenter steps when none are given: ``50 * per_class`` clipped to [400, 3000].

    A quick run (``per_class=8``) trains for 400 steps (a rough oracle, but minutes on a CPU);
    the full run (200 per class) for 3000.
    """
    return int(min(3000, max(400, 50 * per_class)))


def prompts(per_class: int, seed: int = 0) -> list[tuple[str, int]]:
    """``(prompt, class index)`` of every generated item: item ``i`` names class ``i % 8``.

    The colour and background are drawn from ``SeedSequence((seed, 2, i))``; the words are the
    world's caption grammar (``scenes.caption``). Every other round of 8 items leaves the colour
    word out (``has_colour``): "a star on a striped background" is also the default template of
    ``jaxmask generate``'s ``shapes`` classes, so both prompt styles are measured.
    """
    out = []
    for i in range(per_class * len(scenes.CLASSES)):
        rng = np.random.default_rng(np.random.SeedSequence((seed, _STREAM_PROMPTS, i)))
        cls = i % len(scenes.CLASSES)
        colour = str(rng.choice(list(scenes.COLOURS)))
        background = str(rng.choice(scenes.BACKGROUNDS))
        obj = scenes.Obj(cls, colour, 0.5, 0.5, 0.2, 0.0)
        out.append((scenes.caption((obj,), background, colours=has_colour(i)), cls))
    return out


def has_colour(item: int) -> bool:
    """Whether generated item ``item``'s prompt names the object's colour (rounds
    of 8 alternate)."""
    return (item // len(scenes.CLASSES)) % 2 == 0


def vae_fidelity(sd, images: np.ndarray, oracle_params, segmenter_cfg, ring: int = 4) -> dict:
    """How faithfully the model's VAE round-trips real scenes: ``decode(encode(x).mean)``.

    Returns the mean absolute error in grey levels (0-255, over pixels and channels), the same in
    the outer ``ring`` px and inside it (a decoder that never saw the image border draws a frame:
    the ring's error is then the larger), and the oracle's agreement with itself: mIoU of its
    labels on the reconstructions against its labels on the originals (the VAE loses what that
    does not keep).
    """
    from ports.toyworld.train import encode_dataset

    @jax.jit
    def decode(z):
        x = sd.vae.apply({"params": sd.vae_params}, z.astype(sd.dtype), method=sd.vae.decode)
        return jnp.round((jnp.clip(x.sample.astype(jnp.float32), -1, 1) + 1) * 127.5)

    recon = []
    for i in range(0, len(images), 100):
        z, _ = encode_dataset(sd.vae, sd.vae_params, jnp.asarray(images[i : i + 100]))
        recon.append(np.asarray(decode(z)).transpose(0, 2, 3, 1).astype(np.uint8))
    recon = np.concatenate(recon)
    error = np.abs(recon.astype(np.float32) - images.astype(np.float32)).mean(-1)
    outer = np.ones(images.shape[1:3], bool)
    outer[ring:-ring, ring:-ring] = False
    original = segmenter.predict(oracle_params, images, cfg=segmenter_cfg)
    after = segmenter.predict(oracle_params, recon, cfg=segmenter_cfg)
    return {
        "mae": float(error.mean()),
        "ring_mae": float(error[:, outer].mean()),
        "interior_mae": float(error[:, ~outer].mean()),
        "ring": ring,
        "oracle_agreement": segmenter.scores(segmenter.confusion(original, after))["miou"],
        "images": int(len(images)),
    }


def real_scenes(count: int, stream: int, seed: int = 0, size: int = 64):
    """``count`` real world scenes of one stream: images ``(n, h, w, 3)``, labels ``(n, h, w)``."""
    images = np.empty((count, size, size, 3), np.uint8)
    labels = np.empty((count, size, size), np.uint8)
    for i in range(count):
        s = scenes.scene(np.random.SeedSequence((seed, stream, i)), size)
        images[i], labels[i] = s.image, s.labels
    return images, labels


def train_oracle(
    *,
    seed: int,
    steps: int,
    batch: int,
    scenes_: int,
    size: int = 64,
    segmenter_cfg: segmenter.SegmenterConfig = segmenter.DEFAULT,
    cache: str | os.PathLike | None = None,
    key: jax.Array | None = None,
    progress=False,
    make_bar=None,
):
    """Stage (a): the oracle, a segmenter trained on ``scenes_`` real scenes (stream 0) with their
    exact labels. Returns ``(params, losses or None, cached)``.

    With ``cache`` a folder, an oracle trained with the same settings (and world version) is
    loaded from it, or the new one is saved into it; ``key`` defaults to the one ``measure``
    uses for ``seed``. ``progress`` goes to ``segmenter.train``; ``make_bar()``, if given, makes
    it only when training starts (no bar is drawn for a cached oracle).
    """
    if key is None:
        key = jax.random.fold_in(jax.random.key(seed), _SEGMENTER_KEY)
    meta = {
        "seed": seed, "steps": steps, "batch": batch, "scenes": scenes_, "size": size,
        "segmenter": dataclasses.asdict(segmenter_cfg), "world": scenes.VERSION,
    }  # fmt: skip
    cache_file = _cache_file(cache, meta)
    if cache_file is not None and cache_file.is_file():
        return segmenter.load(cache_file)[0], None, True
    images, labels = real_scenes(scenes_, _STREAM_ORACLE, seed, size)
    if make_bar is not None:
        progress = make_bar()
    params, losses = segmenter.train(
        (images, labels), steps, batch, key, cfg=segmenter_cfg, progress=progress
    )
    if cache_file is not None:
        segmenter.save(cache_file, params, segmenter_cfg)
    return params, losses, False


def to_world_labels(label_maps: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """jaxmask's one-class label maps (0, 1, 255) to world ids (0, ``class + 1``, 255)."""
    cls = (np.asarray(classes, np.uint8) + 1)[:, None, None]
    return np.where(label_maps == 1, cls, np.where(label_maps == 255, 255, 0)).astype(np.uint8)


def named_only(pred: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The oracle's 9-class prediction reduced to {0, the named class}: other classes become 0."""
    cls = (np.asarray(classes, np.uint8) + 1)[:, None, None]
    return np.where(pred == cls, cls, 0).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Oracle:
    """Stage (a)'s result: the oracle and the held-out real scenes it was scored on."""

    params: Any
    scores: dict  # segmenter.scores on the held-out scenes
    cached: bool  # loaded from the cache, not trained
    losses: np.ndarray | None  # training losses (None when cached)
    eval_images: np.ndarray  # (n, h, w, 3) uint8, stream 1
    eval_labels: np.ndarray  # (n, h, w) uint8


@dataclasses.dataclass(frozen=True)
class Generated:
    """Stage (b)'s images and every (method, PAMR) pair's label maps (prompt order, 0/1/255)."""

    images: np.ndarray  # (n, h, w, 3) uint8
    class_ids: np.ndarray  # (n,) world class of each image's prompt
    label_maps: dict  # (method, pamr) -> (n, h, w) uint8
    confidence: dict  # (method, pamr) -> (n,) jaxmask.mask_confidence of the named class
    groups: list  # method names per capture spec the sampler captured
    specs: tuple  # those capture specs
    batch: int
    batch_seconds: list


def oracle_stage(
    *,
    seed: int,
    steps: int,
    batch: int,
    oracle_scenes: int,
    eval_scenes: int,
    size: int,
    segmenter_cfg: segmenter.SegmenterConfig = segmenter.DEFAULT,
    cache: str | os.PathLike | None = None,
    bars: Bars | None = None,
    clock: Clock | None = None,
) -> Oracle:
    """Stage (a): train (or load) the oracle on real scenes, score it on held-out ones."""
    bars, clock = bars or Bars(False), clock or Clock()
    with clock("real scenes"):
        eval_images, eval_labels = real_scenes(eval_scenes, _STREAM_EVAL, seed, size)
    with clock("oracle train"):
        params, losses, cached = train_oracle(
            seed=seed, steps=steps, batch=batch, scenes_=oracle_scenes, size=size,
            segmenter_cfg=segmenter_cfg, cache=cache,
            make_bar=lambda: bars.callback("oracle: train on real scenes", steps),
        )  # fmt: skip
    with clock("evaluate"):
        pred = segmenter.predict(params, eval_images, cfg=segmenter_cfg)
        scores = segmenter.scores(segmenter.confusion(eval_labels, pred))
    return Oracle(params, scores, cached, losses, eval_images, eval_labels)


def generate_stage(
    pipe,
    items: Sequence[tuple[str, int]],
    configs: Mapping[str, Any],
    pamr: Sequence[bool],
    *,
    seed: int = 0,
    steps: int = 50,
    guidance: float = 7.5,
    scheduler: str = "ddim",
    gen_batch: int = 16,
    capture: Mapping[str, Any] | None = None,
    on_batch: Callable[[int, list], None] | None = None,
) -> Generated:
    """Stage (b): draw every prompt's image (item ``i`` from ``fold_in(key(seed), i)``) and label
    it with every method, with and without PAMR, in one ``Pipeline.batch`` per batch (the last
    one padded with further prompts). ``on_batch(done, batch_seconds)`` after each batch."""
    n = len(items)
    b = min(gen_batch, n)
    padded = -(-n // b) * b
    all_items = list(items) + prompts(padded // len(scenes.CLASSES) + 1, seed)[n:padded]
    size = pipe.native_size
    images = np.empty((padded, size, size, 3), np.uint8)
    names = list(configs)
    label_maps = {(m, p): np.empty((padded, size, size), np.uint8) for m in names for p in pamr}
    confidence = {(m, p): np.empty(padded, np.float32) for m in names for p in pamr}
    key = jax.random.key(seed)
    batch_seconds, specs, groups = [], (), []
    for start in range(0, padded, b):
        began = time.perf_counter()
        chunk = all_items[start : start + b]
        step = pipe.batch(
            [t for t, _ in chunk],
            key,
            classes=[[scenes.CLASSES[c]] for _, c in chunk],
            methods=[configs[m] for m in names],
            pamr=[PAMR_DEFAULT if p else None for p in pamr],
            steps=steps,
            guidance=guidance,
            size=size,
            scheduler=scheduler,
            item_ids=np.arange(start, start + b, dtype=np.int32),
            capture=capture,
        )
        images[start : start + b] = step.images
        for name, per_pamr in zip(names, step.masks, strict=True):
            for p, (soft, labels) in zip(pamr, per_pamr, strict=True):
                label_maps[(name, p)][start : start + b] = labels
                confidence[(name, p)][start : start + b] = np.asarray(
                    _batch_confidence(soft, labels)
                )[:, 0]
        specs = step.specs
        groups = [
            [m for m, g in zip(names, step.groups, strict=True) if g == i]
            for i in range(len(specs))
        ]
        batch_seconds.append(time.perf_counter() - began)
        if on_batch is not None:
            on_batch(start + b, batch_seconds)
    class_ids = np.array([c for _, c in all_items[:n]], np.int64)
    return Generated(
        images=images[:n],
        class_ids=class_ids,
        label_maps={k: v[:n] for k, v in label_maps.items()},
        confidence={k: v[:n] for k, v in confidence.items()},
        groups=groups,
        specs=specs,
        batch=b,
        batch_seconds=batch_seconds,
    )


#: ``jaxmask.mask_confidence`` over a batch: ``(b, k, h, w)`` soft masks, ``(b, h, w)`` labels.
_batch_confidence = jax.jit(jax.vmap(jaxmask.mask_confidence))


def kept(generated: Generated, key: tuple[str, bool], filters: Filters | None) -> np.ndarray:
    """Which images the quality filters of ``jaxmask generate`` (``ports.generate.Filters``)
    would keep for one (method, PAMR): the same rule on the same statistics."""
    maps = generated.label_maps[key]
    if filters is None:
        return np.ones(len(maps), bool)
    fraction = (maps == 1).reshape(len(maps), -1).mean(1)
    return np.array(
        [
            filter_reason({"fraction": {"1": f}, "confidence": {"1": c}}, {"1": "class"}, filters)
            is None
            for f, c in zip(fraction, generated.confidence[key], strict=True)
        ]
    )


def score_stage(
    oracle: Oracle,
    generated: Generated,
    segmenter_cfg: segmenter.SegmenterConfig = segmenter.DEFAULT,
    min_pixels: int = 32,
    filters: Filters | None = None,
) -> tuple[list[dict], np.ndarray]:
    """Stage (b), scored: each (method, PAMR)'s mIoU against the oracle's labels of the same
    images (all images, and those where the named object is present); returns ``(rows,
    present)``, ``present`` the images where the oracle finds ``min_pixels`` of the class.
    With ``filters``, each row also scores the images the filters keep (``kept``: their share)."""
    class_ids = generated.class_ids
    oracle_gen = segmenter.predict(oracle.params, generated.images, cfg=segmenter_cfg)
    reference = named_only(oracle_gen, class_ids)
    present = (reference > 0).reshape(len(class_ids), -1).sum(1) >= min_pixels
    rows = []
    for (name, p), maps in generated.label_maps.items():
        world = to_world_labels(maps, class_ids)
        scored = np.where(world == 255, 0, world).astype(np.uint8)
        all_scores = segmenter.scores(segmenter.confusion(reference, scored))
        present_scores = (
            segmenter.scores(segmenter.confusion(reference[present], scored[present]))
            if present.any()
            else None
        )
        row = {
            "method": name,
            "pamr": p,
            "miou": all_scores["miou"],
            "iou": all_scores["iou"],
            "miou_present": present_scores["miou"] if present_scores else None,
            "ignored": float(np.mean(world == 255)),
            "foreground": float(np.mean((world != 0) & (world != 255))),
        }
        if filters is not None:
            keep = kept(generated, (name, p), filters)
            row["kept"] = float(keep.mean())
            row["miou_kept"] = (
                segmenter.scores(segmenter.confusion(reference[keep], scored[keep]))["miou"]
                if keep.any()
                else None
            )
        rows.append(row)
    return rows, present


def synthetic_stage(
    oracle: Oracle,
    generated: Generated,
    synthetic: tuple[str, bool],
    *,
    steps: int,
    batch: int,
    seed: int = 0,
    segmenter_cfg: segmenter.SegmenterConfig = segmenter.DEFAULT,
    bars: Bars | None = None,
    clock: Clock | None = None,
    filters: Filters | None = None,
) -> dict:
    """Stage (c): the segmenter trained only on one method's pairs, scored on the real scenes the
    oracle was scored on. Returns its scores, pairs and final loss; with ``filters``, also
    ``"kept"``: the same for a segmenter trained only on the pairs the filters keep (the same
    network, steps and initialisation, so the two differ only in their data)."""
    bars, clock = bars or Bars(False), clock or Clock()
    key = (synthetic[0], bool(synthetic[1]))
    keep = kept(generated, key, filters)
    if not keep.any():
        raise ValueError(f"the quality filters keep none of {synthetic[0]}'s pairs: loosen them")
    labels = to_world_labels(generated.label_maps[key], generated.class_ids)

    def train_and_score(which: np.ndarray, what: str) -> dict:
        with clock("synthetic train"):
            params, losses = segmenter.train(
                (generated.images[which], labels[which]),
                steps,
                batch,
                jax.random.fold_in(jax.random.key(seed), _SEGMENTER_KEY),
                cfg=segmenter_cfg,
                progress=bars.callback(f"segmenter: train on {what}", steps),
            )
        with clock("evaluate"):
            pred = segmenter.predict(params, oracle.eval_images, cfg=segmenter_cfg)
            scores = segmenter.scores(segmenter.confusion(oracle.eval_labels, pred))
        return {**scores, "pairs": int(which.sum()), "final_loss": float(losses[-10:].mean())}

    everything = train_and_score(np.ones_like(keep), f"{synthetic[0]} pairs")
    if filters is None:
        return everything
    # every pair kept: the same data, so the same segmenter (no second training)
    kept_scores = everything if keep.all() else train_and_score(keep, "the kept pairs")
    return {**everything, "kept": kept_scores}


def measure(
    model: Any = DEFAULT_MODEL,
    *,
    per_class: int = 200,
    methods: Sequence[str] = METHODS,
    pamr: Sequence[bool] = (False, True),
    seed: int = 0,
    oracle_steps: int | None = None,
    batch: int = 32,
    progress: bool = True,
    method_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    steps: int = 50,
    guidance: float = 7.5,
    scheduler: str = "ddim",
    gen_batch: int = 16,
    oracle_scenes: int = 4000,
    eval_scenes: int = 500,
    min_pixels: int = 32,
    synthetic: tuple[str, bool] = ("seediff-code", False),
    oracle_cache: str | os.PathLike | None = None,
    segmenter_cfg: segmenter.SegmenterConfig = segmenter.DEFAULT,
    window: tuple[float, float] | None = None,
    every: int | None = None,
    filters: Filters | None = None,
) -> dict:
    """Measure the masks of ``model`` on the toy world (see the module docstring); a JSON-able dict.

    The stages ``oracle_stage``, ``generate_stage``, ``score_stage`` and ``synthetic_stage`` (each
    callable alone), then the presence summary.

    Args:
      model: a diffusers-format folder (default: the bundled toy model) or a loaded
        ``jaxmask.Pipeline``.
      per_class: generated images per class (8 classes).
      methods: method names (``jaxmask.methods.PRESETS``).
      pamr: which of without (False) / with (True) PAMR to score.
      seed: everything derives from it.
      oracle_steps: segmenter optimiser steps, for the oracle and the synthetic-data segmenter
        alike; None: ``auto_oracle_steps(per_class)``.
      batch: segmenter batch.
      progress: rich progress bars and a runtime estimate on the terminal.
      method_overrides: ``{method: {field: value}}`` (``jaxmask.methods.get(name, **fields)``),
        e.g. ``{"seediff-code": {"seed_resolution": 8}}`` for a UNet without attention at 1/4 of
        its finest side.
      steps, guidance, scheduler: the sampler's settings.
      gen_batch: images per sampling call (the last call is padded with extra items).
      oracle_scenes, eval_scenes: real scenes to train the oracle on and to test on.
      min_pixels: the oracle must find this many pixels of the named class for "present".
      synthetic: ``(method, pamr)`` whose label maps train the synthetic-data segmenter.
      oracle_cache: a folder: the oracle is loaded from it when one trained with the same settings
        is there, else trained and saved into it.
      window, every: replace every method's ``CaptureSpec.step_window`` (fractions of the steps)
        and ``every`` (keep every k-th step): what capturing fewer steps costs in mask quality.
      filters: ``jaxmask generate``'s quality filters (``ports.generate.Filters``): every row
        also scores the pairs they keep, and a second synthetic-data segmenter trains on those.

    Returns:
      A dict with ``config``, ``model``, ``device``, ``oracle``, ``rows`` (one per method x pamr),
      ``present``, ``synthetic``, ``timings``, ``date`` (see ``render_markdown``).

    Raises:
      ValueError: an unknown method or parameter, or a method the model's attention sides cannot
        serve (the message says which override to pass).
    """
    import ports.api

    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    if not methods or not pamr:
        raise ValueError("give at least one method and one pamr choice")
    methods, pamr = tuple(dict.fromkeys(methods)), tuple(dict.fromkeys(bool(p) for p in pamr))
    overrides = {k: dict(v) for k, v in (method_overrides or {}).items()}
    unknown = sorted(set(overrides) - set(jaxmask.methods.PRESETS))
    if unknown:
        raise ValueError(
            f"method_overrides names unknown method(s) {unknown}; "
            f"choose from {sorted(jaxmask.methods.PRESETS)}"
        )
    overrides = {k: v for k, v in overrides.items() if k in methods}  # others are not measured
    configs = {name: jaxmask.methods.get(name, **overrides.get(name, {})) for name in methods}
    if synthetic[0] not in methods or bool(synthetic[1]) not in pamr:
        raise ValueError(
            f"synthetic={synthetic!r} is not measured: pass one of the measured methods "
            f"{list(methods)} and pamr choices {list(pamr)}"
        )
    steps_seg = auto_oracle_steps(per_class) if oracle_steps is None else int(oracle_steps)
    capture = {"step_window": None if window is None else tuple(map(float, window))}
    capture["every"] = every
    capture = {k: v for k, v in capture.items() if v is not None}

    clock = Clock()
    bars = Bars(progress)
    with bars:
        with clock("load"):
            if isinstance(model, ports.api.Pipeline):
                pipe = model
            else:
                path = Path(model)
                if not path.exists() and path == DEFAULT_MODEL:
                    raise ValueError(
                        f"the bundled toy model is not at {DEFAULT_MODEL} yet: pass a model folder "
                        "(or train one: jaxmask train-toy --out ports/toyworld/model)"
                    )
                pipe = ports.api.load(model)
        size = pipe.native_size
        layout = pipe.layout(size)
        for cfg in configs.values():  # raises, before any work, for an unservable method
            cfg.capture_spec(layout)
        items = prompts(per_class, seed)

        oracle = oracle_stage(
            seed=seed, steps=steps_seg, batch=batch, oracle_scenes=oracle_scenes,
            eval_scenes=eval_scenes, size=size, segmenter_cfg=segmenter_cfg, cache=oracle_cache,
            bars=bars, clock=clock,
        )  # fmt: skip
        with clock("vae"):
            vae = vae_fidelity(pipe.sd, oracle.eval_images, oracle.params, segmenter_cfg)

        b = min(gen_batch, len(items))
        batches = -(-len(items) // b)
        gen_task = bars.callback("generate + masks", batches * b)

        def on_batch(done, batch_seconds):
            gen_task(done, None)
            if len(batch_seconds) == 2:  # two batches timed (the first one compiles)
                _print_estimate(bars, clock, batch_seconds, batches, steps_seg)

        with clock("generate + masks"):
            generated = generate_stage(
                pipe, items, configs, pamr, seed=seed, steps=steps, guidance=guidance,
                scheduler=scheduler, gen_batch=gen_batch, capture=capture, on_batch=on_batch,
            )  # fmt: skip
        with clock("evaluate"):
            rows, present = score_stage(oracle, generated, segmenter_cfg, min_pixels, filters)
        syn_scores = synthetic_stage(
            oracle, generated, synthetic, steps=steps_seg, batch=batch, seed=seed,
            segmenter_cfg=segmenter_cfg, bars=bars, clock=clock, filters=filters,
        )  # fmt: skip

    n, class_ids = len(items), generated.class_ids

    def by_class(mask):
        return [float(present[mask & (class_ids == c)].mean()) for c in range(len(scenes.CLASSES))]

    coloured = np.array([has_colour(i) for i in range(n)])
    everything = np.ones(n, bool)
    presence = {
        style: {"present": float(present[mask].mean()), "per_class": by_class(mask)}
        for style, mask in (("colour words", coloured), ("no colour words", ~coloured))
        if mask.any()
    }
    spec = generated.specs[0]
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device_description(),
        "model": {"source": str(pipe.sd.source), "fingerprint": pipe.sd.fingerprint},
        "config": {
            "per_class": per_class,
            "images": n,
            "methods": list(methods),
            "method_overrides": {k: dict(v) for k, v in overrides.items()},
            "pamr": list(pamr),
            "seed": seed,
            "size": size,
            "resolutions": list(layout.sides),
            "capture_specs": generated.groups,
            "step_window": list(spec.step_window),
            "every": spec.every,
            "steps": steps,
            "guidance": guidance,
            "scheduler": scheduler,
            "segmenter_steps": steps_seg,
            "segmenter_batch": batch,
            "segmenter": dataclasses.asdict(segmenter_cfg),
            "segmenter_params": int(sum(x.size for x in jax.tree_util.tree_leaves(oracle.params))),
            "oracle_scenes": oracle_scenes,
            "eval_scenes": eval_scenes,
            "min_pixels": min_pixels,
            "synthetic": [synthetic[0], bool(synthetic[1])],
            "filters": None if filters is None else dataclasses.asdict(filters),
        },
        "classes": ["background", *scenes.CLASSES],
        "oracle": {
            **oracle.scores,
            "cached": oracle.cached,
            "final_loss": None if oracle.cached else float(oracle.losses[-10:].mean()),
        },
        "present": float(present.mean()),
        "present_per_class": by_class(everything),
        "present_by_style": presence,
        "vae": vae,
        "rows": rows,
        "synthetic": {
            "method": synthetic[0],
            "pamr": bool(synthetic[1]),
            "pairs": syn_scores["pairs"],
            "real": {"pairs": oracle_scenes, **oracle.scores},
            "jaxmask": syn_scores,
        },
        "generation": {"batch": generated.batch, "batch_seconds": generated.batch_seconds},
        "timings": clock.totals(),
    }


def estimate_seconds(result: Mapping, per_class: int) -> float:
    """Runtime of a run with ``per_class`` images per class on the same device, from a finished
    run: its first sampling batch (compiles) plus its steady batch time per further batch, and its
    segmenter time per step times ``auto_oracle_steps(per_class)`` for the oracle and each
    synthetic-data segmenter."""
    c, t = result["config"], result["timings"]
    batches = result["generation"]["batch_seconds"]
    steady = float(np.median(batches[1:])) if len(batches) > 1 else batches[0]
    n_batches = -(-len(scenes.CLASSES) * per_class // result["generation"]["batch"])
    syn = result["synthetic"]["jaxmask"]
    trainings = 2 if syn.get("kept", syn)["pairs"] < syn["pairs"] else 1  # with filters: 2
    per_step = t.get("synthetic train", 0.0) / (trainings * c["segmenter_steps"])
    per_image_eval = t.get("evaluate", 0.0) / max(c["images"] + c["eval_scenes"], 1)
    return (
        t.get("load", 0.0)
        + t.get("real scenes", 0.0)
        + batches[0]
        + steady * (n_batches - 1)
        + per_image_eval * (len(scenes.CLASSES) * per_class + c["eval_scenes"])
        + (1 + trainings) * per_step * auto_oracle_steps(per_class)
    )


def device_description() -> str:
    """'cpu (2 cores)', 'gpu: NVIDIA H100 80GB HBM3', ..."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    return f"{device.platform}: {device.device_kind} x{jax.device_count()}"


def render_markdown(result: Mapping, command: str | None = None) -> str:
    """The result as the markdown page docs/quality.md (tables of mIoU, how, when, on what)."""
    c, o, s = result["config"], result["oracle"], result["synthetic"]
    classes = result["classes"]
    t = result["timings"]
    total = t.get("total", sum(t.values()))
    filtered = {k: v for k, v in (c.get("filters") or {}).items() if v is not None}

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}"

    lines = [
        "# Mask quality on the toy world",
        "",
        "How good are jaxmask's masks? The toy world has exact labels for real scenes but not for",
        "generated images, so a small supervised segmenter trained on real scenes (the *oracle*)",
        "labels the generated images, and every method's masks are scored against it. Then the",
        "papers' protocol in small: the same segmenter trained only on jaxmask's synthetic pairs,",
        "tested on real scenes. Numbers are mIoU in percent (one confusion matrix over all images,",
        "background + 8 classes). The method is in `ports/toyworld/quality.py`.",
        "",
        f"- command: `{command or 'ports.toyworld.quality.measure(...)'}`",
        f"- date: {result['date']}; device: {result['device']}",
        f"- model: `{result['model']['source']}` (fingerprint `{result['model']['fingerprint']}`)",
        (
            f"- {c['images']} generated images ({c['per_class']} per class, {c['size']} px, "
            f"{c['steps']} {c['scheduler']} steps, guidance {c['guidance']}), attention sides "
            f"{c['resolutions']}, seed {c['seed']}; maps summed over steps in "
            f"{tuple(c.get('step_window', (0.0, 1.0)))} of the run, every {c.get('every', 1)}"
        ),
        (
            f"- segmenter: conv UNet {tuple(c['segmenter']['features'])}, "
            f"{c['segmenter_params']:,} parameters, {c['segmenter_steps']} steps x batch "
            f"{c['segmenter_batch']} (adamw, flips and quarter turns)"
        ),
    ]
    if c["method_overrides"]:
        lines.append(f"- method overrides: `{json.dumps(c['method_overrides'])}`")
    estimate = (
        ""
        if c["per_class"] == 200
        else f"; 200 per class would take about {estimate_seconds(result, 200) / 60:.0f} min here"
    )
    lines += [
        f"- total time {total:.0f} s{estimate}",
        "",
        "## a. The oracle",
        "",
        "| trained on | pairs | mIoU on held-out real scenes | pixel accuracy |",
        "|---|---:|---:|---:|",
        (
            f"| real scenes (exact labels) | {c['oracle_scenes']} | {pct(o['miou'])} "
            f"| {pct(o['pixel_accuracy'])} |"
        ),
        "",
        f"Per class IoU on {c['eval_scenes']} held-out real scenes:",
        "",
        "| " + " | ".join(classes) + " |",
        "|" + "---:|" * len(classes),
        "| " + " | ".join(pct(v) for v in o["iou"]) + " |",
        "",
        *_vae_lines(result.get("vae"), c["eval_scenes"]),
        "## b. Masks vs the oracle on generated images",
        "",
        "| method | PAMR | mIoU | mIoU, object present | ignored px % | foreground px % |"
        + (" kept by the filters % | mIoU, kept |" if filtered else ""),
        "|---|---|---:|---:|---:|---:|" + ("---:|---:|" if filtered else ""),
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['method']} | {'yes' if row['pamr'] else 'no'} | {pct(row['miou'])} | "
            f"{pct(row['miou_present'])} | {pct(row['ignored'])} | {pct(row['foreground'])} |"
            + (f" {pct(row['kept'])} | {pct(row['miou_kept'])} |" if filtered else "")
        )
    if filtered:
        lines += ["", f"Quality filters (as `jaxmask generate`'s): `{json.dumps(filtered)}`."]
    lines += [
        "",
        (
            f"Named object present (the oracle finds at least {c['min_pixels']} pixels of the "
            f"class the prompt names): **{pct(result['present'])} %** of the images; per class:"
        ),
        "",
        "| " + " | ".join(classes[1:]) + " |",
        "|" + "---:|" * (len(classes) - 1),
        "| " + " | ".join(pct(v) for v in result["present_per_class"]) + " |",
        "",
        "By prompt style (half the prompts name the colour, half do not, as `jaxmask generate`'s",
        "default `shapes` templates):",
        "",
        "| prompts | present % | " + " | ".join(classes[1:]) + " |",
        "|---|---:|" + "---:|" * (len(classes) - 1),
        *(
            f"| {style} | {pct(v['present'])} | "
            + " | ".join(pct(x) for x in v["per_class"])
            + " |"
            for style, v in result.get("present_by_style", {}).items()
        ),
        "",
        "The oracle's prediction is reduced to {background, the named class}: pixels it gives to",
        "another class count as background, since a one-class prompt's mask only knows its class.",
        "jaxmask's ignore band (255) counts as background here (its share is in the table).",
        "*mIoU, object present* scores only the images where the named object was drawn.",
        "",
        "## c. Train on synthetic, test on real",
        "",
        "| segmenter trained on | pairs | mIoU on held-out real scenes | pixel accuracy |",
        "|---|---:|---:|---:|",
        (
            f"| real scenes (the oracle) | {s['real']['pairs']} | {pct(s['real']['miou'])} "
            f"| {pct(s['real']['pixel_accuracy'])} |"
        ),
        (
            f"| jaxmask {s['method']}{' + PAMR' if s['pamr'] else ''} pairs "
            f"| {s['jaxmask']['pairs']} | {pct(s['jaxmask']['miou'])} "
            f"| {pct(s['jaxmask']['pixel_accuracy'])} |"
        ),
        *(
            [
                f"| the same, only the pairs the quality filters keep | {k['pairs']} "
                f"| {pct(k['miou'])} | {pct(k['pixel_accuracy'])} |"
            ]
            if (k := s["jaxmask"].get("kept"))
            else []
        ),
        "",
        "Same network, steps, batch and initialisation; the synthetic pairs keep 255 as ignore.",
        "",
        "## Timings",
        "",
        "| phase | seconds |",
        "|---|---:|",
        *(f"| {k} | {v:.1f} |" for k, v in t.items()),
        "",
        "Regenerate: `jaxmask quality --per-class 200` (the numbers above come from the command",
        "line at the top; the same seed gives the same numbers on the same device).",
        "",
    ]
    return "\n".join(lines)


def _vae_lines(vae: Mapping | None, scenes_: int) -> list[str]:
    if vae is None:
        return []
    return [
        "### The model's VAE",
        "",
        f"The model's VAE on the same {scenes_} held-out real scenes, `decode(encode(x))`: mean",
        (
            f"absolute error **{vae['mae']:.1f}** grey levels (0-255); {vae['ring_mae']:.1f} in "
            "the outer"
        ),
        f"{vae['ring']} px ring against {vae['interior_mae']:.1f} inside (ratio "
        f"{vae['ring_mae'] / max(vae['interior_mae'], 1e-9):.2f}; a frame drawn by the decoder",
        "shows as a larger ring error). The oracle's labels on the reconstructions agree with its",
        f"labels on the originals at **{100 * vae['oracle_agreement']:.1f}** mIoU.",
        "",
    ]


# ------------------------------------------------------------------------------------ helpers


def _print_estimate(bars: Bars, clock: Clock, batch_seconds, batches: int, train_steps) -> None:
    """After two timed generation batches (the first one compiles): the rest of the run."""
    rest_gen = batch_seconds[-1] * (batches - len(batch_seconds))
    train = clock.seconds.get("oracle train", 0.0)
    trained = train > 5.0  # else loaded from the cache: its time says nothing
    elapsed = time.perf_counter() - clock.start
    bars.print(
        f"estimate: generation + masks {sum(batch_seconds) + rest_gen:.0f} s for {batches} "
        f"batches, then the synthetic segmenter ({train_steps} steps"
        + (f", ~{train:.0f} s like the oracle)" if trained else ")")
        + (f"; total ~{elapsed + rest_gen + train:.0f} s" if trained else "")
    )


def _cache_file(folder, meta: Mapping) -> Path | None:
    if folder is None:
        return None
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    return Path(folder) / f"oracle-{digest}.msgpack"
