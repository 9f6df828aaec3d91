"""The WebDataset writer: tar shards for training at scale, one series of shards per process.

::

    <out>/shard-<process:05d>-<k:05d>.tar     members <id>.jpg, <id>.png (palette, as in VOC),
                                              <id>.label.npz (the class ids as a uint8 array under
                                              "label", what webdataset's decoders give back
                                              unchanged), <id>.json (the record), and <id>.npz
                                              when soft masks are kept
    <out>/id2label.json
    <out>/manifest-<process>.jsonl            one line per item, naming its shard

Files sharing a basename form a sample (the WebDataset convention), so ``webdataset.WebDataset``
or any tar reader consumes the shards as they are. Only Python's ``tarfile`` is used.

A shard is written to a temporary name and renamed to its final name when it holds ``maxcount``
items (or ``maxsize`` bytes, or the writer closes); only then are its items' manifest lines
appended. A shard counts as complete when the ids of its members equal the ids of the manifest
lines naming it; a resumed run deletes incomplete shards and makes their items again. Members carry
fixed metadata (mtime 0, uid 0, mode 0o644), so equal items give byte-equal shards.
"""

import hashlib
import io
import os
import tarfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ports.store import atomic, voc
from ports.store.records import (
    SHARD_PATTERN,
    clean_temps,
    encode_record,
    file_owner,
    is_filtered,
)

#: The member key of the class-id label map: ``sample["label.npz"]["label"]`` after
#: ``webdataset.WebDataset(urls).decode(...)`` with any stock decoder.
LABEL_IDS = "label.npz"


def shard_name(process_index: int, number: int) -> str:
    """``shard_name(1, 3) == "shard-00001-00003.tar"``."""
    return f"shard-{process_index:05d}-{number:05d}.tar"


class _FdFile:
    """The little of a binary file that ``tarfile`` needs, writing through ``atomic.write_all``."""

    def __init__(self, fd: int):
        self.fd = fd
        self.position = 0

    def write(self, data) -> int:
        atomic.write_all(self.fd, data)
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position


class ShardWriter(voc.ItemWriter):
    """Writes items into WebDataset tar shards for one process.

    Use after ``ports.store.open_dataset`` (``run_config["format"] == "webdataset"``), for the
    global indices ``Dataset.todo(total)`` returns; ``close`` finalizes the last, partial shard.
    New shards are numbered after the highest existing one of this process.

    Args:
      out: the dataset folder.
      id2label: class ids to names (ids 0..254).
      process_index: this process; names its shards and manifest.
      maxcount: items per shard.
      maxsize: optional bytes per shard; a shard is closed once it reaches this size.
      jpeg_quality: JPEG quality of the images.
    """

    folders = ("",)  # the dataset folder itself: the shards lie at its top

    def __init__(
        self,
        out: str | os.PathLike,
        id2label: Mapping[int, str],
        *,
        process_index: int = 0,
        maxcount: int = 1000,
        maxsize: int | None = None,
        jpeg_quality: int = 95,
    ):
        if maxcount < 1:
            raise ValueError(f"maxcount must be >= 1, got {maxcount}")
        super().__init__(out, id2label, process_index=process_index, jpeg_quality=jpeg_quality)
        self.maxcount = maxcount
        self.maxsize = maxsize
        numbers = [
            int(m.group(2))
            for m in map(SHARD_PATTERN.fullmatch, os.listdir(self.out))
            if m and int(m.group(1)) == process_index
        ]
        self._next = max(numbers, default=-1) + 1
        self._tar: tarfile.TarFile | None = None
        self._fd: int | None = None
        self._temp: Path | None = None
        self._pending: list[dict] = []

    def _open_shard(self) -> None:
        self._name = shard_name(self.process_index, self._next)
        self._temp = atomic.temp_name(self.out / self._name)
        try:
            self._fd = os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            self._tar = tarfile.TarFile(
                fileobj=_FdFile(self._fd), mode="w", format=tarfile.USTAR_FORMAT
            )
        except OSError as exc:
            self._abandon()
            raise atomic.explain(exc, self.out / self._name) from exc

    def _abandon(self) -> None:
        """Drop the shard being written (after an error): close and remove its temporary file."""
        if self._fd is not None:
            os.close(self._fd)
        if self._temp is not None:
            atomic.remove_quietly(self._temp)
        self._tar, self._fd, self._temp, self._pending = None, None, None, []

    def _add(self, name: str, data: bytes) -> None:
        member = tarfile.TarInfo(name)
        member.size = len(data)
        member.mtime = 0
        member.mode = 0o644
        member.uid = member.gid = 0
        member.uname = member.gname = ""
        self._tar.addfile(member, io.BytesIO(data))

    def write(self, global_index: int, image, label_map, record: Mapping, soft_masks=None) -> str:
        """Add one item to the current shard; finalize the shard when it is full.

        Arguments as ``VocWriter.write``. The item's manifest line is written when its shard is
        finalized, so an item counts as finished only once its shard is complete.

        Raises:
          ValueError: a bad array or record (nothing is written).
          StoreError: the shard could not be written; the unfinished shard is removed (its items are
            made again on resume) and the writer starts a new shard on the next call.
        """
        record, payload = voc.item_payload(
            global_index, image, label_map, record, soft_masks, self._valid, self.jpeg_quality
        )
        # Every stock webdataset image decoder turns the palette PNG into colours or luminance;
        # its npz decoder gives this array back as it is: the class ids.
        payload["label_ids"] = (
            f"{record['id']}.{LABEL_IDS}",
            voc.encode_npz("label", np.asarray(label_map, np.uint8)),
        )
        if self._tar is None:
            self._open_shard()
        record["shard"] = self._name
        record["files"] = {role: voc.file_entry(n, d) for role, (n, d) in payload.items()}
        try:
            for name, data in payload.values():
                self._add(name, data)
            self._add(f"{record['id']}.json", encode_record(record))
        except OSError as exc:
            path = self.out / self._name
            self._abandon()
            raise atomic.explain(exc, path) from exc
        except BaseException:
            self._abandon()
            raise
        self._pending.append(record)
        full = len(self._pending) >= self.maxcount
        if full or (self.maxsize is not None and self._tar.fileobj.tell() >= self.maxsize):
            self.flush()
        return record["id"]

    def flush(self) -> None:
        """Finalize the current shard (if it holds items): close the tar, fsync, rename, then append
        its items' manifest lines."""
        if self._tar is None:
            return
        final = self.out / self._name
        try:
            self._tar.close()
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.replace(self._temp, final)
        except OSError as exc:
            self._abandon()
            raise atomic.explain(exc, final) from exc
        atomic.fsync_folder(self.out)
        pending = self._pending
        self._tar, self._temp, self._pending = None, None, []
        self._next += 1
        self._manifest.append(pending)

    def close(self) -> None:
        """Finalize the last shard and close the manifest."""
        try:
            self.flush()
        finally:
            self._manifest.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc_info):
        if exc_type is None:
            self.close()
        else:  # an error mid-run: leave the partial shard out, keep what is finished
            self._abandon()
            self._manifest.close()


