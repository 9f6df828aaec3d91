"""One writer per dataset folder: a lock file holding the writer's pid and host.

``jaxmask.lock`` is made atomically with its content (written to a temporary file, then
``os.link``-ed to the lock's name, which fails if the name exists), so a reader never sees an empty
lock. A lock whose holder is gone (same host, pid no longer running) is stale: the next run
takes it over. A lock held from another host cannot be checked from here; the message names the
host and the file to delete once that run is known to be gone.

In a multi-host run process 0 holds the lock for the whole folder; every other process learns
the outcome through ``agree`` (``ports.scale.hosts.agree``) so that all refuse together.
"""

import contextlib
import errno
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ports.store import atomic
from ports.store.atomic import StoreError

LOCK = "jaxmask.lock"


def holder(out: str | os.PathLike) -> dict | None:
    """The lock's content (``pid``, ``host``, ``started``), or None when ``out`` is not locked."""
    try:
        text = (Path(out) / LOCK).read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    return data if isinstance(data, dict) else {"pid": None, "host": None, "started": None}


def _alive(info: dict) -> bool:
    """Whether the holder may still be running (always True for another host's process)."""
    if info.get("host") != socket.gethostname():
        return info.get("host") is not None
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():  # a lock left by an earlier run in this very process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # running, under another user
        return True
    return True


def _refusal(out: Path, info: dict) -> StoreError:
    where = f"pid {info.get('pid')} on {info.get('host')}"
    since = info.get("started")
    since = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else ""
    return StoreError(
        errno.EBUSY,
        f"{out} is being written by another jaxmask run ({where}{since}). Wait for it to finish, "
        f"or stop it; if that run is gone, delete {out / LOCK} and run again.",
        out,
    )


def check(out: str | os.PathLike) -> None:
    """Raise if a live run holds ``out``'s lock (a cheap look before loading a model)."""
    info = holder(out)
    if info is not None and _alive(info):
        raise _refusal(Path(out), info)


def acquire(out: str | os.PathLike) -> None:
    """Take ``out``'s lock (the folder must exist), taking over a stale one.

    Raises:
      StoreError: a live run holds it (the message names its pid and host).
    """
    out = Path(out)
    path = out / LOCK
    content = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
    for _ in range(3):
        tmp = atomic.temp_name(path)
        try:
            tmp.write_text(content + "\n", encoding="utf-8")
            os.link(tmp, path)
            return
        except FileExistsError:
            pass
        except FileNotFoundError:  # our temporary file was tidied by the holder: look again
            continue
        except OSError as exc:
            raise atomic.explain(exc, path) from exc
        finally:
            atomic.remove_quietly(tmp)
        info = holder(out)
        if info is not None and _alive(info):
            raise _refusal(out, info)
        # Stale: move it aside under a unique name first, so two runs recovering it at once
        # cannot both delete a fresh lock that one of them has just taken.
        aside = atomic.temp_name(path)
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, aside)
            atomic.remove_quietly(aside)
    raise StoreError(errno.EBUSY, f"could not take {path}: another run keeps taking it", out)


def release(out: str | os.PathLike) -> None:
    """Drop ``out``'s lock if this process holds it."""
    info = holder(out)
    if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        atomic.remove_quietly(Path(out) / LOCK)


@contextlib.contextmanager
def hold(
    out: str | os.PathLike,
    process_index: int = 0,
    agree: Callable[[bool], bool] | None = None,
) -> Iterator[None]:
    """Create ``out`` if needed and hold its lock for the block (process 0 takes it).

    ``agree(ok)`` is every process's view of process 0's outcome (a no-op with one process): when
    process 0 is refused, the others raise too instead of waiting for it at a barrier.
    """
    out = Path(out)
    error = None
    if process_index == 0:
        try:
            atomic.make_folder(out)
            acquire(out)
        except StoreError as exc:
            error = exc
    ok = error is None
    if agree is not None:
        ok = agree(ok)
    if error is not None:
        raise error
    if not ok:
        raise StoreError(errno.EBUSY, f"process 0 could not lock {out}; see its message", out)
    try:
        yield
    finally:
        if process_index == 0:
            release(out)
