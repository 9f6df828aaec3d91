"""A finished jaxmask VOC dataset in the formats training code loads directly.

- ``to_hf``: Parquet shards in the Hugging Face ``datasets`` layout (``data/train-*.parquet``,
  ``data/validation-*.parquet`` when the dataset has a val split), written by ``datasets``
  itself. ``image`` and ``label`` are ``datasets.Image()`` features (the label is the VOC palette
  PNG, so ``np.asarray(row["label"])`` is the class ids); ``classes`` is a sequence of
  ``ClassLabel`` whose names (``background`` first, then the dataset's classes in label order)
  are recorded in the files' schema. ``datasets.load_dataset(OUT)`` reads it.
- ``to_coco``: COCO instance annotations, one instance per connected component (8-connected) of
  each class, masks as RLE encoded by ``pycocotools``, and the images copied beside them. What
  pycocotools, detectron2 (``register_coco_instances``; RLE masks want
  ``INPUT.MASK_FORMAT=bitmask``) and mmdet read.

Both refuse a dataset whose files do not match its manifest (``ports.store.verify``) and write
into a temporary folder renamed into place at the end, so a failed export leaves nothing.
"""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from jaxmask.labels import IGNORE
from ports.store import StoreError, atomic, verify
from ports.store.dataset import require_run_config
from ports.store.records import MANIFEST, is_filtered, read_manifest
from ports.store.voc import ID2LABEL

HF_SPLITS = {"train": "train", "val": "validation"}  # a record's split -> the HF split name
SHARD_ITEMS = 1000  # rows per Parquet file


@dataclasses.dataclass(frozen=True)
class ExportResult:
    out: Path
    items: int
    splits: dict[str, int]  # items per split
    instances: int | None = None  # COCO only


def _source(dataset: Path) -> tuple[list[dict], dict[int, str]]:
    """The finished, intact items of a VOC dataset and its id2label; refuses anything else."""
    dataset = Path(dataset)
    require_run_config(dataset, voc_for="export")
    if not (dataset / MANIFEST).is_file():
        raise StoreError(
            None,
            f"{dataset} has no {MANIFEST}: the run has not finished. Run the same jaxmask "
            "generate command again to finish it.",
            dataset,
        )
    found = verify(dataset)
    if found.problems:
        names = ", ".join(name for name, _ in found.problems[:5])
        raise StoreError(
            None,
            f"{dataset} has {len(found.problems)} damaged item(s) ({names}); run jaxmask verify "
            "to see them and the generate command again to remake them, then export.",
            dataset,
        )
    records = [r for r in read_manifest(dataset / MANIFEST)[0] if not is_filtered(r)]
    table = json.loads((dataset / ID2LABEL).read_text(encoding="utf-8"))
    return records, {int(k): v for k, v in table.items()}


