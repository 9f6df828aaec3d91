"""A dataset run: the plan's items, generated in fixed-size batches and written with the store.

Every item is a function of the run config and its global index: prompt and classes from the
plan, noise from ``fold_in(key(seed), global_index)``. So the same config gives the same items
whatever the batch size or the number of hosts, and a killed run resumes where it stopped
(``ports.store.open_dataset``). Each process generates its share (``global_indices``), writes its
own manifest; process 0 merges them after a barrier.
"""

import dataclasses
import hashlib
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxmask
from jaxmask.tokens import token_positions
from ports import api
from ports.errors import bad_arg, with_cli
from ports.plan import Plan
from ports.scale import hosts
from ports.sd.sample import check_guidance, check_steps
from ports.sd.schedulers import canonical_name
from ports.store import lock, mask_stats, open_dataset, software_versions
from ports.store.atomic import StoreError
from ports.store.dataset import read_run_config
from ports.store.formats import FORMATS

SOFT_MASK_SIDE = 64  # optional soft masks are stored at 64 x 64 (float16), not at image size


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that decides a dataset's content (and nothing that only spreads the work)."""

    plan: Plan
    model: str | None
    method: str = "seediff-code"
    method_params: tuple[tuple[str, object], ...] = ()
    steps: int = 50
    guidance: float = 7.5
    size: int | None = None
    scheduler: str = "ddim"
    negative_prompt: str = ""
    seed: int = 0
    dtype: str = "float32"
    format: str = "voc"
    pamr: bool = False
    soft_masks: bool = False
    val_fraction: float = 0.0
    min_area: float | None = None  # quality filters: each named class's share of the image
    max_area: float | None = None
    min_confidence: float | None = None  # mean soft score inside each named class's mask

    def method_config(self):
        return jaxmask.methods.get(self.method, **dict(self.method_params))

    def to_json(self, model_id: str, fingerprint: str, size: int) -> dict:
        return {
            "plan": self.plan.to_json(),
            "model": {"id": model_id, "fingerprint": fingerprint},
            "method": {"name": self.method, "params": dict(self.method_params)},
            "steps": self.steps,
            "guidance": self.guidance,
            "size": size,
            "scheduler": self.scheduler,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "dtype": self.dtype,
            "format": self.format,
            "pamr": self.pamr,
            "soft_masks": self.soft_masks,
            # only when asked for: datasets made before splits existed still resume
            **({"val_fraction": self.val_fraction} if self.val_fraction else {}),
            **({"filters": self.filters()} if self.filters() else {}),
        }

    def filters(self) -> dict:
        """The quality filters that are set, as the run config records them."""
        return {
            k: v
            for k, v in (
                ("min_area", self.min_area),
                ("max_area", self.max_area),
                ("min_confidence", self.min_confidence),
            )
            if v is not None
        }


@dataclasses.dataclass(frozen=True)
class RunResult:
    out: Path
    total: int
    written: int
    resumed: int
    seconds: float
    damaged: int = 0  # items whose files no longer matched the manifest: made again
    filtered: int | None = None  # items the quality filters dropped (process 0, after the merge)


