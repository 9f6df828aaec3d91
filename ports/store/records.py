"""Manifest records and the manifest files: what one finished item's line holds, and how lines
are written and read.

A dataset folder holds one ``manifest-{process_index:05d}.jsonl`` per process (one JSON object per
finished item, appended by the process that wrote it, fsynced line by line; an item's files are
written, atomically, *before* its line, so a line implies complete files), and, once every process
is done, ``manifest.jsonl``: every process's lines merged, ordered by ``global_index`` (see
``ports.store.dataset.merge_manifests``).

Record keys. The caller supplies :data:`REQUIRED_KEYS` (checked by :func:`validate_record`); the
writer adds ``id``, ``global_index`` and ``files`` (and ``shard`` for WebDataset). Records should be
a function of the global index only (no wall time, no process index) when the dataset is to be
byte-identical whatever the host count; extra keys are kept as given. :func:`mask_stats` and
:func:`software_versions` make two of the required values.

Also here: item ids and per-process file names, and which process tidies a leftover file.
"""

import importlib.metadata
import json
import os
import platform
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from jaxmask.labels import IGNORE
from ports.scale.hosts import owner
from ports.store import atomic
from ports.store.atomic import StoreError

MANIFEST = "manifest.jsonl"
#: A per-host manifest's name: ``manifest-<process>.jsonl`` (see :func:`manifest_name`).
MANIFEST_PATTERN = re.compile(r"manifest-(\d{5,})\.jsonl")
#: A WebDataset shard's name: ``shard-<process>-<number>.tar`` (see ``ports.store.webdataset``).
SHARD_PATTERN = re.compile(r"shard-(\d{5,})-(\d{5,})\.tar")

#: Keys every record must carry, with the type of each, and the keys of the nested objects.
REQUIRED_KEYS: dict[str, type | tuple[type, ...]] = {
    "prompt": str,
    "negative_prompt": str,
    "classes": list,  # [{"id": 1, "name": "cat", "token_positions": [2]}, ...]
    "seed": dict,  # {"rule": "fold_in(key(base_seed), global_index)", "value": 7}
    "method": dict,  # {"name": "seediff", "params": {...}}
    "model": dict,  # {"id": "...", "fingerprint": "sha256 of the weights"}
    "scheduler": str,
    "steps": int,
    "guidance": (int, float),
    "size": list,  # [h, w]
    "dtype": str,
    "mask_stats": dict,  # see mask_stats()
    "versions": dict,  # see software_versions()
}
NESTED_KEYS: dict[str, tuple[str, ...]] = {
    "classes": ("id", "name", "token_positions"),
    "seed": ("rule", "value"),
    "method": ("name", "params"),
    "model": ("id", "fingerprint"),
}
#: Keys the writers set; a caller's record may hold them only with the same value.
RESERVED_KEYS = ("id", "global_index", "files", "shard", "filtered")


def item_id(global_index: int) -> str:
    """The basename of an item's files: ``item_id(12) == "00000012"``."""
    return f"{global_index:08d}"


def parse_item_id(name: str) -> int | None:
    """The global index an item id (or a file name ``<id>.<ext>``) stands for, or None."""
    stem = name.split(".", 1)[0]
    return int(stem) if stem.isdigit() and len(stem) >= 8 else None


def manifest_name(process_index: int) -> str:
    """The per-host manifest's name: ``manifest_name(3) == "manifest-00003.jsonl"``."""
    return f"manifest-{process_index:05d}.jsonl"


def file_owner(process_of_file: int, process_count: int) -> int:
    """Which live process tidies a per-process file (a per-host manifest, a shard): its writer if
    that process still exists, else process 0 (the run was resumed with fewer processes)."""
    return process_of_file if process_of_file < process_count else 0


def temp_owner(target: str, process_count: int) -> int:
    """Which live process deletes a leftover temporary file, given the name it was written for:
    an item's file goes to the item's owner, a per-process file (manifest, shard) to
    :func:`file_owner`, a shared file (run config, ``train.txt``...) to process 0."""
    match = MANIFEST_PATTERN.fullmatch(target) or SHARD_PATTERN.fullmatch(target)
    if match:
        return file_owner(int(match.group(1)), process_count)
    index = parse_item_id(target)
    return 0 if index is None else owner(index, process_count)


