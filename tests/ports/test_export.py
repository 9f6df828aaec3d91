"""`jaxmask export`: the clients read what it writes (datasets, pycocotools), and labels survive."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from ports.export import instances, to_coco, to_hf
from ports.store import StoreError, open_dataset
from tests.ports.clitools import invoke
from tests.ports.store._items import ID2LABEL, make_record

SIDE = 24


def scene(index: int) -> np.ndarray:
    """Item 0: two separate cat squares, a dog bar, an ignore band; item 1: one dog blob."""
    label = np.zeros((SIDE, SIDE), np.uint8)
    if index == 0:
        label[2:6, 2:6] = 1
        label[10:14, 10:14] = 1
        label[18:22, 2:20] = 2
        label[0, :] = 255
    else:
        label[5:15, 5:15] = 2
    return label


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "voc"
    dataset = open_dataset(out, {"format": "voc", "total": 2})
    with dataset.writer(ID2LABEL) as writer:
        for index in range(2):
            label = scene(index)
            image = np.stack([label * 40] * 3, axis=-1).astype(np.uint8)
            record = make_record(index, label) | {"split": ("train", "val")[index]}
            record["size"] = [SIDE, SIDE]
            writer.write(index, image, label, record)
    dataset.merge()
    return out


def test_hf_export_loads_with_datasets_and_labels_equal_the_pngs(source, tmp_path, capfd):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "hf"
    assert datasets.is_progress_bar_enabled()
    result = to_hf(source, out)
    # datasets' "Creating parquet from Arrow format" bars stay off our stderr, and back on after
    assert "parquet" not in capfd.readouterr().err and datasets.is_progress_bar_enabled()
    assert result.splits == {"train": 1, "validation": 1}
    loaded = datasets.load_dataset(str(out))
    assert set(loaded) == {"train", "validation"}
    names = loaded["train"].features["classes"].feature.names
    assert names == ["background", "cat", "dog"]
    for split, index in (("train", 0), ("validation", 1)):
        row = loaded[split][0]
        assert row["id"] == f"{index:08d}"
        np.testing.assert_array_equal(np.asarray(row["label"]), scene(index))
        assert row["image"].size == (SIDE, SIDE)
        assert [names[c] for c in row["classes"]] == ["cat", "dog"]


# pycocotools 2.0's decode trips numpy 2's __array__(copy=) deprecation (its code, not ours)
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_coco_export_has_one_instance_per_component(source, tmp_path):
    coco_module = pytest.importorskip("pycocotools.coco")
    out = tmp_path / "coco"
    result = to_coco(source, out)
    assert result.instances == 4 and result.splits == {"train": 1, "val": 1}
    coco = coco_module.COCO(str(out / "annotations" / "instances_train.json"))
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {"cat", "dog"}
    annotations = coco.loadAnns(coco.getAnnIds(imgIds=[1]))
    assert sorted((a["category_id"], a["area"]) for a in annotations) == [(1, 16), (1, 16), (2, 72)]
    label = scene(0)
    union = {1: np.zeros_like(label, bool), 2: np.zeros_like(label, bool)}
    for annotation in annotations:
        union[annotation["category_id"]] |= coco.annToMask(annotation).astype(bool)
    assert np.array_equal(union[1], label == 1) and np.array_equal(union[2], label == 2)
    image = coco.loadImgs([1])[0]
    assert (out / "images" / image["file_name"]).is_file()
    with Image.open(out / "images" / image["file_name"]) as picture:
        assert picture.size == (SIDE, SIDE)


def test_instances_are_8_connected_and_skip_ignore():
    label = np.zeros((6, 6), np.uint8)
    label[0, 0] = label[1, 1] = 1  # diagonal neighbours: one instance
    label[4, 4] = 1
    label[3, 0:3] = 255
    found = instances(label, [1])
    assert [int(m.sum()) for _, m in found] == [2, 1]


def test_export_refuses_damaged_unfinished_or_occupied(source, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    (copy / "SegmentationClass" / "00000001.png").write_bytes(b"x" * 10)
    with pytest.raises(StoreError, match="damaged item"):
        to_hf(copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep")
    with pytest.raises(StoreError, match="not empty"):
        to_coco(source, busy)
    code, output = invoke("export", source, tmp_path / "x", "--to", "tfrecord")
    assert code == 2 and "--to must be hf or coco" in output, output
    code, output = invoke("export", source, tmp_path / "cli", "--to", "coco")
    assert code == 0 and "2 items (1 train, 1 val, 4 instances)" in output, output
    assert json.loads((tmp_path / "cli/annotations/instances_val.json").read_text())["images"]
