"""End-to-end tests of ``jaxmask generate`` and ``jaxmask preview`` on a tiny SD checkpoint.

Real ``python -m ports.cli`` subprocesses where a real process matters (SIGKILL mid-run, two
processes under jax.distributed, and the reference run they are compared with); typer's CliRunner
in this process elsewhere. One reference dataset (VOC, batch size 2) is made once per module.

The tiny model attends at sides (8, 16) at its native 64 px, so SeeDiff needs
``seed_resolution=8`` (its default wants finest / 4).
"""

import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.ports.clitools import (
    CLASSES,
    IDS,
    IN_PROCESS_BATCH,
    PER_CLASS,
    RUN_TIMEOUT,
    SIDE,
    TOTAL,
    cli_process,
    finish,
    free_port,
    generate_args,
    invoke,
    snapshot,
)


def label_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def rgb_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def records(folder) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "manifest.jsonl").read_text().splitlines()]


def expected_class(index: int) -> str:
    return CLASSES[index % len(CLASSES)]  # the plan's rule: class i % K, one template


@pytest.fixture(scope="module")
def reference(tiny_sd_path, tmp_path_factory, jax_cache):
    """An uninterrupted one-process run, batch size 2: (folder, its files)."""
    out = tmp_path_factory.mktemp("generate") / "reference"
    output = finish(cli_process(generate_args(out, tiny_sd_path), jax_cache))
    assert f"{TOTAL} generated" in output, output
    return out, snapshot(out)


# ---------------------------------------------------------------------------------------------
# 1. what a run writes


def test_run_writes_a_voc_dataset_with_a_manifest(reference, tiny_sd_path):
    from transformers import CLIPTokenizer

    out, files = reference
    jpegs = sorted(p for p in files if p.startswith("JPEGImages/"))
    pngs = sorted(p for p in files if p.startswith("SegmentationClass/"))
    assert jpegs == [f"JPEGImages/{i}.jpg" for i in IDS]
    assert pngs == [f"SegmentationClass/{i}.png" for i in IDS]
    assert files["ImageSets/Segmentation/train.txt"].decode().split() == IDS
    id2label = json.loads(files["id2label.json"])
    assert id2label == {"0": "background", **{str(i + 1): c for i, c in enumerate(CLASSES)}}
    assert not [p for p in files if p.startswith("manifest-") or p.endswith(".jaxmask-tmp")]

    # label PNGs: palette images in PASCAL VOC colours, values {0, the item's class id, 255}
    seen = set()
    for index, name in enumerate(IDS):
        image = Image.open(io.BytesIO(files[f"JPEGImages/{name}.jpg"]))
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (SIDE, SIDE)
        label = Image.open(io.BytesIO(files[f"SegmentationClass/{name}.png"]))
        assert label.format == "PNG" and label.mode == "P" and label.size == (SIDE, SIDE)
        palette = np.asarray(label.getpalette(), np.uint8).reshape(-1, 3)
        # VOC colours: 0 black, 1 (cat here) dark red, 2 (dog) dark green, 255 the ignore colour
        assert palette[0].tolist() == [0, 0, 0]
        assert palette[1].tolist() == [128, 0, 0] and palette[2].tolist() == [0, 128, 0]
        if len(palette) > 255:
            assert palette[255].tolist() == [224, 224, 192]
        values = set(np.unique(np.asarray(label)).tolist())
        own = CLASSES.index(expected_class(index)) + 1
        assert values <= {0, own, 255}, (name, values)
        seen |= values
    assert {1, 2} <= seen  # every class has foreground somewhere

    # the manifest: one line per item, in order, describing how it was made
    tokenizer = CLIPTokenizer.from_pretrained(Path(tiny_sd_path) / "tokenizer")
    run_config = json.loads(files["jaxmask_run.json"])
    lines = records(out)
    assert [r["global_index"] for r in lines] == list(range(TOTAL))
    assert [r["id"] for r in lines] == IDS
    fingerprints = set()
    for record in lines:
        index, name = record["global_index"], record["id"]
        cls = expected_class(index)
        assert record["prompt"] == f"a photo of a {cls}"
        assert record["negative_prompt"] == ""
        (entry,) = record["classes"]
        assert entry["id"] == CLASSES.index(cls) + 1 and entry["name"] == cls
        prompt_ids = tokenizer(record["prompt"]).input_ids  # BOS ... EOS
        word_ids = tokenizer(cls, add_special_tokens=False).input_ids
        positions = entry["token_positions"]
        assert positions == list(range(positions[0], positions[0] + len(word_ids)))
        assert [prompt_ids[p] for p in positions] == word_ids
        assert record["seed"]["value"] == 0
        assert "fold_in" in record["seed"]["rule"] and "global_index" in record["seed"]["rule"]
        assert record["method"]["name"] == "seediff-code"
        assert record["method"]["params"]["seed_resolution"] == 8
        assert {"alpha", "beta"} <= set(record["method"]["params"])  # the defaults, written out
        assert record["model"]["id"] == str(tiny_sd_path)
        assert record["model"]["fingerprint"].startswith("sha256:")
        fingerprints.add(record["model"]["fingerprint"])
        assert record["model"] == run_config["model"]
        assert record["steps"] == 3 and record["scheduler"] == "ddim" and record["guidance"] == 7.5
        assert record["size"] == [SIDE, SIDE] and record["dtype"] == "float32"
        # mask stats and file hashes agree with the files
        labels = label_array(files[f"SegmentationClass/{name}.png"])
        for cid, fraction in record["mask_stats"]["fraction"].items():
            assert fraction == pytest.approx(np.mean(labels == int(cid)), abs=1e-6)
        assert record["mask_stats"]["ignore"] == pytest.approx(np.mean(labels == 255), abs=1e-6)
        for entry in record["files"].values():
            data = files[entry["path"]]
            assert entry["bytes"] == len(data)
            assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert len(fingerprints) == 1
    assert run_config["plan"]["classes"] == list(CLASSES)
    assert run_config["method"]["params"] == {"seed_resolution": 8}


