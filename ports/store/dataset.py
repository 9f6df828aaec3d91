"""A dataset folder: its run config, and opening (create, resume, extend, overwrite), merging and
verifying it. What makes a dataset folder restartable and checkable.

A dataset folder holds

- ``jaxmask_run.json``: the run config, written once when the folder is created. It should hold
  what decides the *content* (model, method, seed, prompts, size, total, format), not how the work
  was spread (batch size, device or host count): the same items come out whatever those are.
- the per-host manifests and, once merged, ``manifest.jsonl`` (see ``ports.store.records``);
- the files of the format the run config names (see ``ports.store.formats``).

:func:`open_dataset` creates a folder, refuses one made with another config (unless told to
overwrite), or resumes one made with the same config: it returns the finished global indices and
deletes what a killed run left half-done (temporary files, files without a manifest line, a torn
last manifest line). :func:`merge_manifests` merges the per-host manifests on process 0;
:func:`verify` checks every item's files against its manifest line.
"""

import dataclasses
import errno
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ports.errors import with_cli
from ports.scale.hosts import global_indices
from ports.store import atomic
from ports.store.atomic import StoreError
from ports.store.formats import DEFAULT_FORMAT, FORMATS, Format
from ports.store.lock import LOCK
from ports.store.records import (
    MANIFEST,
    MANIFEST_PATTERN,
    encode_record,
    item_id,
    manifest_files,
    read_manifest,
    to_json,
)

RUN_CONFIG = "jaxmask_run.json"


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
            or MANIFEST_PATTERN.fullmatch(name)
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
        return FORMATS[self.format].writer(
            self.out, id2label, process_index=self.process_index, **options
        )

    def merge(self) -> list[dict]:
        """:func:`merge_manifests` for this folder (call on process 0 after all are done)."""
        return merge_manifests(self.out)


def _finished(records: list[dict], complete: Sequence[bool]) -> dict[int, dict]:
    """For each global index, the last of its records whose files are complete."""
    return {r["global_index"]: r for r, ok in zip(records, complete, strict=True) if ok}


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
                "choose a new or empty output folder (jaxmask never deletes files it did not "
                "write).",
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

    fmt = FORMATS[config["format"]]
    records, per_file, files = _read_all(out)
    complete = fmt.complete(out, records)
    finished = _finished(records, complete)
    damaged = {r["global_index"] for r, ok in zip(records, complete, strict=True) if not ok}
    damaged -= set(finished)
    fmt.clean(out, finished, process_index, process_count)
    start = 0
    for (path, process), file_records in zip(files, per_file, strict=True):
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
    last = {
        r["global_index"]: n for n, (r, ok) in enumerate(zip(records, complete, strict=True)) if ok
    }
    data = b"".join(encode_record(records[n]) for n in sorted(last.values()))
    if path.read_bytes() != data:
        atomic.write_bytes(path, data)


def require_run_config(out: str | os.PathLike, voc_for: str | None = None) -> dict:
    """The run config of the jaxmask dataset in ``out``; refuses a folder without one.

    ``voc_for`` names a command that reads only the VOC layout (``"augment"``, ``"export"``):
    a dataset of another format is refused for it, with what to do instead.

    Raises:
      StoreError: ``out`` holds no run config, or not the VOC layout ``voc_for`` needs.
    """
    out = Path(out)
    config = read_run_config(out)
    if config is None:
        raise StoreError(
            errno.ENOENT,
            f"{out} holds no {RUN_CONFIG}: not a jaxmask dataset. Point at a folder written by "
            "jaxmask generate.",
            out,
        )
    if voc_for is not None and config.get("format", DEFAULT_FORMAT) != "voc":
        raise StoreError(
            None,
            f"{out} is a {config.get('format')!r} dataset; {voc_for} reads the VOC layout only. "
            "Generate it with --format voc.",
            out,
        )
    return config


def _format_of(out: Path) -> Format:
    """The :class:`~ports.store.formats.Format` of the dataset in ``out``."""
    return FORMATS[require_run_config(out).get("format", DEFAULT_FORMAT)]


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
    fmt = _format_of(out)
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
    fmt = _format_of(out)
    records, _, files = _read_all(out)
    found = fmt.problems(out, records)
    finished = _finished(records, [p is None for p in found])
    problems = {}
    for record, problem in zip(records, found, strict=True):
        index = record["global_index"]
        if problem is not None and index not in finished:
            problems[index] = problem
    return Verification(
        items=frozenset(finished),
        problems=tuple((item_id(i), problems[i]) for i in sorted(problems)),
        merged=[process for _, process in files] == [None],
    )
