"""``ports.executables.Jit``: compiled programs kept on disk, loaded by a later process without
tracing; any change to what the program depends on compiles a new one."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ports import compile_cache, executables
from ports.sd.capture import NOTHING
from ports.sd.sample import Sampler
from ports.sd.tokenizer import tokenize
from tests.ports.conftest import compilation_cache_on


@pytest.fixture
def kept(tmp_path):
    """JAX's compilation cache on in ``tmp_path``; yields the folder of the kept executables."""
    with compilation_cache_on(tmp_path / "xla") as folder:
        yield folder / executables.FOLDER


def _counted(traces: list):
    """f(x, n, scale=...) with n and the keyword ``mode`` static; each trace appends to
    ``traces`` (a Python side effect runs only while tracing)."""

    def f(x, n, y, *, mode="add", scale=1.0):
        traces.append(n)
        out = x * n + y if mode == "add" else x * y * n
        return {"out": out * scale, "sum": jnp.sum(out)}

    return f


def _fresh(traces, key=None):
    """A new Jit of the counted function: an empty in-memory table, as in a new process."""
    return executables.Jit(
        _counted(traces), static_argnums=(1,), static_argnames=("mode",), key=key, name="f"
    )


def _call(fn, x=None, n=3, mode="add"):
    x = jnp.arange(6.0) if x is None else x
    return fn(x, n, jnp.ones(6), mode=mode, scale=jnp.float32(2.0))


def test_a_later_process_loads_the_program_without_tracing(kept):
    traces = []
    first = _call(_fresh(traces))
    assert traces == [3] and len(list(kept.glob("*.bin"))) == 1
    again = _call(_fresh(traces))  # a new table: read from disk
    assert traces == [3], "the kept program was traced again"
    expected = _call(jax.jit(_counted([]), static_argnums=(1,), static_argnames=("mode",)))
    for out in (first, again):
        np.testing.assert_array_equal(np.asarray(out["out"]), np.asarray(expected["out"]))
        np.testing.assert_array_equal(np.asarray(out["sum"]), np.asarray(expected["sum"]))


_THREE_PROCESSES = """
import sys
import jax, jax.numpy as jnp, numpy as np
from ports import compile_cache, executables
compile_cache.enable(sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
def f(x, y):
    return jnp.where(x > 0.5, x + y, y * 2).sum(0) + jnp.tanh(x @ y)
x, y = jnp.linspace(0.0, 1.0, 64 * 64).reshape(64, 64), jnp.ones((64, 64))
fn = jax.jit(f) if sys.argv[2] == "jit" else executables.Jit(f, name="f")
np.save(sys.argv[3], np.asarray(fn(x, y)))
"""


def test_a_program_jax_already_cached_is_kept_whole(tmp_path):
    # jaxlib 0.10's CPU executables, once loaded from JAX's own cache, serialise without their
    # fused kernels: a kept copy made from one would load in the next process, then fail when
    # run ("Function ..._fusion not found"). Jit compiles its own copy.
    script = tmp_path / "run.py"
    script.write_text(_THREE_PROCESSES)
    cache = tmp_path / "xla"
    for step in ("jit", "kept", "loaded"):  # JAX caches it; Jit keeps it; a third process loads
        subprocess.run(
            [sys.executable, str(script), str(cache), step, str(tmp_path / f"{step}.npy")],
            check=True,
            cwd=Path(__file__).resolve().parents[2],
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
    assert len(list((cache / executables.FOLDER).glob("*.bin"))) == 1
    expected = np.load(tmp_path / "jit.npy")
    for step in ("kept", "loaded"):
        np.testing.assert_array_equal(np.load(tmp_path / f"{step}.npy"), expected)


def test_same_signature_in_one_process_is_one_program(kept):
    traces = []
    fn = _fresh(traces)
    _call(fn)
    _call(fn, x=jnp.arange(6.0) + 1)  # new values, same shapes
    assert traces == [3] and fn.cache_size() == 1


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(n=4), np.arange(6.0) * 4 + 1),  # a static positional value
        (dict(mode="mul"), np.arange(6.0) * 3),  # a static keyword
        (dict(x=jnp.arange(6, dtype=jnp.int32)), np.arange(6.0) * 3 + 1),  # a dtype
    ],
    ids=["static-arg", "static-kwarg", "dtype"],
)
def test_a_changed_signature_compiles_a_new_program(kept, change, expected):
    traces = []
    _call(_fresh(traces))
    out = _call(_fresh(traces), **change)
    assert len(traces) == 2 and len(list(kept.glob("*.bin"))) == 2
    np.testing.assert_allclose(np.asarray(out["out"]), expected * 2)