# ---------------------------------------------------------------------------------------------
# 2. crash safety


def test_sigkill_mid_run_then_rerun_is_byte_identical(reference, tiny_sd_path, tmp_path, jax_cache):
    out = tmp_path / "killed"
    manifest = out / "manifest-00000.jsonl"

    def lines() -> int:
        try:
            return manifest.read_bytes().count(b"\n")
        except FileNotFoundError:
            return 0

    process = cli_process(generate_args(out, tiny_sd_path), jax_cache)
    deadline = time.monotonic() + RUN_TIMEOUT
    while lines() < 1 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    output = process.communicate(timeout=60)[0].decode(errors="replace")
    assert process.returncode == -signal.SIGKILL, output  # killed, not finished
    done = lines()  # complete lines; a line is written after its item's files
    assert 0 < done < TOTAL and not (out / "manifest.jsonl").exists()

    output = finish(cli_process(generate_args(out, tiny_sd_path), jax_cache))
    counts = re.search(r"(\d+) generated, (\d+) already there, (\d+) in", output)
    assert counts, output
    assert [int(c) for c in counts.groups()] == [TOTAL - done, done, TOTAL], output
    assert snapshot(out) == reference[1]


# ---------------------------------------------------------------------------------------------
# 3. determinism across processes and batch sizes


