"""Atomic file writes: a reader (or a resumed run) sees either the old file or the whole new one.

A write goes to a temporary name in the destination's own folder (so the final ``os.replace`` is a
rename within one file system, which POSIX makes atomic), is flushed with ``fsync``, then renamed
over the destination; the folder is fsynced so the rename survives a power cut. If anything fails (a
full disk, a read-only or missing folder), the temporary file is removed and a :class:`StoreError`
says which path failed and what to do.

Temporary names are ``.<name>.<pid>-<random>.jaxmask-tmp``: hidden, unique per writer, and
recognisable by :func:`is_temp` so that a resumed run can delete the ones a killed run left behind.
"""

import errno
import os
import secrets
from pathlib import Path

TEMP_SUFFIX = ".jaxmask-tmp"

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_PERMISSION = (errno.EACCES, errno.EPERM, errno.EROFS)
_NO_FOLDER = (errno.ENOENT, errno.ENOTDIR)


class StoreError(OSError):
    """A dataset file could not be written or read back; the message names the path and a remedy.

    ``errno`` is the underlying error number and ``path`` the file or folder concerned.
    """

    def __init__(self, code: int | None, message: str, path: str | os.PathLike):
        super().__init__(code, message)
        self.path = Path(path)

    def __str__(self) -> str:
        return self.strerror


def explain(exc: OSError, path: str | os.PathLike, doing: str = "write") -> StoreError:
    """A :class:`StoreError` for ``exc`` raised while ``doing`` something to ``path``.

    The message names the path and says what to do: free space for a full disk, choose a writable
    output folder for a permission or read-only error, fix the path when a parent is missing or is a
    file.
    """
    path = Path(path)
    code = exc.errno
    reason = exc.strerror or str(exc)
    if code in _NO_SPACE:
        advice = (
            "the disk (or quota) is full. Free some space or choose an output folder on another "
            "disk, then run the same command again: finished items are kept and the run resumes"
        )
    elif code in _NO_PERMISSION:
        advice = (
            "the folder is not writable (permission denied or read-only file system). Choose a "
            "writable output folder or fix its permissions"
        )
    elif code in _NO_FOLDER:
        advice = (
            "a parent of this path is missing or is a regular file, not a folder. Choose an output "
            "folder whose parents are folders"
        )
    else:
        advice = "check the output folder and run the same command again"
    return StoreError(code, f"cannot {doing} {path}: {reason}; {advice}.", path)


def temp_name(path: str | os.PathLike) -> Path:
    """A fresh temporary name next to ``path`` (same folder, so the rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


def is_temp(name: str | os.PathLike) -> bool:
    """Whether ``name`` is a temporary name made by :func:`temp_name`."""
    name = Path(name).name
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def target_of_temp(name: str | os.PathLike) -> str:
    """The destination basename a temporary name was made for
    (``.a.jpg.1-ff.jaxmask-tmp`` -> ``a.jpg``)."""
    stem = Path(name).name[1 : -len(TEMP_SUFFIX)]
    return stem.rsplit(".", 1)[0]


def fsync_folder(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename or an unlink) to disk; a no-op where
    folders can't be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until every byte is written (a short write is retried, an error raised)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, rename.

    Raises:
      StoreError: the folder is missing, not writable, or the disk is full. No temporary file is
        left behind and an existing ``path`` is untouched.
    """
    path = Path(path)
    temp = temp_name(path)
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise explain(exc, path) from exc
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except OSError as exc:
        remove_quietly(temp)
        raise explain(exc, path) from exc
    except BaseException:
        remove_quietly(temp)
        raise
    fsync_folder(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`write_bytes` of ``text`` encoded as UTF-8."""
    write_bytes(path, text.encode("utf-8"))


def remove_quietly(path: str | os.PathLike) -> None:
    """Remove a file if it exists; never raises (used on error paths)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def make_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and parents) or raise a :class:`StoreError` saying why it can't be."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:  # the path (or a parent) is a regular file
        raise explain(OSError(errno.ENOTDIR, "not a folder"), folder, "create folder") from exc
    except OSError as exc:
        raise explain(exc, folder, "create folder") from exc
    return folder


def check_writable(folder: str | os.PathLike) -> None:
    """Create and remove a temporary file in ``folder``; raise a :class:`StoreError` if it fails.

    A real write is the only reliable test: ``os.access`` says yes to root on a folder that is
    mode 0o500, and knows nothing of read-only mounts or full disks' reserved blocks.
    """
    probe = temp_name(Path(folder) / "probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise explain(exc, folder, "write to folder") from exc
    os.close(fd)
    remove_quietly(probe)