def test_a_changed_shape_compiles_a_new_program(kept):
    traces = []
    _call(_fresh(traces))
    out = _fresh(traces)(jnp.arange(7.0), 3, jnp.ones(7), mode="add", scale=jnp.float32(2.0))
    assert len(traces) == 2 and len(list(kept.glob("*.bin"))) == 2
    np.testing.assert_allclose(np.asarray(out["out"]), (np.arange(7.0) * 3 + 1) * 2)


def test_what_the_caller_names_and_the_environment_are_in_the_key(kept, monkeypatch):
    traces = []
    _call(_fresh(traces, key={"model": "a"}))
    _call(_fresh(traces, key={"model": "b"}))  # e.g. another UNet config
    assert len(traces) == 2
    _call(_fresh(traces, key={"model": "a"}))
    assert len(traces) == 2  # back to the first: kept
    environment = executables.environment()
    changed = {**environment, "source": "0" * 64}  # an edited source file, another jax, ...
    monkeypatch.setattr(executables, "environment", lambda: changed)
    _call(_fresh(traces, key={"model": "a"}))
    assert len(traces) == 3 and len(list(kept.glob("*.bin"))) == 3


def test_the_environment_names_code_versions_devices_and_flags():
    env = executables.environment()
    assert len(env["source"]) == 64
    assert {"jax", "jaxlib", "flax", "diffusers"} <= set(env["versions"])
    assert env["devices"][0] == "cpu" and env["devices"][-1] == jax.local_device_count()
    assert "xla_force_host_platform_device_count" in env["xla_flags"]  # tests/conftest.py's


@pytest.mark.parametrize("damage", ["truncated", "flipped", "empty"])
def test_a_damaged_entry_is_compiled_again_and_rewritten(kept, damage):
    traces = []
    expected = np.asarray(_call(_fresh(traces))["out"])
    (path,) = kept.glob("*.bin")
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flipped":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    else:
        path.write_bytes(b"")
    out = _call(_fresh(traces))
    assert len(traces) == 2
    np.testing.assert_array_equal(np.asarray(out["out"]), expected)
    assert path.read_bytes() == data or len(path.read_bytes()) > 32  # rewritten whole
    _call(_fresh(traces))
    assert len(traces) == 2  # the rewritten entry loads


def test_without_the_cache_it_is_plain_jit(tmp_path):
    assert jax.config.jax_compilation_cache_dir in (None, "")  # tests/conftest.py: off
    traces = []
    fn = _fresh(traces)
    _call(fn)
    _call(_fresh(traces))
    assert traces == [3, 3] and fn.cache_size() == 1


def test_an_unwritable_folder_only_means_compiling_again(kept):
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text("a file where the folder would go")
    traces = []
    out = _call(_fresh(traces))
    _call(_fresh(traces))
    assert traces == [3, 3]
    np.testing.assert_allclose(np.asarray(out["out"]), (np.arange(6.0) * 3 + 1) * 2)


def test_a_static_value_without_a_stable_repr_is_not_kept(kept):
    class Opaque:  # hashable, but its repr names an address that changes per process
        pass

    fn = executables.Jit(lambda x, o: x + 1.0, static_argnums=(1,))
    np.testing.assert_array_equal(np.asarray(fn(jnp.zeros(2), Opaque())), [1.0, 1.0])
    assert not kept.exists() or not any(kept.iterdir())


def test_the_sampler_loads_its_program_and_gives_the_same_samples(sd1, kept, monkeypatch):
    ids = tokenize(sd1.tokenizer, ["a photo of a cat", "a dog"])
    negative = tokenize(sd1.tokenizer, ["", ""])
    args = (ids, negative, jax.random.key(0))
    with monkeypatch.context() as off:  # the cache off: plain jax.jit
        off.setattr(compile_cache, "subfolder", lambda name: None)
        expected = Sampler(sd1)(*args, steps=3, spec=NOTHING)
    assert not kept.exists()
    fresh = Sampler(sd1)(*args, steps=3, spec=NOTHING)  # compiled and kept
    assert len(list(kept.glob("*.bin"))) == 1
    traced = []
    sample = Sampler._sample

    def spy(self, *a, **k):
        traced.append(1)
        return sample(self, *a, **k)

    monkeypatch.setattr(Sampler, "_sample", spy)
    loaded = Sampler(sd1)(*args, steps=3, spec=NOTHING)  # a new sampler: as in a new process
    assert not traced, "the kept sampler program was traced again"
    for out in (fresh, loaded):
        np.testing.assert_array_equal(np.asarray(out.images), np.asarray(expected.images))
        np.testing.assert_array_equal(np.asarray(out.latents), np.asarray(expected.latents))