def test_two_processes_make_the_same_dataset_as_one(reference, tiny_sd_path, tmp_path, jax_cache):
    out = tmp_path / "two"
    port = free_port()
    processes = [
        cli_process(
            generate_args(
                out,
                tiny_sd_path,
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(p),
            ),
            jax_cache,
        )
        for p in range(2)
    ]
    try:
        outputs = [finish(p) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert f"{TOTAL} in" in outputs[0], outputs  # process 0 reports the whole dataset
    assert "generated" not in outputs[1], outputs  # process 1 knew it was not process 0
    assert snapshot(out) == reference[1]


# ---------------------------------------------------------------------------------------------
# 6. WebDataset shards (run with batch size 4: compared with the batch-2 reference)


# webdataset 1.0 leaves its tar files for the garbage collector to close (not our handles)
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_webdataset_shards_pair_image_label_record(reference, tiny_sd_path, tmp_path):
    """Shards hold <id>.jpg/.png/.json per item. Across batch sizes (4 here, 2 in the reference)
    label maps are identical and images differ by float rounding only (a few grey levels after
    JPEG), so images are not compared byte for byte."""
    ref_out, ref_files = reference
    out = tmp_path / "wds"
    code, output = invoke(
        *generate_args(out, tiny_sd_path, "--format", "webdataset", batch_size=IN_PROCESS_BATCH)
    )
    assert code == 0, output
    shards = sorted(out.glob("*.tar"))
    assert shards and all(s.name.startswith("shard-00000-") for s in shards)
    assert not (out / "JPEGImages").exists() and not list(out.glob("manifest-*"))
    lines = records(out)
    assert [r["id"] for r in lines] == IDS
    manifest_lines = (out / "manifest.jsonl").read_bytes().splitlines(keepends=True)

    members: dict[str, dict[str, bytes]] = {}
    shard_of: dict[str, str] = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                assert member.isfile()
                stem, ext = member.name.split(".", 1)
                assert ext not in members.setdefault(stem, {}), member.name
                members[stem][ext] = tar.extractfile(member).read()
                shard_of[stem] = shard.name
    assert sorted(members) == IDS
    ref_records = {r["id"]: r for r in records(ref_out)}
    for n, name in enumerate(IDS):
        item = members[name]
        assert set(item) == {"jpg", "png", "label.npz", "json"}, (name, sorted(item))
        record = json.loads(item["json"])
        assert item["json"] == manifest_lines[n]  # the member is the manifest line
        assert record["shard"] == shard_of[name] and record["global_index"] == n
        assert record["prompt"] == ref_records[name]["prompt"]
        assert record["classes"] == ref_records[name]["classes"]
        assert record["mask_stats"] == ref_records[name]["mask_stats"]
        for entry in record["files"].values():
            assert (
                entry["sha256"] == hashlib.sha256(item[entry["path"].split(".", 1)[1]]).hexdigest()
            )
        labels = label_array(item["png"])
        np.testing.assert_array_equal(
            labels, label_array(ref_files[f"SegmentationClass/{name}.png"])
        )
        image, ref_image = rgb_array(item["jpg"]), rgb_array(ref_files[f"JPEGImages/{name}.jpg"])
        assert image.shape == (SIDE, SIDE, 3)
        assert np.abs(image - ref_image).max() <= 4, name
        assert np.abs(image - ref_image).mean() < 0.5, name

    # The webdataset library itself, with a stock decoder and the one line the README shows.
    import webdataset as wds

    urls = [str(s) for s in shards]
    for decoder in ("rgb8", "pil", "l8", "torchrgb"):
        samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode(decoder))
        assert [s["__key__"] for s in samples] == IDS
        for sample, record in zip(samples, lines, strict=True):
            label = sample["label.npz"]["label"]  # the README's line
            assert label.dtype == np.uint8 and label.shape == (SIDE, SIDE)
            np.testing.assert_array_equal(label, label_array(members[record["id"]]["png"]))
            ids = {str(c["id"]) for c in record["classes"]} | {"0"}
            fractions = {c: round(float(np.mean(label == int(c))), 6) for c in sorted(ids)}
            assert fractions == record["mask_stats"]["fraction"]


# ---------------------------------------------------------------------------------------------
# 5. preview