# ---------------------------------------------------------------------------------------------
# Resume, merge and verify hooks (``ports.store.formats``)


def _members(record: dict) -> set[str]:
    files = record.get("files") or {}
    return {entry["path"] for entry in files.values()} | {f"{record['id']}.json"}


def _tar_digests(path: Path) -> dict[str, tuple[int, str]] | None:
    """Each member's (size, sha256), or None when the shard is missing or not a readable tar."""
    try:
        with tarfile.open(path, mode="r:") as archive:
            digests = {}
            for member in archive:
                data = archive.extractfile(member).read() if member.isfile() else b""
                digests[member.name] = (len(data), hashlib.sha256(data).hexdigest())
            return digests
    except (OSError, tarfile.TarError, EOFError):
        return None


def problems(out: Path, records: list[dict]) -> list[str | None]:
    """For each record, what is wrong with its shard (None: the shard holds exactly the members of
    the records naming it, and this record's files with the recorded size and sha256). A record
    is only as good as its shard: one damaged member makes its shard's items be made again."""
    expected: dict[str, set[str]] = {}
    for record in records:
        shard = record.get("shard")
        if isinstance(shard, str) and SHARD_PATTERN.fullmatch(shard):
            expected.setdefault(shard, set()).update(_members(record))
    digests = {shard: _tar_digests(out / shard) for shard in expected}
    found: list[str | None] = []
    for record in records:
        shard = record.get("shard")
        if is_filtered(record) and "shard" not in record:
            found.append(None)  # dropped by a quality filter: in no shard
            continue
        if shard not in expected:
            found.append(f"the record names no valid shard ({shard!r})")
            continue
        members = digests[shard]
        if members is None:
            found.append(f"{shard} is missing or not a readable tar file")
            continue
        if set(members) != expected[shard]:
            extra = sorted(set(members) ^ expected[shard])[:3]
            found.append(f"{shard} does not hold exactly its items' members ({', '.join(extra)})")
            continue
        bad = [
            entry["path"]
            for entry in (record.get("files") or {}).values()
            if members.get(entry.get("path")) != (entry.get("bytes"), entry.get("sha256"))
        ]
        found.append(f"{shard}: {bad[0]} differs from what was written" if bad else None)
    # A shard with one bad item is incomplete for all of its items.
    damaged = {r.get("shard") for r, p in zip(records, found, strict=True) if p is not None}
    return [
        p
        if p is not None or "shard" not in r or r["shard"] not in damaged
        else f"{r['shard']} holds a damaged item"
        for r, p in zip(records, found, strict=True)
    ]


def complete(out: Path, records: list[dict]) -> list[bool]:
    """For each record, whether its shard is intact (see :func:`problems`)."""
    return [p is None for p in problems(out, records)]


def clean(out: Path, finished: Mapping[int, dict], process_index: int, process_count: int) -> None:
    """Delete the incomplete shards and the temporary files this process owns."""
    keep = {record["shard"] for record in finished.values() if "shard" in record}
    for entry in out.iterdir():
        match = SHARD_PATTERN.fullmatch(entry.name)
        if (
            match
            and entry.name not in keep
            and entry.is_file()
            and file_owner(int(match.group(1)), process_count) == process_index
        ):
            atomic.remove_quietly(entry)
    clean_temps(out, process_index, process_count)


def finalize(out: Path, merged: list[dict]) -> None:
    """Nothing to add: the shards are final as written."""
    del out, merged
