"""DiffuMask's augmentations over a whole dataset: read a jaxmask VOC-layout dataset, write a new
one of spliced and augmented items (``jaxmask augment``).

Output item ``i`` is made from its own key ``k = fold_in(key, i)`` (``ports.scale.hosts.item_key``)
alone: ``jaxmask.augment.split_item_key(k)`` gives the streams that choose its mosaic grid
(``cfg.grids``, weighted), its ``rows * cols`` source items (uniform, with replacement, among the
source's finished items in ``global_index`` order) and its per-pair augmentations (perspective,
occlusion, noise). So the same source, key and config give the same dataset, byte for byte,
whatever the host count, and an interrupted run resumes where it stopped (``ports.store``: atomic
files, per-host manifests, merge).

Each manifest record carries the usual keys (prompt, classes, model... taken from the first
source item; the prompt joins the distinct sources' prompts with ``" | "``), plus::

    "augment": {"sources": ["00000003", ...],      # source ids, one per tile, row-major
                "grid": [rows, cols],
                "steps": ["perspective", "noise"],  # the per-pair steps applied, in order
                "params": {"perspective_strength": 0.1, "noise_sigma": 0.03}}

.. note::
   Images go through JPEG twice (the source's and ours); labels are PNG and exact.
"""

import dataclasses
import errno
import functools
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxmask.augment import (
    DIFFUMASK,
    OCCLUDER_LABEL,
    AugmentConfig,
    augment,
    choose_augmentations,
    choose_grid,
    choose_sources,
    splice,
    split_item_key,
)
from ports.scale.hosts import SEED_RULE, item_key
from ports.store import StoreError, mask_stats, open_dataset, read_manifest, software_versions, voc
from ports.store.dataset import require_run_config
from ports.store.records import is_filtered, manifest_files

STEPS = (  # (name in records, probability field, parameter field), in augment's order
    ("perspective", "perspective_prob", "perspective_strength"),
    ("occlusion", "occlusion_prob", "occlusion_max_fraction"),
    ("noise", "noise_prob", "noise_sigma"),
)

_splice = jax.jit(splice, static_argnames=("rows", "cols", "size"))
_augment = jax.jit(augment, static_argnames="cfg")
_choose_grid = jax.jit(choose_grid, static_argnames="cfg")
_choose_sources = jax.jit(choose_sources, static_argnames=("m", "count"))
_choose_augmentations = jax.jit(choose_augmentations, static_argnames="cfg")


@dataclasses.dataclass(frozen=True)
class AugmentResult:
    """What :func:`augment_dataset` did.

    Attributes:
      out: the new dataset's folder.
      total: how many items it has (``count``).
      written: items this process made in this call.
      resumed: items already finished in ``out`` before this call (any process's).
      records: the merged manifest, in order (process 0; empty on the others).
    """

    out: Path
    total: int
    written: int
    resumed: int
    records: list[dict]


