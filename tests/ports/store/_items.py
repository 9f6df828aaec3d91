"""Deterministic items for the store tests (every byte a function of the global index), a
folder snapshot, and a small in-process run. Not collected by pytest (no ``test_`` prefix)."""

import os
from pathlib import Path

import numpy as np

from ports.scale.hosts import SEED_RULE
from ports.store import open_dataset
from ports.store.records import mask_stats

ID2LABEL = {0: "background", 1: "cat", 2: "dog"}
SIZE = (12, 16)
MAXCOUNT = 4  # WebDataset items per shard in these tests


def one_class_record(label_map, id2label, class_id: int = 1, seed_value=0, **fields) -> dict:
    """A complete manifest record (keys in ``REQUIRED_KEYS`` order) for an item whose prompt
    names class ``class_id`` at token 5; ``fields`` replace top-level values. No wall time, so
    equal items give equal lines."""
    name = id2label[class_id]
    record = {
        "prompt": f"a photo of a {name}",
        "negative_prompt": "",
        "classes": [{"id": class_id, "name": name, "token_positions": [5]}],
        "seed": {"rule": SEED_RULE, "value": seed_value},
        "method": {"name": "seediff", "params": {}},
        "model": {"id": "toy", "fingerprint": "sha256:0"},
        "scheduler": "ddim",
        "steps": 4,
        "guidance": 7.5,
        "size": list(np.shape(label_map)),
        "dtype": "float32",
        "mask_stats": mask_stats(label_map, id2label),
        "versions": {"jax": "test"},
    }
    return record | fields


def make_record(global_index: int, label_map, seed_value=None) -> dict:
    """A complete manifest record for an item: a cat and a dog, method parameters and a negative
    prompt, so every nested field holds something."""
    return one_class_record(
        label_map,
        ID2LABEL,
        seed_value=global_index if seed_value is None else seed_value,
        prompt=f"a photo of a cat and a dog, number {global_index}",
        negative_prompt="blurry",
        classes=[
            {"id": 1, "name": "cat", "token_positions": [5]},
            {"id": 2, "name": "dog", "token_positions": [8]},
        ],
        method={"name": "seediff", "params": {"resolutions": [16, 32], "tau": 0.4}},
        model={"id": "toy", "fingerprint": "sha256:0123"},
        size=list(SIZE),
    )


def make_item(global_index: int):
    """(image, label_map, record, soft_masks) for ``global_index``."""
    rng = np.random.default_rng(global_index)
    image = rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    label_map = rng.choice(np.array([0, 1, 2, 255], np.uint8), SIZE)
    soft_masks = rng.random((2, 4, 4), dtype=np.float32)
    return image, label_map, make_record(global_index, label_map), soft_masks


def config(fmt: str, total: int) -> dict:
    return {"format": fmt, "total": total, "model": "toy", "method": "seediff", "base_seed": 0}


def writer_options(fmt: str) -> dict:
    return {"maxcount": MAXCOUNT} if fmt == "webdataset" else {}


def write_items(dataset, indices) -> None:
    with dataset.writer(ID2LABEL, **writer_options(dataset.format)) as writer:
        for index in indices:
            image, label_map, record, soft_masks = make_item(index)
            writer.write(index, image, label_map, record, soft_masks=soft_masks)


def run(out, fmt: str, total: int, merge: bool = True):
    """An uninterrupted one-process run."""
    dataset = open_dataset(out, config(fmt, total))
    write_items(dataset, dataset.todo(total))
    if merge:
        dataset.merge()
    return dataset


def stopped(tmp_path, fmt: str, total: int, indices):
    """A whole run in ``tmp_path / "reference"`` and, in ``tmp_path / "ds"``, one that wrote only
    ``indices`` and stopped: ``(reference, out, dataset)``."""
    reference = tmp_path / "reference"
    run(reference, fmt, total)
    out = tmp_path / "ds"
    dataset = open_dataset(out, config(fmt, total))
    write_items(dataset, indices)
    return reference, out, dataset


def snapshot(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too), by relative path, with its bytes."""
    folder = Path(folder)
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            files[path.relative_to(folder).as_posix()] = path.read_bytes()
    return files


def temp_files(folder) -> list[str]:
    """Relative paths of temporary files left under ``folder``."""
    return [p for p in snapshot(folder) if Path(p).name.endswith(".jaxmask-tmp")]
