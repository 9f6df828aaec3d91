"""The manifest, the run config and resume: what makes a dataset folder restartable and checkable.

A dataset folder holds

- ``jaxmask_run.json``: the run config, written once when the folder is created. It should hold
  what decides the *content* (model, method, seed, prompts, size, total, format), not how the work
  was spread (batch size, device or host count): the same items come out whatever those are.
- ``manifest-{process_index:05d}.jsonl``: one JSON object per finished item, appended by the
  process that wrote it, fsynced line by line. An item's files are written (atomically) *before* its
  line, so a line implies complete files.
- ``manifest.jsonl``: every process's lines merged, ordered by ``global_index``
  (:func:`merge_manifests`, run by process 0 once all processes are done).

:func:`open_dataset` creates a folder, refuses one made with another config (unless told to
overwrite), or resumes one made with the same config: it returns the finished global indices and
deletes what a killed run left half-done (temporary files, files without a manifest line, a torn
last manifest line).

Record keys. The caller supplies :data:`REQUIRED_KEYS` (checked by :func:`validate_record`); the
writer adds ``id``, ``global_index`` and ``files`` (and ``shard`` for WebDataset). Records should be
a function of the global index only (no wall time, no process index) when the dataset is to be
byte-identical whatever the host count; extra keys are kept as given.
"""

import dataclasses
import errno
import importlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ports.scale.hosts import global_indices, owner
from ports.store import atomic
from ports.errors import with_cli
from ports.store.atomic import StoreError
from ports.store.lock import LOCK

RUN_CONFIG = "jaxmask_run.json"
MANIFEST = "manifest.jsonl"
FORMATS = {"voc": "ports.store.voc", "webdataset": "ports.store.webdataset"}
DEFAULT_FORMAT = "voc"

_PER_HOST = re.compile(r"manifest-(\d{5,})\.jsonl")
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


# ---------------------------------------------------------------------------------------------
# Records


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
    match = _PER_HOST.fullmatch(target) or SHARD_PATTERN.fullmatch(target)
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


def mask_stats(label_map, class_ids: Iterable[int], ignore_index: int = 255) -> dict:
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
    and :func:`open_dataset` removes it.
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
    """The manifest files in ``out``: the merged one first (process None), then per host in order."""
    out = Path(out)
    found = [(out / MANIFEST, None)] if (out / MANIFEST).exists() else []
    per_host = []
    for entry in out.iterdir() if out.is_dir() else ():
        match = _PER_HOST.fullmatch(entry.name)
        if match:
            per_host.append((entry, int(match.group(1))))
    return found + sorted(per_host, key=lambda item: item[1])


# ---------------------------------------------------------------------------------------------
# Run config


def _normalize_config(run_config: Mapping) -> dict:
    if not isinstance(run_config, Mapping):
        raise TypeError(f"run_config must be a dict, got {type(run_config).__name__}")
    config = to_json(dict(run_config))
    fmt = config.setdefault("format", DEFAULT_FORMAT)
    if fmt not in FORMATS:
        raise ValueError(f"run_config['format'] is {fmt!r}; choose one of {sorted(FORMATS)}")
    return config


def read_run_config(out: str | os.PathLike) -> dict | None:
    """The run config stored in ``out``, or None where there is none."""
    path = Path(out) / RUN_CONFIG
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StoreError(
            getattr(exc, "errno", None),
            f"cannot read {path}: {exc}. Restore it, or choose another output folder.",
            path,
        ) from exc


