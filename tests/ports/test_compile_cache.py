"""``ports.compile_cache``: the commands' persistent compilation cache."""

import jax
import jax.numpy as jnp
import pytest

from ports import compile_cache


@pytest.fixture
def restore_cache_config():
    before = (
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_persistent_cache_min_compile_time_secs,
    )
    yield
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    compilation_cache.reset_cache()  # later tests in this process run without it again


def test_off_by_none():
    assert compile_cache.enable(None) is None and compile_cache.enable("none") is None


def test_enable_creates_the_folder_and_jax_writes_programs_there(tmp_path, restore_cache_config):
    folder = compile_cache.enable(tmp_path / "xla")
    assert folder == tmp_path / "xla" and folder.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # store even tiny programs

    @jax.jit
    def f(x):
        return jnp.sin(x) * 3.0 + x.sum()

    f(jnp.arange(37.0)).block_until_ready()
    assert any(folder.iterdir()), "no compiled program was written"


def test_unwritable_folder_says_what_to_do(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="--compilation-cache none"):
        compile_cache.enable(blocker / "xla")