def test_preview_writes_a_contact_sheet(reference, tmp_path):
    out, _ = reference
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = snapshot(copy)
    code, output = invoke("preview", f"{copy}/", "--count", "2")
    assert code == 0, output
    assert snapshot(copy) == before  # written beside the dataset, not into it
    sheet = Image.open(io.BytesIO((tmp_path / "copy-preview.png").read_bytes()))
    assert sheet.format == "PNG"
    code, output = invoke("preview", copy, "--out", tmp_path / "all.png", "--count", str(TOTAL))
    assert code == 0, output
    full = rgb_array((tmp_path / "all.png").read_bytes())
    assert full.shape[0] > sheet.size[1]  # more rows for more items
    colours = {tuple(c) for c in full.reshape(-1, 3).tolist()}
    assert (128, 0, 0) in colours and (0, 128, 0) in colours  # both classes' label colours

    empty = tmp_path / "not-a-dataset"
    empty.mkdir()
    code, output = invoke("preview", empty)
    assert code == 2 and "manifest" in output, output
    assert not any(empty.iterdir())


# ---------------------------------------------------------------------------------------------
# 4. bad input: exit code 2, a message that says what to do, nothing written
# (flags and prompts files a run refuses up front: the cases of tests/ports/test_refusals.py)


def test_folder_made_with_another_config_is_refused(reference, tiny_sd_path):
    out, files = reference
    code, output = invoke(
        *generate_args(out, tiny_sd_path, "--guidance", "3", batch_size=IN_PROCESS_BATCH)
    )
    assert code == 2, output
    assert "--overwrite" in output and "guidance" in output, output
    assert snapshot(out) == files


def test_output_under_a_regular_file_is_refused(tiny_sd_path, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    code, output = invoke(*generate_args(blocker / "ds", tiny_sd_path, batch_size=IN_PROCESS_BATCH))
    assert code == 2, output
    assert str(blocker) in output and "Traceback" not in output, output
    assert blocker.read_text() == "not a folder" and sorted(tmp_path.iterdir()) == [blocker]


# ---------------------------------------------------------------------------------------------
# 7. integrity: damaged files, one writer per folder, the model keyed by its weights


def garble(path: Path) -> None:
    """Overwrite ``path`` with garbage of the same size (what a bad disk or a stray copy does)."""
    path.write_bytes(bytes((b + 1) % 256 for b in path.read_bytes()))


def test_damaged_files_are_named_by_verify_and_made_again(reference, tiny_sd_path, tmp_path):
    out = tmp_path / "damaged"
    shutil.copytree(reference[0], out)
    code, output = invoke("verify", out)
    assert code == 0 and f"ok: {TOTAL} items" in output, output
    garble(out / "SegmentationClass" / f"{IDS[1]}.png")
    garble(out / "JPEGImages" / f"{IDS[4]}.jpg")

    code, output = invoke("verify", out)
    assert code == 1, output
    assert f"{IDS[1]}: SegmentationClass/{IDS[1]}.png differs" in output, output
    assert f"{IDS[4]}: JPEGImages/{IDS[4]}.jpg differs" in output, output
    assert "2 damaged item(s)" in output and "not made yet" not in output, output

    code, output = invoke(*generate_args(out, tiny_sd_path, batch_size=IN_PROCESS_BATCH))
    assert code == 0, output
    assert f"2 generated, {TOTAL - 2} already there, 2 damaged and made again" in output, output
    assert snapshot(out) == reference[1]


def test_verify_reports_a_shard_with_a_damaged_member(tiny_sd_path, tmp_path):
    out = tmp_path / "wds"
    args = generate_args(out, tiny_sd_path, "--format", "webdataset", batch_size=IN_PROCESS_BATCH)
    code, output = invoke(*args)
    assert code == 0, output
    before = snapshot(out)
    shard = min(out.glob("shard-*.tar"))
    with tarfile.open(shard) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(".png"))
    data = bytearray(shard.read_bytes())
    data[member.offset_data] ^= 0xFF  # one byte of one label, the tar still reads
    shard.write_bytes(bytes(data))
    code, output = invoke("verify", out)
    assert code == 1 and f"{shard.name}: {member.name} differs" in output, output
    code, output = invoke(*args)
    assert code == 0 and "damaged and made again" in output, output
    assert snapshot(out) == before


