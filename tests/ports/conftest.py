"""Fixtures shared by the port tests: tiny diffusers-format Stable Diffusion checkpoints."""

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
