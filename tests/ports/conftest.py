"""Fixtures shared by the port tests: tiny diffusers-format Stable Diffusion checkpoints."""

import contextlib

import pytest


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    """A tiny random SD 1.x checkpoint folder (see ``tests/ports/sd/tiny.py``),
    built once per session."""
    pytest.importorskip("torch")
    from tests.ports.sd.tiny import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd"), seed=0)


@pytest.fixture(scope="session")
def tiny_sd2_path(tmp_path_factory):
    """A tiny random SD 2.x checkpoint folder (linear projections, per-block heads, gelu CLIP)."""
    pytest.importorskip("torch")
    from tests.ports.sd.tiny import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd2"), seed=1, sd2=True)


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory):
    """A tiny 3-level SD 1.x checkpoint whose deepest level has no attention blocks (an
    ``UpBlock2D`` first): attention at latent sides 16, 8 and 4, the 4 in the mid block only."""
    pytest.importorskip("torch")
    from tests.ports.sd.tiny import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd3"), seed=2, three_levels=True)


@pytest.fixture(scope="session")
def sd1(tiny_sd_path):
    """The tiny SD 1.x checkpoint loaded by ``ports.sd.load`` (once per session)."""
    from ports.sd.load import load

    return load(tiny_sd_path)


@pytest.fixture(scope="session")
def sd2(tiny_sd2_path):
    """The tiny SD 2.x checkpoint loaded by ``ports.sd.load`` (once per session)."""
    from ports.sd.load import load

    return load(tiny_sd2_path)


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    """A persistent compilation cache shared by this module's subprocesses: only the first one
    compiles the sampler (a cached executable gives the same results as a fresh compile)."""
    return tmp_path_factory.mktemp("jax_cache")


@contextlib.contextmanager
def compilation_cache_on(folder, min_compile_secs: float | None = None):
    """JAX's persistent compilation cache on in ``folder`` as the commands turn it on
    (``compile_cache.enable``), optionally keeping even fast compiles; the config is restored
    on the way out, so later tests in the process run without it."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    from ports import compile_cache

    before = (
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_persistent_cache_min_compile_time_secs,
    )
    path = compile_cache.enable(folder)
    if min_compile_secs is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
    try:
        yield path
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
        compilation_cache.reset_cache()
