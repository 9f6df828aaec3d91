"""The WebDataset writer: shards of maxcount items, members that read back, resume, full disk."""

import errno
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from ports.store import StoreError, open_dataset, read_manifest, webdataset
from tests.ports.store import _items
from tests.ports.store._items import ID2LABEL, MAXCOUNT, make_item, snapshot, temp_files
from tests.ports.store.test_atomic import fail_writes_under


def members(path):
    with tarfile.open(path) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers()}


def test_shards_hold_maxcount_items_that_read_back(tmp_path):
    out = tmp_path / "ds"
    total = 10
    _items.run(out, "webdataset", total)
    shards = sorted(p.name for p in out.glob("shard-*.tar"))
    assert shards == ["shard-00000-00000.tar", "shard-00000-00001.tar", "shard-00000-00002.tar"]
    records = read_manifest(out / "manifest.jsonl")[0]
    assert [r["global_index"] for r in records] == list(range(total))
    seen = []
    for number, shard in enumerate(shards):
        content = members(out / shard)
        ids = sorted({name.split(".")[0] for name in content})
        assert len(ids) == min(MAXCOUNT, total - MAXCOUNT * number)
        for name in ids:
            index = int(name)
            image, label_map, record, soft_masks = make_item(index)
            assert set(content) >= {f"{name}.jpg", f"{name}.png", f"{name}.json", f"{name}.npz"}
            stored = json.loads(content[f"{name}.json"])
            assert stored == records[index] and stored["shard"] == shard
            assert stored["prompt"] == record["prompt"]
            label = np.asarray(Image.open(io.BytesIO(content[f"{name}.png"])))
            np.testing.assert_array_equal(label, label_map)
            assert np.asarray(Image.open(io.BytesIO(content[f"{name}.jpg"]))).shape == image.shape
            with np.load(io.BytesIO(content[f"{name}.npz"])) as archive:
                np.testing.assert_array_equal(archive["soft_masks"], soft_masks.astype(np.float16))
            seen.append(index)
    assert sorted(seen) == list(range(total))
    with tarfile.open(out / shards[0]) as archive:
        member = archive.getmembers()[0]
        assert (member.mtime, member.uid, member.mode) == (0, 0, 0o644)


def test_maxsize_closes_shards_early(tmp_path):
    out = tmp_path / "ds"
    dataset = open_dataset(out, _items.config("webdataset", 3))
    with dataset.writer(ID2LABEL, maxcount=100, maxsize=1) as writer:
        for index in range(3):
            image, label_map, record, _ = make_item(index)
            writer.write(index, image, label_map, record)
    assert len(list(out.glob("shard-*.tar"))) == 3


def test_resume_deletes_incomplete_shards_and_finishes_identically(tmp_path):
    total = 14
    # shards 0, 1, 2 (full); nothing partial
    reference, out, dataset = _items.stopped(tmp_path, "webdataset", total, range(12))
    lines = (out / "manifest-00000.jsonl").read_bytes().splitlines(keepends=True)
    # killed after renaming shard 2 and appending two of its four lines, the second one torn
    (out / "manifest-00000.jsonl").write_bytes(b"".join(lines[:9]) + lines[9][:25])
    # and a shard being written, under its temporary name
    (out / ".shard-00000-00003.tar.7-abcd.jaxmask-tmp").write_bytes(b"partial tar")
    dataset = open_dataset(out, _items.config("webdataset", total))
    assert dataset.done == set(range(8))
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [
        "shard-00000-00000.tar",
        "shard-00000-00001.tar",
    ]
    assert temp_files(out) == []
    assert len(read_manifest(out / "manifest-00000.jsonl")[0]) == 8
    _items.write_items(dataset, dataset.todo(total))
    dataset.merge()
    assert snapshot(out) == snapshot(reference)


def test_full_disk_drops_the_unfinished_shard_only(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    dataset = open_dataset(out, _items.config("webdataset", 12))
    _items.write_items(dataset, range(MAXCOUNT))  # one finished shard
    finished = snapshot(out)
    with dataset.writer(ID2LABEL, maxcount=MAXCOUNT) as writer:
        for index in (4, 5):
            image, label_map, record, _ = make_item(index)
            writer.write(index, image, label_map, record)
        fail_writes_under(monkeypatch, out / ".shard-00000-00001")
        image, label_map, record, _ = make_item(6)
        with pytest.raises(StoreError) as caught:
            writer.write(6, image, label_map, record)
        monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC
    assert "shard-00000-00001.tar" in str(caught.value) and "space" in str(caught.value)
    assert snapshot(out) == finished and temp_files(out) == []
    assert open_dataset(out, _items.config("webdataset", 12)).done == set(range(MAXCOUNT))


def test_new_shards_continue_the_numbering(tmp_path):
    out = tmp_path / "ds"
    dataset = open_dataset(out, _items.config("webdataset", 6))
    _items.write_items(dataset, [0])  # closed early: a partial shard 0
    dataset = open_dataset(out, _items.config("webdataset", 6))
    _items.write_items(dataset, dataset.todo(6))
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [
        webdataset.shard_name(0, k) for k in range(3)
    ]
    assert dataset.merge() and len(read_manifest(out / "manifest.jsonl")[0]) == 6