def write_run_config(out: str | os.PathLike, run_config: Mapping) -> None:
    """Write ``jaxmask_run.json`` atomically (sorted keys, indented)."""
    text = json.dumps(run_config, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    atomic.write_text(Path(out) / RUN_CONFIG, text)


def _differences(old, new, prefix="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".") or "(whole config)"]


def _holds_only_temps(out: Path) -> bool:
    # The run config may appear while we look: process 0 creating the folder for everyone.
    return all(atomic.is_temp(e.name) or e.name in (RUN_CONFIG, LOCK) for e in out.iterdir())


def _content(config: Mapping) -> dict:
    """The run config less what names the weights without deciding them: the model as typed
    (``m``, ``./m/``, a moved checkout); its fingerprint stays."""
    config = json.loads(json.dumps(config))
    if isinstance(config.get("model"), dict):
        config["model"].pop("id", None)
    return config


def _wipe(out: Path) -> None:
    """Delete the files a jaxmask dataset is made of (and nothing else) from ``out``."""
    for name in ("JPEGImages", "SegmentationClass", "SoftMasks"):
        shutil.rmtree(out / name, ignore_errors=True)
    splits = out / "ImageSets" / "Segmentation"
    for path in [splits / f"{n}.txt" for n in ("train", "val", "trainval")] + [
        out / "id2label.json"
    ]:
        atomic.remove_quietly(path)
    for entry in out.iterdir():
        name = entry.name
        doomed = (
            name == MANIFEST
            or _PER_HOST.fullmatch(name)
            or (name.startswith("shard-") and name.endswith(".tar"))
            or atomic.is_temp(name)
        )
        if doomed and entry.is_file():
            atomic.remove_quietly(entry)
    atomic.fsync_folder(out)


# ---------------------------------------------------------------------------------------------
# Opening, resuming, merging


@dataclasses.dataclass(frozen=True)
class Dataset:
    """An opened dataset folder: where it is, its config, and which items are already finished.

    Attributes:
      out: the folder.
      run_config: the run config (as stored in ``jaxmask_run.json``).
      process_index, process_count: this process and how many write the dataset.
      done: global indices whose manifest line and files are all present (any process's).
      resumed: whether the folder held a dataset with the same config.
      damaged: global indices with a manifest line whose files were changed or lost since
        (size or sha256 differ): they are made again, like the items never finished.
    """

    out: Path
    run_config: dict
    process_index: int
    process_count: int
    done: frozenset[int]
    resumed: bool
    damaged: frozenset[int] = frozenset()

    @property
    def format(self) -> str:
        return self.run_config["format"]

    def todo(self, total: int) -> list[int]:
        """This process's share of ``range(total)`` (see ``ports.scale.hosts.global_indices``),
        less what is done, in increasing order."""
        share = global_indices(total, self.process_index, self.process_count)
        return [i for i in share if i not in self.done]

    def writer(self, id2label: Mapping[int, str], **options):
        """The writer for this dataset's format (``VocWriter`` or ``ShardWriter``) for this process;
        ``options`` go to its constructor (``jpeg_quality``, ``maxcount``...)."""
        module = importlib.import_module(FORMATS[self.format])
        return module.Writer(self.out, id2label, process_index=self.process_index, **options)

    def merge(self) -> list[dict]:
        """:func:`merge_manifests` for this folder (call on process 0 after all are done)."""
        return merge_manifests(self.out)


def _finished(records: list[dict], complete: Sequence[bool]) -> dict[int, dict]:
    """For each global index, the last of its records whose files are complete."""
    return {r["global_index"]: r for r, ok in zip(records, complete) if ok}


def _read_all(out: Path) -> tuple[list[dict], list[list[dict]], list[tuple[Path, int | None]]]:
    files = manifest_files(out)
    per_file = [read_manifest(path)[0] for path, _ in files]
    return [r for records in per_file for r in records], per_file, files


def open_dataset(
    out: str | os.PathLike,
    run_config: Mapping,
    overwrite: bool = False,
    *,
    process_index: int = 0,
    process_count: int = 1,
    barrier: Callable[[str], None] | None = None,
    extends: Callable[[dict, dict], bool] | None = None,
) -> Dataset:
    """Create, resume, extend or (when told to) overwrite the dataset folder ``out``.

    - a new or empty folder is created and ``jaxmask_run.json`` written;
    - a folder made with the same ``run_config`` is resumed: the returned ``Dataset.done`` holds the
      global indices with a manifest line and all their files, and this process deletes, among the
      items it owns, what a killed run left: temporary files, files without a manifest line, a
      torn last line in its own manifest;
    - a folder made with a config that ``extends`` accepts is resumed under the new config;
    - a folder made with another config raises unless ``overwrite`` (the CLI's ``--overwrite``),
      which deletes that dataset's files (only files a jaxmask dataset is made of) and starts again.

    With several processes, every process calls this with the same arguments and a ``barrier``
    (``ports.scale.hosts.barrier``): all check the folder, process 0 creates or wipes it, all wait,
    then each tidies the items it owns. Ownership follows ``ports.scale.hosts.global_indices``.

    Args:
      out: the dataset folder.
      run_config: JSON data deciding the content; ``format`` is ``"voc"`` (default) or
        ``"webdataset"``.
      overwrite: delete a dataset made with another (or the same) config and start again.
      process_index, process_count: this process and how many write the dataset.
      barrier: called with a name by every process; required when ``process_count > 1``.
      extends: ``extends(stored, run_config)`` says whether ``run_config`` keeps every item of a
        dataset made with ``stored`` and only adds items (more items per class): the folder is
        then resumed under the new config instead of refused.

    Raises:
      StoreError: ``out`` can't be created or written, or holds a dataset made with another config
        (and ``overwrite`` is False), or is a non-empty folder that is not a jaxmask dataset.
      ValueError: bad arguments.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must be in [0, {process_count})")
    if process_count > 1 and barrier is None:
        raise ValueError("with several processes pass barrier=ports.scale.hosts.barrier")
    config = _normalize_config(run_config)
    out = Path(out)
    atomic.make_folder(out)
    atomic.check_writable(out)

    stored = read_run_config(out)
    if stored is None:
        if not _holds_only_temps(out):
            raise StoreError(
                errno.EEXIST,
                f"{out} is not empty and holds no {RUN_CONFIG}, so it is not a jaxmask dataset; "
                "choose a new or empty output folder (jaxmask never deletes files it did not write).",
                out,
            )
        action = "create"
    elif _content(stored) == _content(config) and not overwrite:
        action, config = "resume", stored  # keeps the model as first typed
    elif overwrite:
        action = "overwrite"
    elif extends is not None and extends(stored, config):
        action = "extend"
        if isinstance(config.get("model"), dict) and isinstance(stored.get("model"), dict):
            config["model"]["id"] = stored["model"].get("id")  # as first typed
    else:
        changed = ", ".join(_differences(_content(stored), _content(config))[:8])
        text = (
            f"{out} holds a dataset made with a different run config (differs in: {changed}). "
            "Choose another output folder, or pass {} to delete that dataset's files and start "
            "again."
        )
        raise with_cli(
            StoreError(errno.EEXIST, text.format("overwrite=True"), out), text.format("--overwrite")
        )

    if process_index == 0:
        if action == "overwrite":
            _wipe(out)
        if action != "resume":
            write_run_config(out, config)
    if barrier is not None:
        barrier("jaxmask-store-open")

    fmt = importlib.import_module(FORMATS[config["format"]])
    records, per_file, files = _read_all(out)
    complete = fmt.complete(out, records)
    finished = _finished(records, complete)
    damaged = {r["global_index"] for r, ok in zip(records, complete) if not ok} - set(finished)
    fmt.clean(out, finished, process_index, process_count)
    start = 0
    for (path, process), file_records in zip(files, per_file):
        flags = complete[start : start + len(file_records)]
        start += len(file_records)
        if process == process_index:
            _rewrite_manifest(path, file_records, flags)
    return Dataset(
        out=out,
        run_config=config,
        process_index=process_index,
        process_count=process_count,
        done=frozenset(finished),
        resumed=action in ("resume", "extend"),
        damaged=frozenset(damaged),
    )


def _rewrite_manifest(path: Path, records: list[dict], complete: Sequence[bool]) -> None:
    """Keep the lines of ``path`` whose files are complete (the last line of each item, in file
    order) and drop a torn tail; rewritten atomically, and only when that changes the file."""
    last = {r["global_index"]: n for n, (r, ok) in enumerate(zip(records, complete)) if ok}
    data = b"".join(encode_record(records[n]) for n in sorted(last.values()))
    if path.read_bytes() != data:
        atomic.write_bytes(path, data)


def _format_module(out: Path):
    """The format module (``voc`` or ``webdataset``) of the dataset in ``out``."""
    config = read_run_config(out)
    if config is None:
        raise StoreError(
            errno.ENOENT, f"{out} holds no {RUN_CONFIG}: not a jaxmask dataset folder.", out
        )
    return importlib.import_module(FORMATS[config.get("format", DEFAULT_FORMAT)])


def merge_manifests(out: str | os.PathLike) -> list[dict]:
    """Merge every manifest in ``out`` into ``manifest.jsonl``, ordered by ``global_index``.

    Call on process 0 once every process has finished (after a barrier). Only items whose files
    are complete are kept (one record per global index: the last written); files left by a killed
    run are deleted; the format finishes its folder (VOC: ``ImageSets/Segmentation/train.txt``);
    the per-host manifests are removed once ``manifest.jsonl`` is in place. Running it again, or
    on a folder that was resumed after a merge, gives the same result.

    Returns:
      The merged records, in order.

    Raises:
      StoreError: ``out`` is not a jaxmask dataset, or can't be written.
    """
    out = Path(out)
    fmt = _format_module(out)
    records, _, files = _read_all(out)
    finished = _finished(records, fmt.complete(out, records))
    fmt.clean(out, finished, 0, 1)
    merged = [finished[index] for index in sorted(finished)]
    atomic.write_bytes(out / MANIFEST, b"".join(encode_record(r) for r in merged))
    fmt.finalize(out, merged)
    for path, process in files:
        if process is not None:
            atomic.remove_quietly(path)
    atomic.fsync_folder(out)
    return merged


@dataclasses.dataclass(frozen=True)
class Verification:
    """What :func:`verify` found.

    Attributes:
      items: global indices with a manifest line whose files are intact.
      problems: ``(item id, what is wrong)`` for each item whose files differ from what its
        manifest line records (lost, resized, or another sha256).
      merged: whether ``manifest.jsonl`` is the only manifest (the run finished and merged).
    """

    items: frozenset[int]
    problems: tuple[tuple[str, str], ...]
    merged: bool


def verify(out: str | os.PathLike) -> Verification:
    """Check every item of the dataset in ``out`` against its manifest line: each file's size and
    sha256 (VOC), or each shard's members (WebDataset). Reads every file; writes nothing.

    Raises:
      StoreError: ``out`` is not a jaxmask dataset, or a manifest line is not a record.
    """
    out = Path(out)
    fmt = _format_module(out)
    records, _, files = _read_all(out)
    found = fmt.problems(out, records)
    finished = _finished(records, [p is None for p in found])
    problems = {}
    for record, problem in zip(records, found):
        index = record["global_index"]
        if problem is not None and index not in finished:
            problems[index] = problem
    return Verification(
        items=frozenset(finished),
        problems=tuple((item_id(i), problems[i]) for i in sorted(problems)),
        merged=[process for _, process in files] == [None],
    )
