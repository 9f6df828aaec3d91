"""The dataset folder: the run config, resume after a crash, refusal of another config, merging."""

import errno
import json

import pytest

from ports.errors import for_cli
from ports.store import (
    MANIFEST,
    RUN_CONFIG,
    StoreError,
    merge_manifests,
    open_dataset,
    read_manifest,
)
from ports.store.records import manifest_name
from tests.ports.store import _items
from tests.ports.store._items import snapshot, temp_files


def no_barrier(name):
    del name


# ---------------------------------------------------------------------------------------------
# Opening


def test_create_writes_the_run_config(tmp_path):
    out = tmp_path / "a" / "b"
    dataset = open_dataset(out, {"total": 3, "size": (8, 8)})
    assert not dataset.resumed and dataset.done == frozenset() and dataset.format == "voc"
    assert json.loads((out / RUN_CONFIG).read_text()) == {
        "total": 3,
        "size": [8, 8],
        "format": "voc",
    }
    assert dataset.todo(3) == [0, 1, 2]


def test_resume_with_the_same_config_returns_finished_items(tmp_path):
    out = tmp_path / "ds"
    dataset = open_dataset(out, _items.config("voc", 6))
    _items.write_items(dataset, [0, 2, 3])
    again = open_dataset(out, _items.config("voc", 6))
    assert again.resumed and again.done == {0, 2, 3}
    assert again.todo(6) == [1, 4, 5]


def test_another_config_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "ds"
    dataset = open_dataset(out, _items.config("voc", 4))
    _items.write_items(dataset, [0, 1])
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    other = {**_items.config("voc", 4), "model": "other", "base_seed": 1}
    with pytest.raises(StoreError) as caught:
        open_dataset(out, other)
    message = str(caught.value)
    assert str(out) in message and "different run config" in message
    assert "model" in message and "base_seed" in message and "total" not in message
    assert "overwrite=True" in message and "--overwrite" in for_cli(caught.value)
    assert snapshot(out) == before  # refused: nothing touched

    dataset = open_dataset(out, other, overwrite=True)
    assert dataset.done == frozenset() and not dataset.resumed
    assert json.loads((out / RUN_CONFIG).read_text())["model"] == "other"
    assert not (out / "JPEGImages").exists()
    assert not (out / "manifest-00000.jsonl").exists()
    assert (out / "notes.txt").read_text() == "mine"  # only dataset files are deleted


def test_a_folder_that_is_not_a_dataset_is_never_used(tmp_path):
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="not a jaxmask dataset"):
            open_dataset(out, _items.config("voc", 2), overwrite=overwrite)
    assert (out / "thesis.tex").read_text() == "precious" and len(list(out.iterdir())) == 1


def test_an_empty_existing_folder_is_used(tmp_path):
    dataset = open_dataset(tmp_path, _items.config("voc", 2))
    assert (tmp_path / RUN_CONFIG).exists() and not dataset.resumed


def test_an_unwritable_output_folder_is_a_clear_error(tmp_path):
    # As root, chmod cannot make a folder unwritable; a path under a regular file fails for anyone.
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "ds"
    with pytest.raises(StoreError) as caught:
        open_dataset(out, _items.config("voc", 2))
    assert str(out) in str(caught.value) and "folder" in str(caught.value)
    assert caught.value.errno == errno.ENOTDIR


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="format"):
        open_dataset(tmp_path, {"format": "parquet"})
    with pytest.raises(ValueError, match="barrier"):
        open_dataset(tmp_path, {}, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="process_index"):
        open_dataset(tmp_path, {}, process_index=2, process_count=2, barrier=no_barrier)


# ---------------------------------------------------------------------------------------------
# Resume after a crash (crash states made by hand; the SIGKILL test makes them for real)


def test_resume_deletes_what_a_crash_left_and_finishes_identically(tmp_path):
    total = 10
    reference = tmp_path / "reference"
    _items.run(reference, "voc", total, merge=False)
    reference_lines = (reference / "manifest-00000.jsonl").read_bytes().splitlines(keepends=True)

    out = tmp_path / "ds"
    dataset = open_dataset(out, _items.config("voc", total))
    _items.write_items(dataset, range(6))
    # item 6: image written, killed before its label: an orphan without a manifest line
    (out / "JPEGImages/00000006.jpg").write_bytes(
        (reference / "JPEGImages/00000006.jpg").read_bytes()
    )
    # item 7: killed inside an atomic write: a temporary file
    (out / "SegmentationClass/.00000007.png.99-abcd.jaxmask-tmp").write_bytes(b"\x89PNG half")
    # item 8: files complete, killed in the middle of appending its manifest line
    for path in ("JPEGImages/00000008.jpg", "SegmentationClass/00000008.png"):
        (out / path).write_bytes((reference / path).read_bytes())
    with open(out / "manifest-00000.jsonl", "ab") as stream:
        stream.write(reference_lines[8][:40])
    # item 3: manifest line present but its label file lost: not finished, made again
    (out / "SegmentationClass/00000003.png").unlink()
    # a temporary file of the shared split file
    (out / "ImageSets/Segmentation").mkdir(parents=True)
    (out / "ImageSets/Segmentation/.train.txt.99-abcd.jaxmask-tmp").write_text("0000")

    dataset = open_dataset(out, _items.config("voc", total))
    assert dataset.resumed and dataset.done == {0, 1, 2, 4, 5}
    assert temp_files(out) == []
    assert not (out / "JPEGImages/00000006.jpg").exists()
    assert not (out / "JPEGImages/00000008.jpg").exists()  # files without a line are orphans
    assert not (out / "JPEGImages/00000003.jpg").exists()
    records, torn = read_manifest(out / "manifest-00000.jsonl")
    assert not torn and [r["global_index"] for r in records] == [0, 1, 2, 4, 5]

    _items.write_items(dataset, dataset.todo(total))
    # the per-host manifest lists the same items; lines are in write order
    assert sorted((out / "manifest-00000.jsonl").read_bytes().splitlines()) == sorted(
        line.rstrip(b"\n") for line in reference_lines
    )
    dataset.merge()
    merge_manifests(reference)
    assert snapshot(out) == snapshot(reference)