def _fresh(out: Path) -> Path:
    """A temporary folder beside ``out``, which must not exist yet (or be an empty folder)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StoreError(None, f"{out} exists and is not empty; export into a new folder", out)
    atomic.make_folder(out.parent)
    tmp = atomic.temp_name(out)
    tmp.mkdir()
    return tmp


def _finish(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()  # empty, checked by _fresh
    os.replace(tmp, out)
    atomic.fsync_folder(out.parent)


def _label(dataset: Path, record: dict) -> np.ndarray:
    with Image.open(dataset / record["files"]["label"]["path"]) as picture:
        return np.asarray(picture, np.uint8)


def to_hf(dataset: str | os.PathLike, out: str | os.PathLike) -> ExportResult:
    """Write ``dataset`` as Hugging Face ``datasets`` Parquet shards under ``out`` (see module)."""
    import datasets

    dataset, out = Path(dataset), Path(out)
    records, id2label = _source(dataset)
    names = [id2label.get(i, f"class_{i}") for i in range(max(id2label) + 1)]
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "label": datasets.Image(),
            "prompt": datasets.Value("string"),
            "classes": datasets.Sequence(datasets.ClassLabel(names=names)),
        }
    )

    def rows(split):
        for record in records:
            if record.get("split", "train") != split:
                continue
            files = record["files"]
            yield {
                "id": record["id"],
                "image": {"bytes": (dataset / files["image"]["path"]).read_bytes(), "path": None},
                "label": {"bytes": (dataset / files["label"]["path"]).read_bytes(), "path": None},
                "prompt": record["prompt"],
                "classes": [c["id"] for c in record["classes"]],
            }

    tmp = _fresh(out)
    counts = {}
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # its per-shard "Creating parquet" bars: noise on our CLI
    try:
        for split, hf_split in HF_SPLITS.items():
            count = sum(1 for r in records if r.get("split", "train") == split)
            if not count:
                continue
            table = datasets.Dataset.from_list(list(rows(split)), features=features)
            shards = -(-count // SHARD_ITEMS)
            (tmp / "data").mkdir(exist_ok=True)
            for k in range(shards):
                part = table.shard(num_shards=shards, index=k, contiguous=True)
                part.to_parquet(str(tmp / "data" / f"{hf_split}-{k:05d}-of-{shards:05d}.parquet"))
            counts[hf_split] = count
        (tmp / "id2label.json").write_text(json.dumps(id2label, indent=2) + "\n")
        _finish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if bars:  # the caller's setting, as it was
            datasets.enable_progress_bars()
    return ExportResult(out, len(records), counts)


def instances(label: np.ndarray, class_ids) -> list[tuple[int, np.ndarray]]:
    """(class id, boolean mask) for each 8-connected component of each class in ``label``;
    255 (ignore) belongs to no instance."""
    from skimage.measure import label as components

    found = []
    for class_id in class_ids:
        parts = components(label == class_id, connectivity=2)
        found.extend((int(class_id), parts == n) for n in range(1, int(parts.max()) + 1))
    return found


def to_coco(dataset: str | os.PathLike, out: str | os.PathLike) -> ExportResult:
    """Write ``dataset`` as COCO instances (``annotations/instances_{split}.json``, RLE masks)
    with its images under ``images/`` (see module)."""
    from pycocotools import mask as rle

    dataset, out = Path(dataset), Path(out)
    records, id2label = _source(dataset)
    categories = [
        {"id": i, "name": name, "supercategory": "object"}
        for i, name in sorted(id2label.items())
        if i not in (0, IGNORE)
    ]
    tmp = _fresh(out)
    counts, total = {}, 0
    try:
        (tmp / "images").mkdir()
        (tmp / "annotations").mkdir()
        for split in ("train", "val"):
            chosen = [r for r in records if r.get("split", "train") == split]
            if not chosen:
                continue
            images, annotations = [], []
            for record in chosen:
                source = dataset / record["files"]["image"]["path"]
                shutil.copyfile(source, tmp / "images" / source.name)
                label = _label(dataset, record)
                h, w = label.shape
                image_id = record["global_index"] + 1  # COCO ids start at 1
                images.append({"id": image_id, "file_name": source.name, "height": h, "width": w})
                for class_id, mask in instances(label, [c["id"] for c in record["classes"]]):
                    encoded = rle.encode(np.asfortranarray(mask.astype(np.uint8)))
                    annotations.append(
                        {
                            "id": len(annotations) + total + 1,
                            "image_id": image_id,
                            "category_id": class_id,
                            "segmentation": {
                                "size": [int(v) for v in encoded["size"]],
                                "counts": encoded["counts"].decode("ascii"),
                            },
                            "area": float(rle.area(encoded)),
                            "bbox": [float(v) for v in rle.toBbox(encoded)],
                            "iscrowd": 0,
                        }
                    )
            total += len(annotations)
            document = {"images": images, "annotations": annotations, "categories": categories}
            path = tmp / "annotations" / f"instances_{split}.json"
            path.write_text(json.dumps(document, separators=(",", ":")) + "\n")
            counts[split] = len(chosen)
        _finish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, len(records), counts, total)