def item_split(seed: int, global_index: int, val_fraction: float) -> str:
    """``"val"`` for about ``val_fraction`` of the items, else ``"train"``: a hash of the seed and
    the item's index, so a resume, a host count or a batch size never moves an item.

    >>> [item_split(0, i, 0.5) for i in range(6)].count("val") in range(1, 6)
    True
    """
    digest = hashlib.sha256(f"jaxmask-split:{seed}:{global_index}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


@dataclasses.dataclass(frozen=True)
class Filters:
    """Quality filters: which generated pairs to drop (``RunConfig``'s fields of the same names;
    ``jaxmask quality --min-area ...`` measures what they do to mask quality).

    Attributes:
      min_area, max_area: bounds on each named class's share of the image.
      min_confidence: lower bound on each named class's ``jaxmask.mask_confidence``.
    """

    min_area: float | None = None
    max_area: float | None = None
    min_confidence: float | None = None

    def __post_init__(self):
        check_filters(self)


def check_filters(filters) -> None:
    """Refuse filter bounds outside [0, 1], or ``min_area >= max_area`` (``filters``: a
    ``Filters`` or a ``RunConfig``)."""
    for name, what in (
        ("min_area", "a fraction of the image"),
        ("max_area", "a fraction of the image"),
        ("min_confidence", "a soft mask score"),
    ):
        value = getattr(filters, name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1
        ):
            raise bad_arg(name, f"{{}} must be {what} in [0, 1], got {value!r}")
    lo, hi = filters.min_area, filters.max_area
    if lo is not None and hi is not None and lo >= hi:
        raise with_cli(
            ValueError(f"min_area {lo} must be below max_area {hi}"),
            f"--min-area {lo} must be below --max-area {hi}",
        )


def filter_reason(stats: dict, names: dict[str, str], filters) -> str | None:
    """Why an item's mask fails the quality filters, or None when it passes.

    ``stats``: the record's ``mask_stats`` (each named class's ``fraction`` of the image by class
    id, and its ``confidence`` when ``min_confidence`` is set); ``names``: class id -> name;
    ``filters``: a ``Filters`` or a ``RunConfig`` (the same fields). DiffuMask and the users of
    these methods drop pairs whose mask is empty or covers (almost) the whole image
    (``min_area`` / ``max_area``) and noisy masks (``min_confidence``: the mean soft score
    inside the mask, ``jaxmask.mask_confidence``).
    """
    lo, hi, sure = filters.min_area, filters.max_area, filters.min_confidence
    for class_id, fraction in stats["fraction"].items():
        if class_id == "0":
            continue
        name = names[class_id]
        if lo is not None and fraction < lo:
            return f"{name} covers {fraction:.2%} of the image, under min_area {lo:.2%}"
        if hi is not None and fraction > hi:
            return f"{name} covers {fraction:.2%} of the image, over max_area {hi:.2%}"
        if sure is not None and stats["confidence"][class_id] < sure:
            return (
                f"{name}'s mask has confidence {stats['confidence'][class_id]:.3f}, under "
                f"min_confidence {sure}"
            )
    return None


def _label_lookup(plan: Plan, item_classes) -> np.ndarray:
    """Prompt-order labels 1..k -> dataset ids (position in the class list + 1); 255 kept."""
    lut = np.zeros(256, np.uint8)
    lut[255] = 255
    for j, name in enumerate(item_classes):
        lut[j + 1] = plan.classes.index(name) + 1
    return lut


#: A dataset's item count is bounded: item ids are 8 digits and the plan is held in memory.
MAX_ITEMS = 10_000_000


def check(cfg: RunConfig, batch_size: int = 4) -> None:
    """Everything about a run that can be checked without the model (no I/O, nothing created).

    Raises:
      ValueError, TypeError: the first bad argument, named in API terms (``errors.for_cli`` gives
        the CLI's wording).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise bad_arg("batch_size", f"{{}} must be an integer >= 1, got {batch_size!r}")
    if cfg.plan.total > MAX_ITEMS:
        raise bad_arg(
            "items_per_class",
            f"the plan has {cfg.plan.total:,} items; a dataset holds at most {MAX_ITEMS:,} "
            "(split it into several datasets), so lower {}",
            cli="--per-class",
        )
    if cfg.format not in FORMATS:
        raise bad_arg("format", f"{{}} must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    if not isinstance(cfg.negative_prompt, str):
        raise bad_arg("negative_prompt", f"{{}} must be a string, got {cfg.negative_prompt!r}")
    v = cfg.val_fraction
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
        raise bad_arg("val_fraction", f"{{}} must lie in [0, 1), got {v!r}")
    check_filters(cfg)
    if cfg.size is not None and (
        isinstance(cfg.size, bool) or not isinstance(cfg.size, int) or cfg.size < 1
    ):
        raise bad_arg("size", f"{{}} must be a positive number of pixels, got {cfg.size!r}")
    cfg.method_config()
    check_steps(cfg.steps)
    check_guidance(cfg.guidance)
    canonical_name(cfg.scheduler)
    api.check_dtype(cfg.dtype)
    api.check_seed(cfg.seed)


def check_prompts(plan: Plan, tokenizer) -> None:
    """Every distinct prompt of ``plan`` holds its class words as real tokens within the text
    encoder's window (checked once per distinct prompt, not per item).

    Raises:
      ValueError: naming the prompt and what the tokenizer made of the word.
    """
    from ports.sd.tokenizer import class_ids, tokenize

    distinct = {}
    for i in range(min(plan.total, len(plan.prompts) or len(plan.classes) * len(plan.templates))):
        item = plan.item(i)
        distinct.setdefault((item.prompt, item.words), None)
    for prompt, words in distinct:
        # a truncated prompt warns; it is refused below only if it loses a class word
        with warnings.catch_warnings(record=True) as truncated:
            warnings.simplefilter("always")
            ids = tokenize(tokenizer, [prompt])[0]
        try:
            jaxmask.class_token_weights(ids, [class_ids(tokenizer, w) for w in words], words)
        except ValueError as err:
            if truncated:
                raise ValueError(
                    f"{truncated[0].message}, and {err}: shorten the prompt so that its class "
                    "words come within the text encoder's window"
                ) from err
            raise ValueError(f"prompt {prompt!r}: {err}") from err


def run(
    cfg: RunConfig,
    out: Path,
    *,
    batch_size: int = 4,
    overwrite: bool = False,
    pipeline: api.Pipeline | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> RunResult:
    """Generate ``cfg.plan`` into ``out`` (VOC folder or WebDataset shards), resuming if it exists.

    Every argument is checked before the folder is touched (:func:`check` before the model is
    loaded, then the size, steps, class tokens and memory against it); a refused run leaves
    nothing on disk. One run writes a folder at a time (``ports.store.lock``).

    Args:
      cfg: the run config.
      out: the dataset folder.
      batch_size: images per sampler call (at most the items left; the last batch is padded,
        padding is not written).
      overwrite: replace a dataset made with another config.
      pipeline: an already loaded pipeline (default ``api.load(cfg.model, dtype=cfg.dtype)``).
      on_start: called with (items in the dataset, items already there) once the folder is open.
      on_batch: called with the number of items written after each batch (progress).
    """
    check(cfg, batch_size)
    lock.check(out)  # a busy folder is refused before the model is loaded
    method_cfg = cfg.method_config()
    pipeline = pipeline or api.load(cfg.model, dtype=cfg.dtype)
    size = pipeline.check_size(cfg.size, cfg.size)  # validates the size against the UNet
    spec = method_cfg.capture_spec(pipeline.layout(size))  # ...and the method against its sides
    plan = cfg.plan
    sd = pipeline.sd
    check_prompts(plan, sd.tokenizer)
    devices = jax.local_device_count()
    if batch_size % devices:
        raise bad_arg(
            "batch_size",
            f"{{}} {batch_size} is not a multiple of this host's {devices} devices; use a multiple",
        )
    share = len(hosts.global_indices(plan.total, jax.process_index(), jax.process_count()))
    batch_size = min(batch_size, -(-max(share, 1) // devices) * devices)  # no batch of padding
    pipeline.sampler.check(
        batch_size,
        steps=cfg.steps,
        guidance=cfg.guidance,
        scheduler=cfg.scheduler,
        size=size,
        spec=spec,
    )
    mesh = None
    if devices > 1:  # split every batch over this host's devices
        from ports.scale.mesh import data_mesh

        mesh = data_mesh()
    with lock.hold(out, jax.process_index(), hosts.agree):
        _refuse_dropping_items(out, cfg, sd, size, overwrite)
        dataset = open_dataset(
            out,
            cfg.to_json(sd.source, sd.fingerprint, size),
            overwrite,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            barrier=hosts.barrier,
            extends=extends,
        )
        todo = dataset.todo(plan.total)
        if on_start:
            on_start(plan.total, len(dataset.done))
        written, seconds = _write(
            cfg, plan, pipeline, dataset, todo, batch_size, size, method_cfg, on_batch, mesh
        )
        hosts.barrier("jaxmask-generate-done")
        filtered = None
        if jax.process_index() == 0:
            filtered = sum(bool(r.get("filtered")) for r in dataset.merge())
    return RunResult(
        Path(out), plan.total, written, len(dataset.done), seconds, len(dataset.damaged), filtered
    )


def _refuse_dropping_items(out: Path, cfg: RunConfig, sd, size: int, overwrite: bool) -> None:
    """A lower per-class count than the folder's would drop items it holds: say so in those
    terms (the store's refusal would only name ``plan.items_per_class``)."""
    stored = None if overwrite else read_run_config(out)
    if not stored or "plan" not in stored:
        return
    new = cfg.to_json(sd.source, sd.fingerprint, size)
    old_plan = stored["plan"]
    if (
        not extends({**new, "plan": old_plan}, stored)
        or cfg.plan.total >= Plan.from_json(old_plan).total
    ):
        return
    text = (
        f"{out} holds {old_plan['items_per_class']} items per class; {{}} "
        f"{cfg.plan.items_per_class} would drop items it holds. Keep it or raise it (the "
        "dataset is extended), or pass {} to start again."
    )
    raise with_cli(
        StoreError(None, text.format("items_per_class", "overwrite=True"), out),
        text.format("--per-class", "--overwrite"),
    )


def extends(stored: dict, config: dict) -> bool:
    """Whether the run config ``config`` only adds items to a dataset made with ``stored``:
    everything but the plan equal, and the plan keeping every earlier item (``Plan.extends``),
    e.g. a higher ``--per-class``."""

    def rest(c: dict) -> dict:  # all but the plan, and the model less its id as typed
        model = {k: v for k, v in (c.get("model") or {}).items() if k != "id"}
        return {k: v for k, v in c.items() if k != "plan"} | {"model": model}

    if rest(stored) != rest(config) or "plan" not in stored:
        return False
    try:
        old = Plan.from_json(stored["plan"])
    except (KeyError, TypeError, ValueError):
        return False
    return Plan.from_json(config["plan"]).extends(old)


def _write(cfg, plan, pipeline, dataset, todo, batch_size, size, method_cfg, on_batch, mesh):
    """Generate and write this process's ``todo``: (items written, seconds).

    Batch k's host work (records, encoding, hashing, writing: ``_HostWork``) runs on a worker
    thread while batch k+1 samples; XLA and the image encoders release the GIL. One batch is in
    flight at a time, so items reach the manifest in order (a resume sees the same prefix) and a
    failed write stops the run one batch later at most. Leaving early (an error, Ctrl-C) waits
    for the batch being written, so no item is cut off by the writer's close.
    """
    sd = pipeline.sd
    key = jax.random.key(cfg.seed)
    from ports.sd.tokenizer import tokenize

    start, written = time.perf_counter(), 0
    model = dataset.run_config["model"]  # as first typed: a resumed run's records match
    host = _HostWork(
        cfg, plan, sd.tokenizer, dataclasses.asdict(method_cfg), model, software_versions()
    )
    with (
        dataset.writer(plan.id2label()) as writer,
        ThreadPoolExecutor(1, thread_name_prefix="jaxmask-write") as pool,
    ):
        pending = None
        for batch in hosts.batches(todo, batch_size):
            items = [plan.item(int(i)) for i in batch.indices]
            prompts = [it.prompt for it in items]
            result = pipeline.generate(
                prompts,
                key,
                classes=[list(it.words) for it in items],
                method=method_cfg,
                steps=cfg.steps,
                guidance=cfg.guidance,
                negative_prompt=cfg.negative_prompt,
                height=size,
                width=size,
                scheduler=cfg.scheduler,
                pamr=cfg.pamr,
                item_ids=np.asarray(batch.indices),
                mesh=mesh,
            )
            ids = tokenize(sd.tokenizer, prompts)
            if pending is not None:
                written += _written(pending, on_batch)
            pending = pool.submit(host.write_batch, writer, batch, items, result, ids, size)
        if pending is not None:
            written += _written(pending, on_batch)
    return written, time.perf_counter() - start


def _written(future, on_batch) -> int:
    """Wait for a batch's host work (its error is raised here) and report it."""
    count = future.result()
    if on_batch:
        on_batch(count)
    return count


@dataclasses.dataclass(frozen=True)
class _HostWork:
    """A dataset run's per-item host work: the manifest record, the quality filters, the write."""

    cfg: RunConfig
    plan: Plan
    tokenizer: object
    method_params: dict  # the records' entries that every item shares
    model: dict
    versions: dict

    def write_batch(self, writer, batch, items, result, ids, size) -> int:
        """Write (or record as filtered) the batch's valid items: how many."""
        from ports.sd.tokenizer import class_ids

        cfg, plan, tokenizer = self.cfg, self.plan, self.tokenizer
        count = 0
        for j, (index, valid) in enumerate(zip(batch.indices, batch.valid, strict=True)):
            if not valid:
                continue
            item = items[j]
            lut = _label_lookup(plan, item.classes)
            label = lut[result.label_maps[j]]
            class_ids_ = [plan.classes.index(c) + 1 for c in item.classes]
            soft = None
            if cfg.soft_masks:
                soft = np.asarray(
                    jaxmask.resize(result.soft_masks[j], (SOFT_MASK_SIDE,) * 2, "bilinear")
                )
            record = {
                "prompt": item.prompt,
                "negative_prompt": cfg.negative_prompt,
                "classes": [
                    {
                        "id": cid,
                        "name": name,
                        "token_positions": token_positions(
                            ids[j].tolist(), class_ids(tokenizer, word)
                        ),
                    }
                    for cid, name, word in zip(class_ids_, item.classes, item.words, strict=True)
                ],
                "seed": {"rule": hosts.SEED_RULE, "value": cfg.seed},
                "method": {"name": cfg.method, "params": dict(self.method_params)},
                "model": {k: self.model[k] for k in ("id", "fingerprint")},
                "scheduler": cfg.scheduler,
                "steps": cfg.steps,
                "guidance": cfg.guidance,
                "size": [size, size],
                "dtype": cfg.dtype,
                "mask_stats": mask_stats(label, [0, *class_ids_]),
                "versions": self.versions,
            }
            if cfg.min_confidence is not None:
                confidence = jaxmask.mask_confidence(
                    jnp.asarray(result.soft_masks[j]), jnp.asarray(result.label_maps[j])
                )
                record["mask_stats"]["confidence"] = {
                    str(i): round(float(c), 6) for i, c in zip(class_ids_, confidence, strict=True)
                }
            if cfg.val_fraction:
                record["split"] = item_split(cfg.seed, int(index), cfg.val_fraction)
            names = {str(i): n for i, n in zip(class_ids_, item.classes, strict=True)}
            reason = filter_reason(record["mask_stats"], names, cfg)
            if reason is None:
                writer.write(int(index), result.images[j], label, record, soft_masks=soft)
            else:
                writer.skip(int(index), record, reason)
            count += 1
        return count