@dataclasses.dataclass(frozen=True)
class Source:
    """A finished jaxmask VOC dataset opened for reading.

    Attributes:
      path: its folder.
      run_config: its ``jaxmask_run.json``.
      id2label: its classes.
      records: its finished items' manifest records, in ``global_index`` order.
    """

    path: Path
    run_config: dict
    id2label: dict[int, str]
    records: list[dict]

    def digest(self) -> str:
        """sha256 over the items' ids and file hashes: changes when any source item does."""
        items = [
            [r["id"], sorted((role, e["sha256"]) for role, e in r["files"].items())]
            for r in self.records
        ]
        return hashlib.sha256(json.dumps(items).encode()).hexdigest()

    def read(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """Item ``position`` (in ``records`` order): float32 (h, w, 3) in [0, 1], uint8 (h, w)."""
        record = self.records[position]
        paths = {role: self.path / record["files"][role]["path"] for role in ("image", "label")}
        try:
            with Image.open(paths["image"]) as picture:
                image = np.asarray(picture.convert("RGB"), np.float32) / 255.0
            with Image.open(paths["label"]) as picture:
                if picture.mode not in ("P", "L"):
                    raise StoreError(
                        None,
                        f"{paths['label']} is a {picture.mode} PNG, not a label map (mode P or L "
                        "holding class ids); it was changed outside jaxmask.",
                        paths["label"],
                    )
                label = np.asarray(picture, np.uint8)
        except OSError as exc:
            if isinstance(exc, StoreError):
                raise
            raise StoreError(
                exc.errno, f"cannot read source item {record['id']}: {exc}", paths["image"]
            ) from exc
        if image.shape[:2] != label.shape:
            raise StoreError(
                None,
                f"source item {record['id']}: image {image.shape[:2]} and label {label.shape} "
                "differ in size",
                paths["label"],
            )
        return image, label


def open_source(src: str | Path) -> Source:
    """Open a finished (or partly finished) jaxmask VOC dataset for reading.

    Reads every manifest in ``src`` (the merged one and any per-host ones), keeps one record per
    global index (the last) whose files are complete, and the classes from ``id2label.json``.

    Raises:
      StoreError: ``src`` is missing, not a jaxmask dataset, not VOC layout, or has no finished
        items.
    """
    src = Path(src)
    if not src.is_dir():
        raise StoreError(
            errno.ENOENT, f"source dataset {src} does not exist (or is not a folder)", src
        )
    run_config = require_run_config(src, voc_for="augment")
    latest: dict[int, dict] = {}
    for path, _ in manifest_files(src):
        for record in read_manifest(path)[0]:
            latest[record["global_index"]] = record
    records = [latest[i] for i in sorted(latest) if not is_filtered(latest[i])]
    damaged = [(r["id"], p) for r, p in zip(records, voc.problems(src, records), strict=True) if p]
    if damaged:
        names = ", ".join(f"{name} ({problem})" for name, problem in damaged[:3])
        more = f" and {len(damaged) - 3} more" if len(damaged) > 3 else ""
        raise StoreError(
            None,
            f"source dataset {src} has {len(damaged)} damaged item(s): {names}{more}. Run the "
            "jaxmask generate command that made it again (it remakes them), then augment.",
            src,
        )
    if not records:
        raise StoreError(
            None,
            f"source dataset {src} has no finished items (no manifest line with complete files); "
            "generate some first.",
            src,
        )
    try:
        table = json.loads((src / voc.ID2LABEL).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StoreError(
            getattr(exc, "errno", None), f"cannot read {src / voc.ID2LABEL}: {exc}", src
        ) from exc
    id2label = voc.check_id2label({int(k): v for k, v in table.items()})
    return Source(path=src, run_config=run_config, id2label=id2label, records=records)


def _base_key(key) -> tuple[jax.Array, dict]:
    """A typed key and its JSON description for the run config."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return jax.random.key(int(key)), {"base_seed": int(key)}
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        typed = key
    else:
        typed = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
    if typed.shape != ():
        raise ValueError(f"key must be one key (or an int seed), got shape {typed.shape}")
    return typed, {"key_data": np.asarray(jax.random.key_data(typed)).tolist()}


def _merged_classes(sources: list[dict]) -> list[dict]:
    if len(sources) == 1:
        return sources[0]["classes"]
    by_id = {}
    for record in sources:
        for entry in record["classes"]:
            by_id.setdefault(entry["id"], {"id": entry["id"], "name": entry["name"]})
    # token positions refer to one prompt; a mosaic has several
    return [{**by_id[i], "token_positions": []} for i in sorted(by_id)]


def _record(source: Source, picks: list[int], grid, applied, cfg, key, label, size, class_ids):
    unique = [source.records[p] for p in dict.fromkeys(picks)]
    first = unique[0]
    steps = [name for (name, _, _), on in zip(STEPS, applied, strict=True) if on]
    params = {
        param: getattr(cfg, param)
        for (name, _, param), on in zip(STEPS, applied, strict=True)
        if on
    }
    return {
        "prompt": " | ".join(r["prompt"] for r in unique),
        "negative_prompt": first["negative_prompt"],
        "classes": _merged_classes(unique),
        "seed": {"rule": SEED_RULE, "value": np.asarray(jax.random.key_data(key)).tolist()},
        "method": first["method"],
        "model": first["model"],
        "scheduler": first["scheduler"],
        "steps": first["steps"],
        "guidance": first["guidance"],
        "size": list(size),
        "dtype": first["dtype"],
        "mask_stats": mask_stats(label, class_ids),
        "versions": software_versions(),
        "augment": {
            "sources": [source.records[p]["id"] for p in picks],
            "grid": list(grid),
            "steps": steps,
            "params": params,
        },
    }


def make_item(
    source: Source, base_key: jax.Array, global_index: int, cfg: AugmentConfig, size, read
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Output item ``global_index``: uint8 image, uint8 label map and its record (less the
    store's keys). ``read(position)`` returns a source item resized to ``size``."""
    key = item_key(base_key, global_index)
    grid_key, sources_key, pair_key = split_item_key(key)
    rows, cols = cfg.grids[int(_choose_grid(grid_key, cfg=cfg))]
    picks = np.asarray(
        _choose_sources(sources_key, m=rows * cols, count=len(source.records))
    ).tolist()
    tiles = [read(p) for p in picks]
    images = jnp.asarray(np.stack([t[0] for t in tiles]))
    labels = jnp.asarray(np.stack([t[1] for t in tiles]))
    image, label = _splice(images, labels, rows=rows, cols=cols, size=size)
    image, label = _augment(pair_key, image, label, cfg=cfg)
    applied = np.asarray(_choose_augmentations(pair_key, cfg=cfg)).tolist()
    image = np.clip(np.round(np.asarray(image) * 255.0), 0, 255).astype(np.uint8)
    label = np.asarray(label)
    record = _record(source, picks, (rows, cols), applied, cfg, key, label, size, source.id2label)
    return image, label, record


def augment_dataset(
    src: str | Path,
    dst: str | Path,
    key: int | jax.Array,
    cfg: AugmentConfig | None,
    count: int,
    *,
    size: tuple[int, int] | None = None,
    overwrite: bool = False,
    jpeg_quality: int = 95,
    process_index: int = 0,
    process_count: int = 1,
    barrier: Callable[[str], None] | None = None,
    on_item: Callable[[int, str], None] | None = None,
) -> AugmentResult:
    """Write ``count`` augmented items made from the jaxmask VOC dataset ``src`` into a new
    dataset ``dst`` (DiffuMask's splicing, then perspective / occlusion / noise).

    Args:
      src: a jaxmask VOC-layout dataset (finished or partly finished; its finished items are used).
      dst: the new dataset's folder: new or empty, or one made by the same call to resume; never
        ``src``.
      key: an int seed (``jax.random.key(seed)``) or a key; item ``i`` uses ``fold_in(key, i)``.
      cfg: the augmentations (``jaxmask.augment.AugmentConfig``); None for DiffuMask's
        (``jaxmask.augment.DIFFUMASK``).
      count: how many items ``dst`` gets (>= 1).
      size: ``(h, w)`` of the output items; default the size of the source's first item. Source
        items of another size are resized to it first.
      overwrite: delete a dataset made at ``dst`` with other settings and start again.
      jpeg_quality: of the written images.
      process_index, process_count, barrier: the multi-host split, as for
        ``ports.store.open_dataset`` (each process makes ``global_index % process_count ==
        process_index``; process 0 merges).
      on_item: called as ``on_item(global_index, item_id)`` after each written item (progress).

    Returns:
      An :class:`AugmentResult`.

    Raises:
      ValueError: ``dst`` is ``src``, or bad ``count``, ``size`` or ``key``.
      StoreError: ``src`` is missing, empty or not a jaxmask VOC dataset; ``dst`` holds other data.
    """
    src, dst = Path(src), Path(dst)
    cfg = DIFFUMASK if cfg is None else cfg
    if not isinstance(cfg, AugmentConfig):
        raise TypeError(f"cfg must be a jaxmask.augment.AugmentConfig, got {type(cfg).__name__}")
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"count must be an int >= 1, got {count!r}")
    if src.resolve() == dst.resolve() or (dst.exists() and src.exists() and dst.samefile(src)):
        raise ValueError(
            f"the output folder {dst} is the source dataset; write the augmented dataset to a new "
            "folder"
        )
    source = open_source(src)
    base_key, key_config = _base_key(key)
    if size is None:
        size = source.read(0)[1].shape
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (h, w) with positive sides, got {size}")
    for rows, cols in cfg.grids:
        if size[0] < rows or size[1] < cols:
            raise ValueError(
                f"size {size} is too small for the {rows}x{cols} mosaic in cfg.grids: every "
                "tile needs at least one pixel; choose a larger size or drop that grid"
            )

    id2label = dict(source.id2label)
    id2label.setdefault(OCCLUDER_LABEL, "background")  # occluders are labelled background
    run_config = {
        "format": "voc",
        "kind": "augment",
        "source": {
            "run_config": source.run_config,
            "items": len(source.records),
            "digest": source.digest(),
        },
        "augment": dataclasses.asdict(cfg),
        "key": key_config,
        "seed_rule": SEED_RULE,
        "count": int(count),
        "size": list(size),
        "jpeg_quality": int(jpeg_quality),
    }
    dataset = open_dataset(
        dst,
        run_config,
        overwrite,
        process_index=process_index,
        process_count=process_count,
        barrier=barrier,
    )

    @functools.lru_cache(maxsize=256)
    def read(position: int) -> tuple[np.ndarray, np.ndarray]:
        image, label = source.read(position)
        if label.shape != size:
            resized = _splice(
                jnp.asarray(image)[None], jnp.asarray(label)[None], rows=1, cols=1, size=size
            )
            image, label = (np.asarray(x) for x in resized)
        return image, label

    todo = dataset.todo(int(count))
    with dataset.writer(id2label, jpeg_quality=jpeg_quality) as writer:
        for index in todo:
            image, label, record = make_item(source, base_key, index, cfg, size, read)
            name = writer.write(index, image, label, record)
            if on_item is not None:
                on_item(index, name)
    if barrier is not None:
        barrier("jaxmask-augment-written")
    records = dataset.merge() if process_index == 0 else []
    return AugmentResult(
        out=dst, total=int(count), written=len(todo), resumed=len(dataset.done), records=records
    )
