"""Compiled programs kept on disk, so that a later process skips tracing and lowering too.

JAX's persistent compilation cache saves the XLA compile, but a new process still traces the
Python function and lowers it to find the cache entry: for the Stable Diffusion sampler that is
tracing the UNet twice, the text encoder and the VAE, several seconds on a CPU before the first
image. :class:`Jit` is a ``jax.jit`` whose compiled executables are also kept whole
(``jax.experimental.serialize_executable``) in ``<compilation cache>/jaxmask-executables/``, one
file per program; a later process with the same key loads one in a fraction of a second.

The key is everything the program depends on beyond its arguments' shapes, so a stale program is
never run: the argument signature (static values, pytree structure, shapes, dtypes, shardings),
what the caller names (``key``: e.g. the model's module configs), a sha256 of every source file
of the ``jaxmask`` and ``ports`` packages, the jax, jaxlib, flax and diffusers versions, the
devices (and on a CPU the instruction set flags: XLA compiles for the host), ``XLA_FLAGS`` and
the jax options that change lowering. An entry that is missing, damaged (its sha256 is checked
before anything is read) or made for another key is compiled again and rewritten atomically. A
folder that cannot be written keeps nothing: there the program is compiled as ``jax.jit`` would
(JAX's own cache may have it).
With JAX's cache off, with several processes (multi-host programs are not serialised), or when a
static argument has no stable repr, :class:`Jit` is plain ``jax.jit``.

The folder is trusted as JAX's own cache is: its files are native code and pickled trees.
"""

import contextlib
import functools
import hashlib
import json
import os
import pickle
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ports import compile_cache

#: The subfolder of JAX's compilation cache folder that holds the serialised executables.
FOLDER = "jaxmask-executables"
_PACKAGES = ("jaxmask", "ports")
# jax options that change what a function lowers to
_JAX_OPTIONS = (
    "jax_enable_x64",
    "jax_default_matmul_precision",
    "jax_default_prng_impl",
    "jax_threefry_partitionable",
    "jax_numpy_dtype_promotion",
    "jax_use_shardy_partitioner",
)


class Jit:
    """``jax.jit(fun, static_argnums=..., static_argnames=...)`` whose executables persist.

    Call it as the jitted function. ``key`` (JSON values, or a callable returning them, called
    once) names what the program depends on that its arguments do not show, e.g. the Flax
    modules a bound method closes over.
    """

    def __init__(
        self,
        fun: Callable,
        *,
        static_argnums: Sequence[int] = (),
        static_argnames: Sequence[str] = (),
        key: Any = None,
        name: str | None = None,
    ):
        self._jit = jax.jit(fun, static_argnums=static_argnums, static_argnames=static_argnames)
        self._nums = frozenset(static_argnums)
        self._names = frozenset(static_argnames)
        self._key = key
        self._name = name or getattr(fun, "__qualname__", repr(fun))
        self._compiled: dict[Any, Any] = {}

    def __call__(self, *args, **kwargs):
        folder = compile_cache.subfolder(FOLDER)
        if folder is None or jax.process_count() > 1:
            return self._jit(*args, **kwargs)
        dynamic_args = [a for i, a in enumerate(args) if i not in self._nums]
        dynamic_kwargs = {k: v for k, v in kwargs.items() if k not in self._names}
        static = (
            tuple((i, a) for i, a in enumerate(args) if i in self._nums),
            tuple(sorted((k, v) for k, v in kwargs.items() if k in self._names)),
        )
        leaves, tree = jax.tree.flatten((dynamic_args, dynamic_kwargs))
        signature = (static, tree, tuple(_leaf_signature(leaf) for leaf in leaves))
        compiled = self._compiled.get(signature)
        if compiled is None:
            compiled = self._load_or_compile(folder, signature, args, kwargs)
            self._compiled[signature] = compiled
        return compiled(*dynamic_args, **dynamic_kwargs)

    def cache_size(self) -> int:
        """How many programs this process has compiled or loaded (for no-recompile tests)."""
        return len(self._compiled) + self._jit._cache_size()

    def lower(self, *args, **kwargs):
        """``jax.jit(...).lower``: the program traced and lowered, not compiled (benchmarks)."""
        return self._jit.lower(*args, **kwargs)

    def _load_or_compile(self, folder: Path, signature, args, kwargs):
        static, tree, leaves = signature
        described = repr(static)
        if " at 0x" in described:  # a static value without a stable repr: no file can match
            return self._jit.lower(*args, **kwargs).compile()
        key = {
            "program": self._name,
            "key": self._key() if callable(self._key) else self._key,
            "static": described,
            "tree": str(tree),
            "leaves": [
                [aval, weak, repr(sharding), _device_ids(sharding)]
                for aval, weak, sharding in leaves
            ],
            **environment(),
        }
        key = json.loads(json.dumps(key, sort_keys=True, default=repr))
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        path = folder / f"{name}.bin"
        compiled = _read(path, key)
        if compiled is None:
            if not _writable(folder):  # nothing will be kept: compile as jax.jit would
                return self._jit.lower(*args, **kwargs).compile()
            with _fresh_compile():
                compiled = self._jit.lower(*args, **kwargs).compile()
            _write(path, key, compiled)
        return compiled


