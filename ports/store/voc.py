"""The VOC-layout dataset writer: what mmsegmentation, detectron2 (custom registration) and every
peer read with no glue.

::

    <out>/JPEGImages/<id>.jpg                 the image (JPEG, quality 95)
    <out>/SegmentationClass/<id>.png          the label map: palette PNG, 0 background,
                                              1..K classes, 255 ignore, PASCAL VOC colours
    <out>/SoftMasks/<id>.npz                  optional: per-class soft masks, float16,
                                              low resolution
    <out>/ImageSets/Segmentation/{train,val,trainval}.txt  ids by split, in global-index order
                                              (written by the merge)
    <out>/id2label.json                       {"0": "background", "1": "cat", ...}
    <out>/manifest-<process>.jsonl            one line per finished item (see ports.store.records)

``<id>`` is ``ports.store.records.item_id(global_index)`` (``00000012``). An item's files are
each written atomically, then its manifest line is appended: a line implies complete files. The
encoders here (:func:`encode_jpeg`, :func:`encode_label_png`, :func:`encode_soft_masks`) are
deterministic: the same arrays give the same bytes, which is what makes a resumed run
byte-identical to an uninterrupted one.
"""

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from jaxmask.labels import IGNORE
from jaxmask.labels import VOC_PALETTE as _CORE_PALETTE
from ports.scale.hosts import owner
from ports.store import atomic
from ports.store.records import (
    ManifestWriter,
    clean_temps,
    is_filtered,
    manifest_name,
    parse_item_id,
    prepare_record,
    skipped_record,
)

IMAGES = "JPEGImages"
LABELS = "SegmentationClass"
SOFT_MASKS = "SoftMasks"
SPLITS = Path("ImageSets") / "Segmentation"
#: The split lists the merge writes; a record's ``split`` ("train" or "val", default "train")
#: puts it in one of the first two, and every item is in ``trainval``.
SPLIT_NAMES = ("train", "val", "trainval")
ID2LABEL = "id2label.json"


#: (256, 3) uint8: the colour of each label value in the PNGs (the core's VOC palette).
VOC_PALETTE = np.asarray(_CORE_PALETTE, np.uint8)


# ---------------------------------------------------------------------------------------------
# Encoders (shared with the WebDataset writer)