def test_verify_names_an_unfinished_dataset(reference, tmp_path):
    out = tmp_path / "partial"
    shutil.copytree(reference[0], out)
    lines = (out / "manifest.jsonl").read_text().splitlines(keepends=True)
    (out / "manifest.jsonl").write_text("".join(lines[:-1]))
    code, output = invoke("verify", out)
    assert code == 1 and f"1 of {TOTAL} items are not made yet" in output, output
    code, output = invoke("verify", tmp_path)
    assert code == 2 and "not a jaxmask dataset" in output, output


def test_a_second_run_on_the_same_folder_is_refused(reference, tiny_sd_path, tmp_path, jax_cache):
    out = tmp_path / "busy"
    first = cli_process(generate_args(out, tiny_sd_path), jax_cache)
    deadline = time.monotonic() + RUN_TIMEOUT
    while not (out / "jaxmask.lock").exists() and time.monotonic() < deadline:
        assert first.poll() is None, first.communicate()[0].decode()
        time.sleep(0.01)
    # held while the second starts: with its program kept on disk the first run can finish
    # before the second has imported jax
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = cli_process(generate_args(out, tiny_sd_path), jax_cache)
        output = second.communicate(timeout=RUN_TIMEOUT)[0].decode(errors="replace")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2, output
    assert "being written by another jaxmask run" in output, output
    assert f"pid {first.pid} on {socket.gethostname()}" in output, output
    assert f"{TOTAL} generated" in finish(first)
    assert snapshot(out) == reference[1]  # the lock is gone, the dataset is the one run's


def test_a_lock_left_by_a_dead_run_is_taken_over(reference, tiny_sd_path, tmp_path):
    out = tmp_path / "stale"
    shutil.copytree(reference[0], out)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid is free now
    lock = {"pid": gone.pid, "host": socket.gethostname(), "started": 0}
    (out / "jaxmask.lock").write_text(json.dumps(lock))
    code, output = invoke(*generate_args(out, tiny_sd_path, batch_size=IN_PROCESS_BATCH))
    assert code == 0 and f"0 generated, {TOTAL} already there" in output, output
    assert snapshot(out) == reference[1]

    (out / "jaxmask.lock").write_text(json.dumps({**lock, "host": "elsewhere", "pid": 7}))
    code, output = invoke(*generate_args(out, tiny_sd_path, batch_size=IN_PROCESS_BATCH))
    assert code == 2 and "pid 7 on elsewhere" in output, output
    assert f"delete {out / 'jaxmask.lock'}" in output, output


def test_resume_follows_the_weights_not_the_path(reference, tiny_sd_path, tmp_path):
    out = tmp_path / "moved"
    shutil.copytree(reference[0], out)
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(tiny_sd_path, moved)
    spelled = f"{moved.parent}/./model/"  # another spelling of another path to the same weights
    code, output = invoke(*generate_args(out, spelled, batch_size=IN_PROCESS_BATCH))
    assert code == 0 and f"0 generated, {TOTAL} already there" in output, output
    assert snapshot(out) == reference[1]

    (moved / "unet" / "config.json").write_text(
        (moved / "unet" / "config.json").read_text().replace("\n", "\n ", 1)
    )  # other bytes: another fingerprint
    code, output = invoke(*generate_args(out, moved, batch_size=IN_PROCESS_BATCH))
    assert code == 2 and "model.fingerprint" in output and "--overwrite" in output, output
    assert snapshot(out) == reference[1]


def test_raising_per_class_extends_the_dataset_lowering_it_is_refused(
    reference, tiny_sd_path, tmp_path
):
    out = tmp_path / "extended"
    shutil.copytree(reference[0], out)
    args = generate_args(out, tiny_sd_path, batch_size=IN_PROCESS_BATCH)
    more = args[:]
    more[more.index("-n") + 1] = str(PER_CLASS + 1)
    code, output = invoke(*more)
    assert code == 0, output
    assert f"{len(CLASSES)} generated, {TOTAL} already there, {TOTAL + 2} in" in output, output
    after = snapshot(out)
    for path, data in reference[1].items():  # every earlier item's files are as they were
        if path.startswith(("JPEGImages/", "SegmentationClass/")):
            assert after[path] == data, path
    assert len(records(out)) == TOTAL + 2 and [r["global_index"] for r in records(out)] == list(
        range(TOTAL + 2)
    )
    assert (out / "ImageSets/Segmentation/train.txt").read_text().count("\n") == TOTAL + 2
    assert invoke("verify", out)[0] == 0

    fewer = args[:]
    fewer[fewer.index("-n") + 1] = "1"
    code, output = invoke(*fewer)
    assert code == 2, output
    assert f"holds {PER_CLASS + 1} items per class; --per-class 1 would drop" in output, output
    assert "--overwrite" in output and "=True" not in output, output
    assert snapshot(out) == after