def clean_temps(folder: Path, process_index: int, process_count: int) -> None:
    """Delete the temporary files in ``folder`` that this process owns (see :func:`temp_owner`)."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if atomic.is_temp(entry.name) and entry.is_file():
            target = atomic.target_of_temp(entry.name)
            if temp_owner(target, process_count) == process_index:
                atomic.remove_quietly(entry)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable: {value!r}")


def to_json(value) -> object:
    """``value`` as plain JSON data (tuples to lists, numpy scalars and arrays to Python)."""
    try:
        return json.loads(json.dumps(value, default=_json_default, allow_nan=False))
    except ValueError as exc:
        raise ValueError(f"not valid JSON data (NaN or infinity?): {exc}") from exc


def encode_record(record: Mapping) -> bytes:
    """One manifest line: compact JSON with sorted keys, UTF-8, ending in a newline."""
    text = json.dumps(
        record,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
        default=_json_default,
    )
    return (text + "\n").encode("utf-8")


def validate_record(record: Mapping) -> None:
    """Check that ``record`` has :data:`REQUIRED_KEYS` with the right types.

    Raises:
      ValueError: naming every missing or mistyped key.
    """
    if not isinstance(record, Mapping):
        raise TypeError(f"a manifest record must be a dict, got {type(record).__name__}")
    record = to_json(dict(record))
    problems = []
    for key, kind in REQUIRED_KEYS.items():
        if key not in record:
            problems.append(f"missing {key!r}")
            continue
        value = record[key]
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            expected = kind.__name__ if isinstance(kind, type) else "number"
            problems.append(f"{key!r} should be {expected}, got {type(value).__name__}")
            continue
        for sub in NESTED_KEYS.get(key, ()):
            items = value if key == "classes" else [value]
            for n, item in enumerate(items):
                where = f"{key}[{n}]" if key == "classes" else key
                if not isinstance(item, Mapping) or sub not in item:
                    problems.append(f"missing {where}.{sub}")
    if "size" in record and not problems:
        size = list(record["size"])
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            problems.append(f"'size' should be [h, w] positive ints, got {record['size']!r}")
    if problems:
        raise ValueError("manifest record is incomplete: " + "; ".join(problems))


def skipped_record(record: Mapping, global_index: int, reason: str) -> dict:
    """The manifest line of an item a quality filter dropped: its record, no files, the reason.

    It counts as finished (resume does not make it again) but names no file, so no split list,
    export or loader sees it."""
    if not isinstance(reason, str) or not reason:
        raise ValueError(f"a filtered item needs its reason as a string, got {reason!r}")
    record = prepare_record(record, global_index)
    record.update(files={}, filtered=reason)
    return record


def is_filtered(record: Mapping) -> bool:
    """Whether ``record`` is an item a quality filter dropped (see :func:`skipped_record`)."""
    return bool(record.get("filtered"))


def prepare_record(record: Mapping, global_index: int) -> dict:
    """A validated JSON copy of ``record`` with ``id`` and ``global_index`` set by the writer."""
    validate_record(record)
    record = to_json(dict(record))
    expected = {"id": item_id(global_index), "global_index": global_index}
    for key in RESERVED_KEYS:
        if key in record and record[key] != expected.get(key, object()):
            raise ValueError(f"record key {key!r} is set by the writer; leave it out of the record")
    record.update(expected)
    return record


def mask_stats(label_map, class_ids: Iterable[int], ignore_index: int = IGNORE) -> dict:
    """Pixel fractions of a label map, for the manifest.

    Returns ``{"fraction": {"<id>": f, ...}, "ignore": f}``, with background (0) included when it
    is in ``class_ids``; fractions rounded to 6 decimals.

    >>> mask_stats(np.array([[0, 1], [1, 255]]), [0, 1])
    {'fraction': {'0': 0.25, '1': 0.5}, 'ignore': 0.25}
    """
    label_map = np.asarray(label_map)
    total = max(label_map.size, 1)
    fraction = {str(int(c)): round(float(np.sum(label_map == c)) / total, 6) for c in class_ids}
    return {
        "fraction": fraction,
        "ignore": round(float(np.sum(label_map == ignore_index)) / total, 6),
    }


def software_versions() -> dict[str, str | None]:
    """Versions of Python and the packages that decide generated values (JAX's PRNG among them)."""
    names = ("jax", "jaxlib", "flax", "numpy", "pillow", "diffusers", "transformers", "jaxmask")
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# ---------------------------------------------------------------------------------------------
# Manifest files


class ManifestWriter:
    """Appends records to one manifest file, fsyncing after each call.

    A failed write (a full disk) truncates the file back to its previous length, so the file never
    ends in half a line written by a live process; only a killed process can leave a torn last line,
    and ``ports.store.dataset.open_dataset`` removes it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        except OSError as exc:
            raise atomic.explain(exc, self.path) from exc

    def append(self, records: Sequence[Mapping]) -> None:
        """Append ``records`` (already complete, with their files on disk) and fsync."""
        if self._fd is None:
            raise ValueError(f"manifest {self.path} is closed")
        data = b"".join(encode_record(r) for r in records)
        size = os.fstat(self._fd).st_size
        try:
            atomic.write_all(self._fd, data)
            os.fsync(self._fd)
        except OSError as exc:
            try:
                os.ftruncate(self._fd, size)
            except OSError:
                pass
            raise atomic.explain(exc, self.path) from exc

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def read_manifest(path: str | os.PathLike) -> tuple[list[dict], bool]:
    """The records of one manifest file, and whether it ends in a torn (unterminated) line.

    A torn last line (a process killed mid-append) is ignored. A damaged line elsewhere raises.

    Raises:
      StoreError: a complete line is not a JSON object.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], False
    except OSError as exc:
        raise atomic.explain(exc, path, "read") from exc
    lines = data.split(b"\n")
    torn = lines.pop() != b""
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("global_index"), int):
            raise StoreError(
                None,
                f"{path} line {number} is not a manifest record; the file was changed outside "
                "jaxmask. Delete that line (the item is made again on resume) and run again.",
                path,
            )
        records.append(record)
    return records, torn


def manifest_files(out: str | os.PathLike) -> list[tuple[Path, int | None]]:
    """The manifest files in ``out``: the merged one first (process None), then per host in
    order."""
    out = Path(out)
    found = [(out / MANIFEST, None)] if (out / MANIFEST).exists() else []
    per_host = []
    for entry in out.iterdir() if out.is_dir() else ():
        match = MANIFEST_PATTERN.fullmatch(entry.name)
        if match:
            per_host.append((entry, int(match.group(1))))
    return found + sorted(per_host, key=lambda item: item[1])
