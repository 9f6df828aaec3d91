"""The VOC writer: layout, encodings that read back, validation, a full disk mid-item."""

import errno
import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from ports.store import StoreError, open_dataset, read_manifest, voc
from tests.ports.store import _items
from tests.ports.store._items import ID2LABEL, make_item, snapshot, temp_files
from tests.ports.store.test_atomic import fail_writes_under

# The first 21 colours of the PASCAL VOC palette as mmsegmentation lists them (voc.py METAINFO),
# and the colour of 255 (the void band).
VOC_COLOURS = [
    [0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128],
    [0, 128, 128], [128, 128, 128], [64, 0, 0], [192, 0, 0], [64, 128, 0], [192, 128, 0],
    [64, 0, 128], [192, 0, 128], [64, 128, 128], [192, 128, 128], [0, 64, 0], [128, 64, 0],
    [0, 192, 0], [128, 192, 0], [0, 64, 128],
]  # fmt: skip


def test_palette_is_the_voc_colour_map():
    palette = np.asarray(voc.VOC_PALETTE)
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    np.testing.assert_array_equal(palette[:21], VOC_COLOURS)
    np.testing.assert_array_equal(palette[255], [224, 224, 192])
    assert len({tuple(c) for c in palette}) == 256  # every index its own colour


def test_label_png_reads_back_exactly_with_the_palette():
    label_map = np.array([[0, 1, 2], [255, 20, 0]], np.uint8)
    picture = Image.open(io.BytesIO(voc.encode_label_png(label_map)))
    assert picture.mode == "P" and picture.size == (3, 2)
    np.testing.assert_array_equal(np.asarray(picture), label_map)
    palette = np.array(picture.getpalette()).reshape(-1, 3)
    np.testing.assert_array_equal(palette[:21], VOC_COLOURS)


def test_jpeg_reads_back_close_to_a_smooth_image():
    ramp = np.linspace(0, 255, 32, dtype=np.float32)
    image = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], 128.0), -1).astype(np.uint8)
    data = voc.encode_jpeg(image, 95)
    decoded = np.asarray(Image.open(io.BytesIO(data)))
    assert decoded.shape == image.shape
    assert np.abs(decoded.astype(int) - image).mean() < 2.0
    assert data == voc.encode_jpeg(image, 95)


def test_soft_masks_npz_is_float16_and_byte_stable():
    soft_masks = np.random.default_rng(0).random((2, 4, 4), dtype=np.float32)
    data = voc.encode_soft_masks(soft_masks)
    with np.load(io.BytesIO(data)) as archive:
        stored = archive["soft_masks"]
    assert stored.dtype == np.float16
    np.testing.assert_array_equal(stored, soft_masks.astype(np.float16))
    # no wall-clock timestamp inside, so the bytes depend on the array only
    assert {m.date_time for m in zipfile.ZipFile(io.BytesIO(data)).infolist()} == {
        (1980, 1, 1, 0, 0, 0)
    }
    assert data == voc.encode_soft_masks(soft_masks.copy())


def test_writer_layout_and_contents(tmp_path):
    out = tmp_path / "ds"
    dataset = open_dataset(out, _items.config("voc", 3))
    _items.write_items(dataset, [0, 1, 2])
    dataset.merge()
    assert (
        out / "ImageSets/Segmentation/train.txt"
    ).read_text() == "00000000\n00000001\n00000002\n"
    assert json.loads((out / "id2label.json").read_text()) == {
        "0": "background",
        "1": "cat",
        "2": "dog",
    }
    records, torn = read_manifest(out / "manifest.jsonl")
    assert not torn and [r["global_index"] for r in records] == [0, 1, 2]
    for record in records:
        image, label_map, expected, soft_masks = make_item(record["global_index"])
        name = record["id"]
        assert name == f"{record['global_index']:08d}"
        assert record["prompt"] == expected["prompt"] and record["seed"] == expected["seed"]
        np.testing.assert_array_equal(
            np.asarray(Image.open(out / f"SegmentationClass/{name}.png")), label_map
        )
        decoded = np.asarray(Image.open(out / f"JPEGImages/{name}.jpg"))
        assert decoded.shape == image.shape
        with np.load(out / f"SoftMasks/{name}.npz") as archive:
            np.testing.assert_array_equal(archive["soft_masks"], soft_masks.astype(np.float16))
        assert set(record["files"]) == {"image", "label", "soft_masks"}
        for entry in record["files"].values():
            assert (out / entry["path"]).stat().st_size == entry["bytes"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda item: {**item, "label_map": item["label_map"] + 3}, "not class ids"),
        (lambda item: {**item, "label_map": item["label_map"].astype(np.float32)}, "integer"),
        (lambda item: {**item, "image": item["image"].astype(np.float32)}, "uint8"),
        (lambda item: {**item, "image": item["image"][:5]}, "differ in size"),
        (lambda item: {**item, "soft_masks": item["soft_masks"][:1]}, "one map per entry"),
        (
            lambda item: {
                **item,
                "record": {k: v for k, v in item["record"].items() if k != "model"},
            },
            "'model'",
        ),
        (
            lambda item: {**item, "record": {**item["record"], "steps": "4"}},
            "'steps' should be int",
        ),
        (lambda item: {**item, "record": {**item["record"], "id": "x"}}, "set by the writer"),
        (lambda item: {**item, "global_index": -1}, ">= 0"),
    ],
)
def test_bad_items_raise_and_write_nothing(tmp_path, change, message):
    out = tmp_path / "ds"
    dataset = open_dataset(out, _items.config("voc", 3))
    image, label_map, record, soft_masks = make_item(0)
    item = {
        "global_index": 0,
        "image": image,
        "label_map": label_map,
        "record": record,
        "soft_masks": soft_masks,
    }
    item = change(item)
    before = snapshot(out)
    with dataset.writer(ID2LABEL) as writer:
        after_open = snapshot(out)
        with pytest.raises(ValueError, match=message):
            writer.write(**item)
    assert snapshot(out) == after_open and set(after_open) >= set(before)
    assert not list((out / "JPEGImages").iterdir())


@pytest.mark.parametrize(
    "failing", ["JPEGImages", "SegmentationClass", "SoftMasks", "manifest-00000"]
)
def test_full_disk_mid_item_leaves_nothing_half_written(tmp_path, monkeypatch, failing):
    reference, out, dataset = _items.stopped(tmp_path, "voc", 4, [0, 1])
    before = snapshot(out)
    image, label_map, record, soft_masks = make_item(2)
    with dataset.writer(ID2LABEL) as writer:
        fail_writes_under(monkeypatch, out / failing)
        with pytest.raises(StoreError) as caught:
            writer.write(2, image, label_map, record, soft_masks=soft_masks)
        monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC
    assert str(out / failing) in str(caught.value) and "space" in str(caught.value)
    assert snapshot(out) == before  # the item's finished files were removed too; manifest unchanged
    assert temp_files(out) == []
    # space freed: the same command resumes and completes the same dataset
    dataset = open_dataset(out, _items.config("voc", 4))
    assert dataset.done == {0, 1}
    _items.write_items(dataset, dataset.todo(4))
    dataset.merge()
    assert snapshot(out) == snapshot(reference)