def test_val_fraction_splits_items_by_a_hash_of_seed_and_index(reference, tiny_sd_path, tmp_path):
    """Also: --batch-size 100000 for 6 items makes one batch of 8 (6 rounded up to the 4
    devices), not 100000 padded ones; the items are the batch-2 reference's bytes."""
    from ports.generate import item_split

    out = tmp_path / "split"
    args = generate_args(out, tiny_sd_path, "--val-fraction", "0.5", batch_size=100_000)
    code, output = invoke(*args)
    assert code == 0, output
    lists = {
        name: (out / f"ImageSets/Segmentation/{name}.txt").read_text().split()
        for name in ("train", "val", "trainval")
    }
    expected = {i: item_split(0, n, 0.5) for n, i in enumerate(IDS)}
    assert lists["val"] == [i for i in IDS if expected[i] == "val"]
    assert lists["train"] == [i for i in IDS if expected[i] == "train"]
    assert lists["trainval"] == IDS and lists["val"] and lists["train"]
    assert {r["id"]: r["split"] for r in records(out)} == expected
    # the items themselves are the reference's: a split only sorts them
    for path, data in reference[1].items():
        if path.startswith(("JPEGImages/", "SegmentationClass/")):
            assert snapshot(out)[path] == data, path
    # without --val-fraction every item is train, and val.txt is there (empty) for the loaders
    ref = reference[0] / "ImageSets/Segmentation"
    assert (ref / "val.txt").read_text() == "" and (ref / "trainval.txt").read_text().split() == IDS


