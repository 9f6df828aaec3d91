"""JAX's persistent compilation cache for the commands: a second run of the same shapes loads the
compiled sampler from disk instead of recompiling it (tens of seconds on a CPU, ~40 s for SD on
a GPU)."""

import contextlib
import os
import secrets
from pathlib import Path

#: Where the commands keep compiled programs unless told otherwise (``--compilation-cache``).
DEFAULT = os.environ.get("JAXMASK_COMPILATION_CACHE", "~/.cache/jaxmask/xla")


def enable(folder: str | os.PathLike | None = DEFAULT) -> Path | None:
    """Turn the cache on in ``folder`` (created); ``None`` or ``"none"`` leaves it off.

    Programs that compiled in under a second are not stored (JAX's own threshold).
    """
    if folder is None or str(folder).lower() == "none":
        return None
    import jax

    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(
            f"cannot create the compilation cache folder {path} ({err.strerror}); pass "
            "--compilation-cache DIR or --compilation-cache none"
        ) from err
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    # JAX decides once per process whether the cache is in use, at the first compile: start over
    # so that a process that already compiled something (a notebook, a test) uses it too.
    compilation_cache.reset_cache()
    return path


def subfolder(name: str) -> Path | None:
    """``name`` inside the JAX compilation cache folder in use (where jaxmask keeps what a later
    process would otherwise trace again), or None when the cache is off or remote (gs://...)."""
    import jax

    cache = jax.config.jax_compilation_cache_dir
    if not cache or "://" in str(cache):
        return None
    return Path(cache).expanduser() / name


def write_entry(path: Path, data: bytes) -> None:
    """Write one cache entry atomically (a temporary file in the same folder, then
    ``os.replace``); a failed write is ignored, since the next process only recomputes it. No
    fsync: an entry a power cut truncates is read as damaged and recomputed. (Not
    ``ports.store.atomic``: importing that loads the dataset writers and PIL.)"""
    temp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
    except OSError:
        pass  # a read-only or full cache folder
