"""``jaxmask.load`` and ``jaxmask.generate``: prompts in, images and segmentation masks out.

Composes the shell and the core: tokenize (``ports.sd.tokenizer``) -> the jitted sampler with
attention capture (``ports.sd.sample``; what it captures is the method's ``capture_spec``) ->
class-token weights (``jaxmask.class_token_weights``) -> ``jax.vmap(jaxmask.extract_masks)`` over
the batch, jitted -> numpy on the host, once per batch.

Example::

    pipe = jaxmask.load("stabilityai/stable-diffusion-2-base")
    result = pipe.generate(["a photo of a cat", "a photo of a dog"], jax.random.key(0),
                           classes=[["cat"], ["dog"]], method="seediff-code")
    result.images       # (2, 512, 512, 3) uint8
    result.label_maps   # (2, 512, 512) uint8: 0 background, 1 the prompt's class, 255 ignore

    jaxmask.generate("a photo of a cat", 0, model="path/to/folder", classes=["cat"])
"""

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxmask
from jaxmask.maps import AttentionMaps, CaptureSpec, merge_specs
from jaxmask.masks import check_maps, extract_masks
from jaxmask.refine import PAMR_DEFAULT, PAMRConfig
from ports import executables
from ports.errors import bad_arg
from ports.sd.capture import NOTHING
from ports.sd.sample import Sampler, to_uint8
from ports.toyworld import MODEL as DEFAULT_MODEL  # what ``load()`` gives without a model

#: ``jaxmask.extract_masks`` over a batch: ``(maps, token_weights, images, method, pamr)`` with a
#: leading batch axis on the first three, jitted with the method and PAMR configs static.
extract_batch = executables.Jit(
    jax.vmap(extract_masks, in_axes=(0, 0, 0, None, None)),
    static_argnums=(3, 4),
    name="ports.api.extract_batch",
)


@dataclasses.dataclass(frozen=True, repr=False)
class GenerateResult:
    """What ``generate`` returns (numpy arrays on the host).

    Attributes:
      images: ``(b, h, w, 3)`` uint8.
      label_maps: ``(b, h, w)`` uint8: 0 background, ``c + 1`` for ``classes[i][c]``, 255 ignore;
        None when no classes were asked for.
      soft_masks: ``(b, k, h, w)`` float32 in [0, 1], one per class; None without classes.
      classes: per prompt, the class names its label values ``1..k`` stand for.
      prompts: the prompts, in batch order.
      maps: the captured ``AttentionMaps`` (numpy, leading ``b``) when ``return_maps=True``, else
        None.
    """

    images: np.ndarray
    label_maps: np.ndarray | None
    soft_masks: np.ndarray | None
    classes: tuple[tuple[str, ...], ...]
    prompts: tuple[str, ...]
    maps: AttentionMaps | None = None

    def __repr__(self):
        b, h, w, _ = self.images.shape
        return (
            f"GenerateResult(images {b}x{h}x{w}, classes={self.classes!r}, "
            f"masks={'yes' if self.label_maps is not None else 'no'}, "
            f"maps={'yes' if self.maps is not None else 'no'})"
        )


@dataclasses.dataclass(frozen=True, repr=False)
class BatchResult:
    """What ``Pipeline.batch`` returns (numpy arrays on the host).

    Attributes:
      images: ``(b, h, w, 3)`` uint8.
      masks: per method, per PAMR choice, ``(soft_masks (b, k, h, w) float32, label_maps
        (b, h, w) uint8)``; empty without classes.
      maps: the captured ``AttentionMaps``, one per distinct spec, when ``return_maps``.
      specs: the capture specs the run captured (``jaxmask.maps.merge_specs`` of the methods').
      groups: per method, the index of its spec (and maps) in ``specs``.
    """

    images: np.ndarray
    masks: tuple[tuple[tuple[np.ndarray, np.ndarray], ...], ...]
    maps: tuple[AttentionMaps, ...] | None
    specs: tuple[CaptureSpec, ...]
    groups: tuple[int, ...]