def test_confidence_filter_drops_the_unsure_masks(reference, tiny_sd_path, tmp_path):
    beta = 0.3  # seediff-code's threshold: every labelled pixel scores at least this
    scored = tmp_path / "scored"
    code, output = invoke(
        *generate_args(scored, tiny_sd_path, "--min-confidence", "0", batch_size=IN_PROCESS_BATCH)
    )
    assert code == 0 and "filtered out" not in output, output
    confidence = {}
    for record in records(scored):
        stats = record["mask_stats"]
        for cid, score in stats["confidence"].items():
            assert (beta <= score <= 1) if stats["fraction"][cid] > 0 else score == 0, record
        confidence[record["id"]] = min(stats["confidence"].values())
    # scoring changes no item: the files are the reference's
    for path, data in reference[1].items():
        if path.startswith(("JPEGImages/", "SegmentationClass/")):
            assert snapshot(scored)[path] == data, path

    cut = sorted(confidence.values())[TOTAL // 2]
    dropped = {i for i, c in confidence.items() if c < cut}
    assert 0 < len(dropped) < TOTAL
    out = tmp_path / "filtered"
    args = generate_args(
        out, tiny_sd_path, "--min-confidence", str(cut), batch_size=IN_PROCESS_BATCH
    )
    code, output = invoke(*args)
    assert code == 0 and f"({len(dropped)} filtered out, no files)" in output, output
    for record in records(out):
        assert ("filtered" in record) == (record["id"] in dropped), record["id"]
        if record["id"] in dropped:
            assert "under min_confidence" in record["filtered"] and record["files"] == {}


def test_item_split_is_a_fraction_of_a_large_set():
    from ports.generate import item_split

    val = sum(item_split(7, i, 0.1) == "val" for i in range(20_000))
    assert 1800 < val < 2200  # 0.1 of 20k, within 5 sigma of a binomial
    assert all(item_split(7, i, 0.0) == "train" for i in range(100))


def test_area_filters_keep_the_record_and_write_no_files(reference, tiny_sd_path, tmp_path):
    ref = {r["id"]: r for r in records(reference[0])}
    share = {i: r["mask_stats"]["fraction"][str(r["classes"][0]["id"])] for i, r in ref.items()}
    cut = sorted(share.values())[TOTAL // 2]  # about half the items fall under it
    dropped = {i for i, f in share.items() if f < cut}
    assert 0 < len(dropped) < TOTAL

    out = tmp_path / "filtered"
    args = generate_args(out, tiny_sd_path, "--min-area", str(cut), batch_size=IN_PROCESS_BATCH)
    code, output = invoke(*args)
    assert code == 0, output
    assert f"{TOTAL} generated" in output and f"({len(dropped)} filtered out, no files)" in output
    lines = {r["id"]: r for r in records(out)}
    assert sorted(lines) == IDS  # every item keeps its line
    for name, record in lines.items():
        assert ("filtered" in record) == (name in dropped), name
        assert (out / "JPEGImages" / f"{name}.jpg").exists() == (name not in dropped)
        if name in dropped:
            assert record["files"] == {} and "under min_area" in record["filtered"]
            assert record["mask_stats"] == ref[name]["mask_stats"]
    kept = [i for i in IDS if i not in dropped]
    assert (out / "ImageSets/Segmentation/train.txt").read_text().split() == kept
    assert invoke("verify", out)[0] == 0
    code, output = invoke(*args)  # a filtered item is finished: the rerun makes nothing
    assert code == 0 and f"0 generated, {TOTAL} already there" in output, output


# ---------------------------------------------------------------------------------------------
# 7. host work beside sampling


def test_a_batch_is_written_while_the_next_one_samples(
    reference, tiny_sd_path, tmp_path, monkeypatch
):
    """The first item's write waits until the second batch has begun sampling. A run that wrote
    each batch before sampling the next would never get there: the wait runs out and the run
    fails. The files are still the reference's."""
    from ports import api
    from ports.store.voc import VocWriter

    second_batch = threading.Event()
    calls = []
    real_generate, real_write = api.Pipeline.generate, VocWriter.write

    def generate(self, *args, **kwargs):
        calls.append(kwargs["item_ids"].tolist())
        if len(calls) == 2:
            second_batch.set()
        return real_generate(self, *args, **kwargs)

    def write(self, *args, **kwargs):
        if not second_batch.wait(timeout=60):
            raise AssertionError("the first batch was written before the second one sampled")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(api.Pipeline, "generate", generate)
    monkeypatch.setattr(VocWriter, "write", write)
    out = tmp_path / "overlap"
    code, output = invoke(*generate_args(out, tiny_sd_path, batch_size=IN_PROCESS_BATCH))
    assert code == 0 and f"{TOTAL} generated" in output, output
    assert len(calls) == 2  # 6 items in batches of 4
    assert snapshot(out) == reference[1]


def test_a_failed_write_fails_the_run_and_a_rerun_makes_the_rest(
    reference, tiny_sd_path, tmp_path, monkeypatch
):
    """A write that fails on the writer thread (the third item: a full disk) fails the run with
    its message, though the next batch has sampled by then. The two items before it stay, and
    the rerun makes the other four: the reference's bytes."""
    from ports.store.voc import VocWriter

    real_write, writes = VocWriter.write, []

    def write(self, *args, **kwargs):
        writes.append(args[0])
        if len(writes) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(VocWriter, "write", write)
    out = tmp_path / "full"
    args = generate_args(out, tiny_sd_path, batch_size=IN_PROCESS_BATCH)
    code, output = invoke(*args)
    assert code == 2 and "No space left on device" in output, output
    assert writes == [0, 1, 2]  # nothing after the failed item, in either batch
    assert len((out / "manifest-00000.jsonl").read_text().splitlines()) == 2

    monkeypatch.undo()
    code, output = invoke(*args)
    assert code == 0 and f"{TOTAL - 2} generated, 2 already there" in output, output
    assert snapshot(out) == reference[1]