def test_a_damaged_manifest_line_is_a_clear_error(tmp_path):
    out = tmp_path / "ds"
    dataset = open_dataset(out, _items.config("voc", 3))
    _items.write_items(dataset, [0, 1])
    lines = (out / "manifest-00000.jsonl").read_bytes().splitlines(keepends=True)
    (out / "manifest-00000.jsonl").write_bytes(b"{not json\n" + lines[1])
    with pytest.raises(StoreError, match="line 1 is not a manifest record"):
        open_dataset(out, _items.config("voc", 3))


# ---------------------------------------------------------------------------------------------
# Several processes (run one after another here; real processes in tests/ports/scale)


def run_processes(out, fmt, total, process_count, indices=None):
    datasets = [
        open_dataset(
            out,
            _items.config(fmt, total),
            process_index=p,
            process_count=process_count,
            barrier=no_barrier,
        )
        for p in range(process_count)
    ]
    for dataset in datasets:
        todo = dataset.todo(total)
        _items.write_items(dataset, [i for i in todo if indices is None or i in indices])
    return datasets


@pytest.mark.parametrize("fmt", ["voc", "webdataset"])
def test_two_processes_split_the_work_and_merge(tmp_path, fmt):
    total = 9
    single = tmp_path / "single"
    _items.run(single, fmt, total)
    out = tmp_path / "two"
    run_processes(out, fmt, total, 2)
    per_host = [read_manifest(out / manifest_name(p))[0] for p in (0, 1)]
    assert [r["global_index"] for r in per_host[0]] == [0, 2, 4, 6, 8]
    assert [r["global_index"] for r in per_host[1]] == [1, 3, 5, 7]
    merged = merge_manifests(out)
    assert [r["global_index"] for r in merged] == list(range(total))
    assert (
        not (out / "manifest-00000.jsonl").exists() and not (out / "manifest-00001.jsonl").exists()
    )
    assert merge_manifests(out) == merged  # idempotent
    if fmt == "voc":
        assert snapshot(out) == snapshot(single)
    else:  # shards are per process; their items and the manifest's item fields agree
        strip = [{k: v for k, v in r.items() if k != "shard"} for r in merged]
        single_records = read_manifest(single / MANIFEST)[0]
        assert strip == [{k: v for k, v in r.items() if k != "shard"} for r in single_records]


def test_resume_with_another_process_count_finishes_the_same_dataset(tmp_path):
    total = 12
    single = tmp_path / "single"
    _items.run(single, "voc", total)
    out = tmp_path / "ds"
    run_processes(out, "voc", total, 2, indices={0, 1, 2, 3, 5})  # stopped early
    # process 1 was killed with an orphan (item 7: image only) and a temporary manifest
    (out / "JPEGImages/00000007.jpg").write_bytes(b"orphan")
    (out / ".manifest-00001.jsonl.5-beef.jaxmask-tmp").write_text("{")
    datasets = run_processes(out, "voc", total, 3)
    assert all(d.done == {0, 1, 2, 3, 5} for d in datasets)
    assert datasets[1].todo(total) == [4, 7, 10]
    merge_manifests(out)
    assert snapshot(out) == snapshot(single)


def test_merge_after_resume_after_merge(tmp_path):
    total = 6
    reference, out, dataset = _items.stopped(tmp_path, "voc", total, [0, 1, 2])
    merge_manifests(out)
    dataset = open_dataset(out, _items.config("voc", total))
    assert dataset.done == {0, 1, 2}
    _items.write_items(dataset, dataset.todo(total))
    merge_manifests(out)
    assert snapshot(out) == snapshot(reference)


def test_merge_refuses_a_folder_without_run_config(tmp_path):
    with pytest.raises(StoreError, match="not a jaxmask dataset"):
        merge_manifests(tmp_path)


def test_require_run_config_refuses_what_a_command_cannot_read(tmp_path):
    from ports.store.dataset import require_run_config

    with pytest.raises(StoreError, match="holds no jaxmask_run.json: not a jaxmask dataset") as e:
        require_run_config(tmp_path / "none", voc_for="export")
    assert e.value.errno == errno.ENOENT
    open_dataset(tmp_path / "shards", {"total": 1, "size": (8, 8), "format": "webdataset"})
    assert require_run_config(tmp_path / "shards")["format"] == "webdataset"  # any format
    with pytest.raises(StoreError, match=r"'webdataset' dataset; augment reads the VOC layout"):
        require_run_config(tmp_path / "shards", voc_for="augment")
    open_dataset(tmp_path / "voc", {"total": 1, "size": (8, 8)})
    assert require_run_config(tmp_path / "voc", voc_for="export")["total"] == 1