class Pipeline:
    """A loaded Stable Diffusion and its compiled sampler; ``generate`` makes images and masks.

    Build with ``jaxmask.load``. Compiled programs are cached per (batch size, image size, steps,
    scheduler, capture spec): a new key, prompt, guidance or negative prompt reuses them.
    """

    def __init__(self, sd):
        self.sd = sd
        self.sampler = Sampler(sd)

    def __repr__(self):
        return f"Pipeline({self.sd.source!r}, dtype={jnp.dtype(self.sd.dtype).name})"

    @property
    def native_size(self) -> int:
        """The image side the model was trained at (512 for SD 1.x / 2-base)."""
        return self.sampler.native_size()

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: ``vae_scale_factor * 2 ** (down blocks - 1)``."""
        return self.sd.vae_scale_factor * 2 ** (len(self.sd.unet.block_out_channels) - 1)

    def resolutions(self, size: int | None = None) -> tuple[int, ...]:
        """The UNet's attention sides ``r`` at ``size`` px (default: native), e.g. (8, 16, 32)."""
        return self.layout(size).sides

    def layout(self, size: int | None = None) -> jaxmask.Layout:
        """Where the UNet attends at ``size`` px (default: native): sides, the sides with a first
        up-block layer, heads per side. What a method's ``capture_spec`` places its sides by."""
        size = self.native_size if size is None else size
        return self.sd.attention_layout(size, size)

    def generate(
        self,
        prompts: str | Sequence[str],
        key: Any,
        *,
        classes: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
        method: Any = "seediff-code",
        steps: int = 50,
        guidance: float = 7.5,
        negative_prompt: str | Sequence[str] = "",
        height: int | None = None,
        width: int | None = None,
        scheduler: str = "ddim",
        return_maps: bool = False,
        pamr: PAMRConfig | bool | None = None,
        item_ids: Sequence[int] | None = None,
        mesh=None,
    ) -> GenerateResult:
        """Generate one image per prompt, and masks of the named classes from the model's attention.

        Args:
          prompts: a prompt or a list of ``b`` prompts (one batch: one compiled program per ``b``).
          key: a PRNG key (``jax.random.key(seed)``) or an int seed. Item ``i``'s noise is
            ``fold_in(key, i)``: the same prompt at the same index gives the same image whatever the
            batch size.
          classes: None (images only); a class name or a list of names shared by every prompt; or
            one list per prompt, all of the same length ``k``. Each name must occur in its prompt's
            tokens (e.g. ``"a photo of a cat"`` for ``"cat"``); multi-word names such as
            ``"potted plant"`` are matched as token sequences.
          method: ``"seediff-code"``, ``"seediff-paper"``, ``"ca"``, ``"ca_sa"``, or a config from
            ``jaxmask.methods.get(name, **overrides)``; it decides what is captured.
          steps: denoising steps.
          guidance: classifier-free guidance scale.
          negative_prompt: one negative prompt for all, or one per prompt.
          height, width: the image size in pixels; square (attention maps are ``r x r``) and a
            multiple of ``size_multiple``. Default: the model's native size; one given sets the
            other.
          scheduler: ``"ddim"``, ``"pndm"`` or ``"dpm++"`` (see ``ports.sd.schedulers``).
          return_maps: also return the captured ``AttentionMaps`` (self maps at 64x64 are 64 MiB per
            image).
          pamr: refine the soft masks with PAMR: a ``jaxmask.PAMRConfig``, True for the reference
            defaults, None/False for none.
          item_ids: the items' global indices (default ``0..b-1``); item ``i``'s noise is
            ``fold_in(key, item_ids[i])`` (dataset runs pass their global indices).
          mesh: split the batch over a device mesh's "data" axis
            (``ports.scale.mesh.data_mesh()``; ``b`` a multiple of its size); default: one device.

        Returns:
          ``GenerateResult``.

        Raises:
          ValueError: a class that does not occur in its prompt (the message names both), an image
            size the UNet cannot take (the message names valid sizes), an unknown method or
            scheduler, a method whose sides this UNet lacks (before sampling; the message names
            the parameter to set), or attention maps that came out non-finite.
        """
        prompts = _prompts(prompts)
        b = len(prompts)
        negatives = _negatives(negative_prompt, b)
        classes = _classes(classes, b)
        size = self.check_size(height, width)
        key = as_key(key)
        method = _method(method)
        pamr_cfg = _pamr(pamr)

        wants_maps = classes is not None or return_maps
        step = self.batch(
            prompts,
            key,
            classes=classes,
            methods=(method,) if wants_maps else (),
            pamr=(pamr_cfg,),
            negative_prompts=negatives,
            steps=steps,
            guidance=guidance,
            size=size,
            scheduler=scheduler,
            item_ids=item_ids,
            return_maps=return_maps,
            mesh=mesh,
        )
        soft_masks, label_maps = step.masks[0][0] if classes is not None else (None, None)
        return GenerateResult(
            images=step.images,
            label_maps=label_maps,
            soft_masks=soft_masks,
            classes=classes if classes is not None else tuple(() for _ in prompts),
            prompts=tuple(prompts),
            maps=step.maps[0] if return_maps else None,
        )

    def batch(
        self,
        prompts: Sequence[str],
        key: jax.Array,
        *,
        classes: Sequence[Sequence[str]] | None,
        methods: Sequence[jaxmask.methods.MethodConfig],
        pamr: Sequence[PAMRConfig | None] = (None,),
        negative_prompts: Sequence[str] | None = None,
        steps: int = 50,
        guidance: float = 7.5,
        size: int | None = None,
        scheduler: str = "ddim",
        item_ids: Sequence[int] | None = None,
        capture: Mapping[str, Any] | None = None,
        return_maps: bool = False,
        mesh=None,
    ) -> BatchResult:
        """One batch step, the one ``generate``, dataset runs and ``jaxmask quality`` share:
        tokenize -> class-token weights -> one sampling run that captures for every method ->
        each (method, PAMR) pair's masks, on the host.

        Takes checked arguments (``generate`` checks a user's): ``prompts`` and, per prompt, the
        ``classes`` (one count for all; None: images, and maps if ``return_maps``), method configs
        and PAMR configs (None: no refinement), ``size`` a valid side. Methods whose capture specs
        merge share one capture (``jaxmask.maps.merge_specs``). ``capture`` replaces fields of
        every spec (``step_window``, ``every``: what capturing fewer steps costs); ``mesh`` goes
        to the sampler. Returns a ``BatchResult``.
        """
        from ports.sd.tokenizer import class_ids, tokenize

        tokenizer = self.sd.tokenizer
        ids = tokenize(tokenizer, prompts)
        negatives = [""] * len(prompts) if negative_prompts is None else negative_prompts
        layout = self.layout(size)
        specs = [m.capture_spec(layout) for m in methods]
        if capture:
            specs = [dataclasses.replace(spec, **capture) for spec in specs]
        merged, where = merge_specs(specs)
        # Before sampling: a class the prompt does not name is refused without a batch's work.
        weights = None
        if classes is not None:
            weights = jnp.asarray(
                np.stack(
                    [
                        _token_weights(tokenizer, class_ids, ids[i], prompts[i], tuple(names))
                        for i, names in enumerate(classes)
                    ]
                )
            )
        samples = self.sampler(
            ids,
            tokenize(tokenizer, negatives),
            key,
            item_ids=item_ids,
            steps=steps,
            guidance=guidance,
            scheduler=scheduler,
            size=size,
            # one spec stays a spec: the programs (and bytes) of single-method runs are unchanged
            spec=merged[0] if len(merged) == 1 else merged or NOTHING,
            mesh=mesh,
        )
        maps = (samples.maps,) if len(merged) == 1 else tuple(samples.maps) if merged else ()
        masks = ()
        if classes is not None:
            for m in maps:
                check_maps(m)
            masks = tuple(
                tuple(
                    _host_masks(extract_batch(maps[g], weights, samples.images, method, p))
                    for p in pamr
                )
                for method, g in zip(methods, where, strict=True)
            )
        return BatchResult(
            images=to_uint8(samples.images),
            masks=masks,
            maps=tuple(jax.device_get(m) for m in maps) if return_maps else None,
            specs=merged,
            groups=where,
        )

    def check_size(self, height: int | None = None, width: int | None = None) -> int:
        """The square image side ``generate`` uses for ``height``/``width`` (None: the native
        size; one given sets the other).

        Raises:
          TypeError, ValueError: not ints, not square, or not a positive multiple of
            ``size_multiple`` (the message names valid sizes).
        """
        native, multiple = self.native_size, self.size_multiple
        height = width if height is None else height
        width = height if width is None else width
        if height is None:
            return native
        valid = sorted(
            {
                s
                for s in (native // 2, native - multiple, native, native + multiple, 2 * native)
                if s > 0 and s % multiple == 0
            }
        )
        hint = (
            f"this model takes square images whose side is a multiple of {multiple}, "
            f"e.g. {', '.join(map(str, valid))} (native {native})"
        )
        if not all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in (height, width)
        ):
            raise TypeError(f"height and width must be ints, got {height!r} and {width!r}")
        if height != width:
            raise ValueError(
                f"height {height} != width {width}: jaxmask's attention maps are square; {hint}"
            )
        if height <= 0 or height % multiple:
            raise ValueError(f"image size {height}x{width} is not valid: {hint}")
        return int(height)