def check_image(image) -> np.ndarray:
    """``image`` as a uint8 (h, w, 3) array, or a ValueError saying what was expected."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"image must be uint8 with shape (h, w, 3), got {image.dtype} {image.shape}; "
            "convert with np.clip(np.round(x * 255), 0, 255).astype(np.uint8)"
        )
    return image


def check_label_map(label_map, valid: np.ndarray) -> np.ndarray:
    """``label_map`` as uint8 (h, w), checking its values against the boolean table ``valid``."""
    label_map = np.asarray(label_map)
    if label_map.ndim != 2 or label_map.dtype.kind not in "iu":
        raise ValueError(
            f"label_map must be an integer array with shape (h, w), got {label_map.dtype} "
            f"{label_map.shape}"
        )
    bad = np.unique(label_map[(label_map < 0) | (label_map > 255)])
    if bad.size == 0:
        values = label_map.astype(np.uint8)
        bad = np.unique(values[~valid[values]])
    if bad.size:
        allowed = np.flatnonzero(valid).tolist()
        raise ValueError(f"label_map holds {bad.tolist()[:8]}, not class ids {allowed}")
    return label_map.astype(np.uint8)


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes of a uint8 (h, w, 3) image."""
    buffer = io.BytesIO()
    Image.fromarray(image, "RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def encode_label_png(label_map: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (h, w) label map, palette mode with :data:`VOC_PALETTE`."""
    h, w = label_map.shape
    picture = Image.frombytes("P", (w, h), np.ascontiguousarray(label_map).tobytes())
    picture.putpalette(VOC_PALETTE.tobytes())
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_npz(key: str, array: np.ndarray) -> bytes:
    """Compressed ``.npz`` bytes holding ``array`` under ``key``.

    ``np.savez_compressed`` stamps the current time into the zip; this writes the same archive
    with a fixed timestamp, so equal arrays give equal bytes. ``np.load`` reads it.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        member = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
        member.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(member, "w") as stream:
            np.lib.format.write_array(stream, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def encode_soft_masks(soft_masks) -> bytes:
    """``.npz`` bytes holding ``soft_masks`` (k, r, r) as float16 under the key ``soft_masks``
    (deterministic: see :func:`encode_npz`)."""
    soft_masks = np.asarray(soft_masks)
    if soft_masks.ndim != 3 or soft_masks.dtype.kind != "f":
        raise ValueError(
            f"soft_masks must be float (k, r, r), got {soft_masks.dtype} {soft_masks.shape}"
        )
    if not np.all(np.isfinite(soft_masks)):
        raise ValueError("soft_masks holds NaN or infinity")
    return encode_npz("soft_masks", soft_masks.astype(np.float16))


def file_entry(path: str, data: bytes) -> dict:
    """A record's ``files`` entry: path (relative to the dataset, or member name), size, sha256."""
    return {"path": path, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def check_id2label(id2label: Mapping[int, str]) -> dict[int, str]:
    """``id2label`` with int keys in [0, 254] and str names, or a ValueError."""
    checked = {}
    for key, name in dict(id2label).items():
        class_id = int(key)
        if not 0 <= class_id < IGNORE or not isinstance(name, str):
            raise ValueError(f"id2label must map ids 0..254 to names, got {key!r}: {name!r}")
        checked[class_id] = name
    if not checked:
        raise ValueError("id2label is empty")
    return dict(sorted(checked.items()))


def valid_labels(id2label: Mapping[int, str]) -> np.ndarray:
    """A (256,) boolean table: True for the class ids and the ignore index."""
    valid = np.zeros(256, bool)
    valid[list(id2label)] = True
    valid[IGNORE] = True
    return valid


def write_id2label(out: Path, id2label: Mapping[int, str]) -> None:
    """Write ``id2label.json`` atomically, unless it already holds the same mapping."""
    text = json.dumps({str(k): v for k, v in id2label.items()}, indent=2, ensure_ascii=False) + "\n"
    path = out / ID2LABEL
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    except OSError as exc:
        raise atomic.explain(exc, path, "read") from exc
    atomic.write_text(path, text)


def item_payload(
    global_index: int,
    image,
    label_map,
    record: Mapping,
    soft_masks,
    valid: np.ndarray,
    jpeg_quality: int,
) -> tuple[dict, dict[str, tuple[str, bytes]]]:
    """Check an item and encode it: the prepared record and ``{role: (file name, bytes)}``."""
    if isinstance(global_index, bool) or not isinstance(global_index, (int, np.integer)):
        raise TypeError(f"global_index must be an int, got {global_index!r}")
    global_index = int(global_index)
    if global_index < 0:
        raise ValueError(f"global_index must be >= 0, got {global_index}")
    record = prepare_record(record, global_index)
    image = check_image(image)
    label_map = check_label_map(label_map, valid)
    if image.shape[:2] != label_map.shape:
        raise ValueError(f"image {image.shape[:2]} and label_map {label_map.shape} differ in size")
    name = record["id"]
    payload = {
        "image": (f"{name}.jpg", encode_jpeg(image, jpeg_quality)),
        "label": (f"{name}.png", encode_label_png(label_map)),
    }
    if soft_masks is not None:
        count = np.shape(soft_masks)[0] if np.ndim(soft_masks) else None
        if count != len(record["classes"]):
            raise ValueError(
                f"soft_masks has {count} maps but the record names {len(record['classes'])} "
                "classes; give one map per entry of record['classes'], in that order"
            )
        payload["soft_masks"] = (f"{name}.npz", encode_soft_masks(soft_masks))
    return record, payload


# ---------------------------------------------------------------------------------------------
# The writers


class ItemWriter:
    """What the writers of both formats share: the checked ``id2label`` (written by process 0),
    this process's manifest, and the lines of items a quality filter dropped.

    A subclass names in ``folders`` what to create before anything is written and adds
    ``write(global_index, image, label_map, record, soft_masks=None) -> str``.
    """

    folders: tuple[str, ...] = ()

    def __init__(
        self,
        out: str | os.PathLike,
        id2label: Mapping[int, str],
        *,
        process_index: int = 0,
        jpeg_quality: int = 95,
    ):
        self.out = Path(out)
        self.id2label = check_id2label(id2label)
        self.process_index = process_index
        self.jpeg_quality = int(jpeg_quality)
        self._valid = valid_labels(self.id2label)
        for folder in self.folders:
            atomic.make_folder(self.out / folder)
        if process_index == 0:
            write_id2label(self.out, self.id2label)
        self._manifest = ManifestWriter(self.out / manifest_name(process_index))

    def skip(self, global_index: int, record: Mapping, reason: str) -> str:
        """Record an item a quality filter dropped: its manifest line with ``reason``, no files
        (written at once: in WebDataset it waits for no shard)."""
        record = skipped_record(record, int(global_index), reason)
        self._manifest.append([record])
        return record["id"]

    def close(self) -> None:
        self._manifest.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class VocWriter(ItemWriter):
    """Writes items into a VOC-layout folder for one process.

    Use after ``ports.store.open_dataset`` (which creates or resumes the folder), for the global
    indices ``Dataset.todo(total)`` returns; call ``ports.store.merge_manifests`` on process 0 once
    every process is done.

    >>> with VocWriter(out, {0: "background", 1: "cat"}) as writer:     # doctest: +SKIP
    ...     writer.write(7, image, label_map, record)
    '00000007'
    """

    folders = (IMAGES, LABELS)

    def write(self, global_index: int, image, label_map, record: Mapping, soft_masks=None) -> str:
        """Write one item: image, label map, optional soft masks, then its manifest line.

        Args:
          global_index: the item's index in the whole dataset (decides its id and key).
          image: uint8 (h, w, 3).
          label_map: integer (h, w): ids of ``id2label`` or 255.
          record: the manifest record (``ports.store.REQUIRED_KEYS``); ``id``, ``global_index`` and
            ``files`` are added here.
          soft_masks: optional float (k, r, r), one map per ``record["classes"]`` entry, stored
            float16; pass a low resolution (64 or 128), not the image size.

        Returns:
          The item id.

        Raises:
          ValueError: a bad array or record (nothing is written).
          StoreError: a file could not be written; the item's files are removed, so nothing is
            left half-written and the item is redone on resume.
        """
        record, payload = item_payload(
            global_index, image, label_map, record, soft_masks, self._valid, self.jpeg_quality
        )
        folders = {"image": IMAGES, "label": LABELS, "soft_masks": SOFT_MASKS}
        files, written = {}, []
        try:
            for role, (name, data) in payload.items():
                relative = f"{folders[role]}/{name}"
                if role == "soft_masks":
                    atomic.make_folder(self.out / SOFT_MASKS)
                atomic.write_bytes(self.out / relative, data)
                written.append(self.out / relative)
                files[role] = file_entry(relative, data)
            record["files"] = files
            self._manifest.append([record])
        except BaseException:
            for path in written:
                atomic.remove_quietly(path)
            raise
        return record["id"]


# ---------------------------------------------------------------------------------------------
# Resume, merge and verify hooks (``ports.store.formats``)


def problems(out: Path, records: list[dict]) -> list[str | None]:
    """For each record, what is wrong with the files it lists (None: every file is there with the
    recorded size and sha256). Reads every file: about 1 s per 10k items of 512 px."""
    found = []
    for record in records:
        files = record.get("files")
        if is_filtered(record) and files == {}:
            found.append(None)  # dropped by a quality filter: no files to check
            continue
        if not isinstance(files, dict) or not files:
            found.append("the record lists no files")
            continue
        problem = None
        for entry in files.values():
            try:
                path = entry["path"]
                data = (out / path).read_bytes()
            except FileNotFoundError:
                problem = f"{path} is missing"
            except (OSError, KeyError, TypeError) as exc:
                problem = f"a file entry cannot be read ({exc})"
            else:
                if len(data) != entry.get("bytes"):
                    problem = (
                        f"{path} has {len(data)} bytes, the manifest says {entry.get('bytes')}"
                    )
                elif hashlib.sha256(data).hexdigest() != entry.get("sha256"):
                    problem = f"{path} differs from what was written (sha256 mismatch)"
            if problem:
                break
        found.append(problem)
    return found


def complete(out: Path, records: list[dict]) -> list[bool]:
    """For each record, whether every file it lists is there as written (see :func:`problems`)."""
    return [p is None for p in problems(out, records)]


def clean(out: Path, finished: Mapping[int, dict], process_index: int, process_count: int) -> None:
    """Delete, among the items this process owns, temporary files and files no finished record
    lists; and the temporary files of shared files this process owns."""
    expected = {e["path"] for r in finished.values() for e in r["files"].values()}
    for folder in (IMAGES, LABELS, SOFT_MASKS):
        if not (out / folder).is_dir():
            continue
        clean_temps(out / folder, process_index, process_count)
        for entry in (out / folder).iterdir():
            index = parse_item_id(entry.name)
            if index is None or atomic.is_temp(entry.name) or not entry.is_file():
                continue
            mine = owner(index, process_count) == process_index
            if mine and f"{folder}/{entry.name}" not in expected:
                atomic.remove_quietly(entry)
    clean_temps(out, process_index, process_count)
    clean_temps(out / SPLITS, process_index, process_count)


def finalize(out: Path, merged: list[dict]) -> None:
    """Write ``ImageSets/Segmentation/{train,val,trainval}.txt``: the merged ids by their
    record's ``split`` (``val.txt`` is empty when no item has one), one a line, in order, as
    torchvision's ``VOCSegmentation`` and mmsegmentation read them."""
    atomic.make_folder(out / SPLITS)
    for name in SPLIT_NAMES:
        kept = [r for r in merged if not is_filtered(r)]
        ids = [r["id"] for r in kept if name == "trainval" or r.get("split", "train") == name]
        atomic.write_text(out / SPLITS / f"{name}.txt", "".join(f"{i}\n" for i in ids))