def _writable(folder: Path) -> bool:
    """Whether ``folder`` (or the nearest folder above that exists) can take a new file."""
    for place in (folder, *folder.parents):
        if place.exists():
            return place.is_dir() and os.access(place, os.W_OK | os.X_OK)
    return False


@contextlib.contextmanager
def _fresh_compile():
    """Compile without JAX's persistent cache: on the CPU (jaxlib 0.10) an executable JAX loaded
    from its cache serialises without its fused kernels, and the copy fails when it runs
    ("Function ..._fusion not found"). JAX decides once per process whether its cache is used,
    so the decision is reset on the way in and out. Another thread's compile meanwhile only
    misses the cache."""
    from jax.experimental.compilation_cache import compilation_cache

    was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", was)
        compilation_cache.reset_cache()


def _device_ids(sharding) -> list[int] | None:
    """The devices an argument lives on, in mesh order (a sharding's repr does not name them)."""
    if sharding is None:
        return None
    mesh = getattr(sharding, "mesh", None)
    if mesh is not None and hasattr(mesh, "devices"):
        return [int(d.id) for d in np.asarray(mesh.devices).flat]
    return sorted(int(d.id) for d in sharding.device_set)


def _leaf_signature(leaf) -> tuple:
    """What a compiled program fixes about one argument: its abstract value and placement."""
    aval = jax.typeof(leaf)
    sharding = leaf.sharding if isinstance(leaf, jax.Array) else None
    return (str(aval), bool(getattr(aval, "weak_type", False)), sharding)


@functools.cache
def environment() -> dict:
    """What every kept program depends on beyond its own key: the code, the libraries, the
    devices and the options (computed once per process)."""
    import diffusers
    import flax
    import jaxlib

    source = hashlib.sha256()
    for package in _PACKAGES:
        root = Path(__file__).resolve().parents[1] / package
        for file in sorted(root.rglob("*.py")):
            source.update(file.relative_to(root.parent).as_posix().encode() + b"\0")
            source.update(file.read_bytes())
    devices = jax.local_devices()
    return {
        "source": source.hexdigest(),
        "versions": {
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "flax": flax.__version__,
            "diffusers": diffusers.__version__,
        },
        "devices": [
            devices[0].platform,
            devices[0].client.platform_version,
            sorted({d.device_kind for d in devices}),
            len(devices),
        ],
        "host": [platform.machine(), _cpu_flags() if devices[0].platform == "cpu" else None],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "options": {name: str(getattr(jax.config, name, None)) for name in _JAX_OPTIONS},
    }


def _cpu_flags() -> str | None:
    """The host CPU's instruction set flags (XLA's CPU code uses what the host has)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return hashlib.sha256(line.split(":", 1)[1].strip().encode()).hexdigest()
    except OSError:
        pass
    return platform.processor() or None


def _read(path: Path, key: dict):
    """The executable kept in ``path`` for ``key``, loaded; None if missing, damaged or another
    key's. The file is a sha256 of the rest, then a pickle of (key, executable, trees)."""
    from jax.experimental.serialize_executable import deserialize_and_load

    try:
        data = path.read_bytes()
    except OSError:
        return None
    digest, body = data[:32], data[32:]
    if len(digest) < 32 or hashlib.sha256(body).digest() != digest:
        return None
    try:
        entry = pickle.loads(body)
        if entry["key"] != key:
            return None
        by_id = {d.id: d for d in jax.local_devices()}
        devices = [by_id[i] for i in entry["devices"]]  # a missing id: KeyError, compile again
        return deserialize_and_load(
            entry["executable"], entry["in_tree"], entry["out_tree"], execution_devices=devices
        )
    except Exception:  # another jax's format, an unloadable program: compile it again
        return None


def _write(path: Path, key: dict, compiled) -> None:
    """Keep ``compiled`` for ``key`` in ``path`` (``compile_cache.write_entry``: atomic, a failed
    write ignored); a backend that cannot serialise its executables keeps nothing."""
    from jax.experimental.serialize_executable import serialize

    try:
        executable, in_tree, out_tree = serialize(compiled)
        devices = [int(d.id) for d in compiled.runtime_executable().local_devices()]
        body = pickle.dumps(
            {
                "key": key,
                "executable": executable,
                "in_tree": in_tree,
                "out_tree": out_tree,
                "devices": devices,  # where it runs (deserialising needs them named)
            }
        )
    except Exception:  # not serialisable here: the process keeps its compiled program
        return
    compile_cache.write_entry(path, hashlib.sha256(body).digest() + body)
