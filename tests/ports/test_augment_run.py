"""``ports.augment.augment_dataset`` end to end on a tiny VOC dataset written here with the store:
content, records, determinism, resume after an interruption, errors."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from jaxmask.augment import AugmentConfig
from ports.augment import augment_dataset, open_source
from ports.store import StoreError, mask_stats, open_dataset, read_manifest
from tests.ports.store._items import one_class_record

ID2LABEL = {0: "background", 1: "cat", 2: "dog"}
SIDE = 32
SOURCES = 4
COLOURS = np.array([[40, 60, 200], [220, 40, 40], [40, 200, 60]], np.uint8)  # by label
GRIDS = ((1, 1), (1, 2), (2, 2))
CFG = AugmentConfig(
    grids=GRIDS,
    grid_weights=(1.0, 1.0, 1.0),
    perspective_prob=0.5,
    perspective_strength=0.15,
    occlusion_prob=0.5,
    occlusion_max_fraction=0.2,
    noise_prob=0.5,
    noise_sigma=0.02,
)
PLAIN = AugmentConfig(
    grids=((1, 1), (1, 2)),
    grid_weights=(1.0, 1.0),
    perspective_prob=0.0,
    occlusion_prob=0.0,
    noise_prob=0.0,
)


def source_label(index: int) -> np.ndarray:
    """Item ``index``: background with a square of class 1 or 2 whose place depends on it, and a
    one-pixel ignore border."""
    label = np.zeros((SIDE, SIDE), np.uint8)
    top, left = 2 + 3 * index, 4 + 2 * index
    label[top : top + 12, left : left + 10] = 1 + index % 2
    label[0, :] = 255
    return label


def source_record(index: int, label: np.ndarray) -> dict:
    class_id = 1 + index % 2
    return one_class_record(
        label,
        ID2LABEL,
        class_id,
        seed_value=[0, index],
        prompt=f"a photo of a {ID2LABEL[class_id]}, number {index}",
    )


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("source")
    dataset = open_dataset(out, {"format": "voc", "total": SOURCES, "model": "toy"})
    with dataset.writer(ID2LABEL) as writer:
        for index in dataset.todo(SOURCES):
            label = source_label(index)
            writer.write(index, COLOURS[label % 3], label, source_record(index, label))
    dataset.merge()
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def read_item(folder: Path, record: dict) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(Image.open(folder / record["files"]["image"]["path"]).convert("RGB"))
    label = np.asarray(Image.open(folder / record["files"]["label"]["path"]))
    return image, label


def records_of(folder: Path) -> list[dict]:
    return read_manifest(folder / "manifest.jsonl")[0]


@pytest.fixture(scope="module")
def augmented(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("augmented") / "aug"
    result = augment_dataset(source, out, 7, CFG, 10)
    assert (result.total, result.written, result.resumed) == (10, 10, 0)
    assert [r["global_index"] for r in result.records] == list(range(10))
    return out


def test_writes_a_voc_dataset_whose_records_name_sources_and_augmentations(source, augmented):
    records = records_of(augmented)
    assert [r["id"] for r in records] == [f"{i:08d}" for i in range(10)]
    split = (augmented / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert split == [r["id"] for r in records]
    assert json.loads((augmented / "id2label.json").read_text()) == {
        str(k): v for k, v in ID2LABEL.items()
    }
    source_ids = {r["id"] for r in records_of(source)}
    grids_seen, steps_seen = set(), set()
    for record in records:
        rows, cols = record["augment"]["grid"]
        grids_seen.add((rows, cols))
        steps_seen.update(record["augment"]["steps"])
        assert len(record["augment"]["sources"]) == rows * cols
        assert set(record["augment"]["sources"]) <= source_ids
        assert set(record["augment"]["params"]) == {
            {"perspective": "perspective_strength", "occlusion": "occlusion_max_fraction",
             "noise": "noise_sigma"}[s] for s in record["augment"]["steps"]
        }  # fmt: skip
        expected = jax.random.key_data(
            jax.random.fold_in(jax.random.key(7), record["global_index"])
        )
        np.testing.assert_array_equal(record["seed"]["value"], np.asarray(expected))
        image, label = read_item(augmented, record)
        assert image.shape == (SIDE, SIDE, 3) and label.shape == (SIDE, SIDE)
        # labels only ever hold source values (0, 1, 2, 255): never interpolated
        assert set(np.unique(label).tolist()) <= {0, 1, 2, 255}
        assert record["mask_stats"] == mask_stats(label, ID2LABEL)
    assert len(grids_seen) >= 2 and steps_seen == {"perspective", "occlusion", "noise"}


def test_plain_splicing_puts_the_named_sources_in_their_cells(source, tmp_path):
    """With the per-pair steps off, a 1x1 item is its source, and a 1x2 item is its two sources,
    each shrunk to half width by nearest neighbour (columns 1, 3, 5, ...)."""
    out = tmp_path / "plain"
    augment_dataset(source, out, 3, PLAIN, 8)
    by_id = {r["id"]: r for r in records_of(source)}
    grids = set()
    for record in records_of(out):
        image, label = read_item(out, record)
        tiles = [read_item(source, by_id[i]) for i in record["augment"]["sources"]]
        grid = tuple(record["augment"]["grid"])
        grids.add(grid)
        assert record["augment"]["steps"] == []
        if grid == (1, 1):
            np.testing.assert_array_equal(label, tiles[0][1])
            assert np.abs(image.astype(int) - tiles[0][0]).mean() < 3
            assert record["prompt"] == by_id[record["augment"]["sources"][0]]["prompt"]
        else:
            np.testing.assert_array_equal(label[:, :16], tiles[0][1][:, 1::2])
            np.testing.assert_array_equal(label[:, 16:], tiles[1][1][:, 1::2])
    assert grids == {(1, 1), (1, 2)}


def test_same_key_same_bytes_other_key_other_items(source, augmented, tmp_path):
    again = tmp_path / "again"
    augment_dataset(source, again, 7, CFG, 10)
    assert snapshot(again) == snapshot(augmented)
    other = tmp_path / "other"
    augment_dataset(source, other, 8, CFG, 10)
    first = [r["augment"] for r in records_of(augmented)]
    assert [r["augment"] for r in records_of(other)] != first


class Interrupt(Exception):
    pass


def test_resume_after_an_interruption_gives_the_same_bytes(source, augmented, tmp_path):
    out = tmp_path / "interrupted"

    def stop_after_four(index, name):
        if index == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        augment_dataset(source, out, 7, CFG, 10, on_item=stop_after_four)
    assert not (out / "manifest.jsonl").exists()
    result = augment_dataset(source, out, 7, CFG, 10)
    assert (result.resumed, result.written) == (4, 6)
    assert snapshot(out) == snapshot(augmented)


def test_resume_after_losing_the_last_item_gives_the_same_bytes(source, augmented, tmp_path):
    out = tmp_path / "copy"
    expected = snapshot(augmented)
    for path, data in expected.items():
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_bytes(data)
    last = records_of(out)[-1]
    for entry in last["files"].values():
        (out / entry["path"]).unlink()
    lines = (out / "manifest.jsonl").read_bytes().splitlines(keepends=True)
    (out / "manifest.jsonl").write_bytes(b"".join(lines[:-1]))
    result = augment_dataset(source, out, 7, CFG, 10)
    assert (result.resumed, result.written) == (9, 1)
    assert snapshot(out) == expected


def test_errors(source, augmented, tmp_path):
    with pytest.raises(ValueError, match="is the source dataset"):
        augment_dataset(source, source, 0, CFG, 2)
    with pytest.raises(StoreError, match="does not exist"):
        augment_dataset(tmp_path / "nowhere", tmp_path / "out", 0, CFG, 2)
    empty = tmp_path / "empty"
    open_dataset(empty, {"format": "voc", "total": 0}).merge()
    with pytest.raises(StoreError, match="has no finished items"):
        augment_dataset(empty, tmp_path / "out", 0, CFG, 2)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("hello")
    with pytest.raises(StoreError, match="not a jaxmask dataset"):
        augment_dataset(stranger, tmp_path / "out", 0, CFG, 2)
    with pytest.raises(ValueError, match="count must be an int >= 1"):
        augment_dataset(source, tmp_path / "out", 0, CFG, 0)
    with pytest.raises(ValueError, match="too small for the 2x2 mosaic"):
        augment_dataset(source, tmp_path / "out", 0, CFG, 2, size=(1, 16))
    # the same folder with another config is refused, not mixed
    with pytest.raises(StoreError, match="different run config"):
        augment_dataset(source, augmented, 8, CFG, 10)


def test_open_source_reads_records_in_order_and_items_back(source):
    opened = open_source(source)
    assert [r["global_index"] for r in opened.records] == list(range(SOURCES))
    assert opened.id2label == ID2LABEL
    image, label = opened.read(2)
    assert image.dtype == np.float32 and 0.0 <= image.min() and image.max() <= 1.0
    np.testing.assert_array_equal(label, source_label(2))


def test_a_damaged_source_item_is_named_not_dropped(source, tmp_path):
    copy = tmp_path / "source"
    shutil.copytree(source, copy)
    label = copy / "SegmentationClass" / "00000002.png"
    label.write_bytes(bytes(255 - b for b in label.read_bytes()))  # same size, other bytes
    out = tmp_path / "out"
    with pytest.raises(StoreError, match=r"1 damaged item\(s\): 00000002 \(SegmentationClass"):
        augment_dataset(copy, out, 0, CFG, 2)
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--size", "0"], ["--size", "positive"]),
        (["--grids", "abc"], ["--grids", "ROWSxCOLS", "'abc'"]),
        (["--grids", "2x0"], ["--grids", "ROWSxCOLS"]),
    ],
)
def test_augment_cli_refuses_bad_flags(source, tmp_path, flags, words):
    from typer.testing import CliRunner

    from ports.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["augment", str(source), str(out), "-n", "2", *flags])
    assert result.exit_code == 2, result.output
    assert all(word in result.output for word in words), result.output
    assert not out.exists()
