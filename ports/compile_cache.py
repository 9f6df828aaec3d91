"""JAX's persistent compilation cache for the commands: a second run of the same shapes loads the
compiled sampler from disk instead of recompiling it (tens of seconds on a CPU, ~40 s for SD on
a GPU)."""

import os
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