#: Seeds JAX's default PRNG takes whole: ``jax.random.key`` keeps only 32 bits of a larger one.
SEED_LIMIT = 2**32


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` as an int in ``[0, SEED_LIMIT)``; larger ones would alias smaller ones."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise bad_arg(
            name, f"{{}} must be an int in [0, {SEED_LIMIT - 1}], got {seed!r}", kind=TypeError
        )
    if not 0 <= seed < SEED_LIMIT:
        raise bad_arg(
            name,
            f"{{}} must lie in [0, {SEED_LIMIT - 1}] (a JAX key holds 32 bits of it, so larger "
            f"seeds repeat smaller ones), got {seed}",
        )
    return int(seed)


def as_key(key) -> jax.Array:
    """A PRNG key from an int seed (``check_seed``) or a key (``jax.random.key(seed)``)."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return jax.random.key(check_seed(key, "key"))
    if isinstance(key, jax.Array) and (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        or (key.dtype == jnp.uint32 and key.shape == (2,))
    ):
        return key
    raise TypeError(f"key must be an int seed or jax.random.key(seed), got {key!r}")


def _method(method):
    if isinstance(method, str):
        return jaxmask.methods.get(method)
    if isinstance(method, jaxmask.methods.MethodConfig):
        return method
    raise TypeError(
        f"method must be one of {sorted(jaxmask.methods.PRESETS)} or a config from "
        f"jaxmask.methods.get(name, ...), got {method!r}"
    )


def _pamr(pamr) -> PAMRConfig | None:
    if pamr is None or pamr is False:
        return None
    if pamr is True:
        return PAMR_DEFAULT
    if isinstance(pamr, PAMRConfig):
        return pamr
    raise TypeError(f"pamr must be True, False, None or a jaxmask.PAMRConfig, got {pamr!r}")


def _prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings, got {bad[0]!r}")
    return prompts


def _negatives(negative_prompt, b: int) -> list[str]:
    if isinstance(negative_prompt, str):
        return [negative_prompt] * b
    negatives = list(negative_prompt)
    if len(negatives) != b:
        raise ValueError(
            f"negative_prompt has {len(negatives)} entries for {b} prompts: give one or {b}"
        )
    return negatives


def _classes(classes, b: int) -> tuple[tuple[str, ...], ...] | None:
    """None, or per prompt a tuple of names (all of the same length)."""
    if classes is None:
        return None
    if isinstance(classes, str):
        classes = [classes]
    classes = list(classes)
    if all(isinstance(c, str) for c in classes):
        per_prompt = [tuple(classes)] * b
    elif all(not isinstance(c, str) and isinstance(c, Sequence) for c in classes):
        per_prompt = [tuple(c) for c in classes]
        if len(per_prompt) != b:
            raise ValueError(
                f"classes has {len(per_prompt)} lists for {b} prompts: give one list per prompt"
            )
        if len({len(c) for c in per_prompt}) > 1:
            raise ValueError(
                "every prompt must name the same number of classes (one batch has one mask count); "
                f"got {[len(c) for c in per_prompt]}"
            )
    else:
        raise TypeError("classes must be a name, a list of names, or one list of names per prompt")
    if not per_prompt[0]:
        raise ValueError(
            "classes is empty: name at least one class, or pass classes=None for images only"
        )
    return tuple(per_prompt)


def _host_masks(masks) -> tuple[np.ndarray, np.ndarray]:
    soft, labels = masks
    return np.asarray(soft, np.float32), np.asarray(labels, np.uint8)


def _token_weights(
    tokenizer, class_ids, prompt_ids, prompt: str, names: tuple[str, ...]
) -> np.ndarray:
    try:
        return jaxmask.class_token_weights(
            prompt_ids, [class_ids(tokenizer, name) for name in names], names
        )
    except ValueError as error:
        raise ValueError(f"prompt {prompt!r}: {error}") from error


def load(model: str | os.PathLike | None = None, *, dtype: Any = "float32") -> Pipeline:
    """Load a Stable Diffusion 1.x / 2.x checkpoint as a ``Pipeline``.

    Args:
      model: a diffusers-format folder or a Hugging Face Hub id (``ports.sd.load``); None loads
        the bundled toy model (``DEFAULT_MODEL``: 64 px shapes world, see docs/toymodel.md).
      dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (a jnp dtype works too): the params' and
        the computation's dtype; scheduler state and attention maps stay float32.

    Raises:
      ValueError: a bad dtype; ``ports.sd.load``'s errors for a bad folder or hub id.
    """
    if model is None:
        model = DEFAULT_MODEL
    from ports.sd.load import load as load_sd

    return Pipeline(load_sd(model, dtype=check_dtype(dtype)))


#: The dtypes a model can compute in.
DTYPES = ("float32", "bfloat16", "float16")


def check_dtype(dtype) -> np.dtype:
    """``dtype`` as a jnp dtype, one of :data:`DTYPES`."""
    try:
        value = jnp.dtype(dtype)
    except TypeError:
        value = None
    if value is None or value.name not in DTYPES:
        raise bad_arg("dtype", f"{{}} must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return value


@functools.lru_cache(maxsize=1)
def _cached_pipeline(model: str, dtype: str) -> Pipeline:
    return load(model, dtype=dtype)


def generate(
    prompt_or_prompts, key, *, model=None, dtype: Any = "float32", **kwargs
) -> GenerateResult:
    """``load(model, dtype=dtype).generate(prompt_or_prompts, key, **kwargs)`` in one call.

    The last loaded model is kept (with its compiled sampler), so repeated calls with the same
    ``model`` do not reload or recompile; use ``jaxmask.load`` to hold several models.
    """
    if model is None:
        model = DEFAULT_MODEL
    pipeline = _cached_pipeline(os.fspath(model), check_dtype(dtype).name)
    return pipeline.generate(prompt_or_prompts, key, **kwargs)
