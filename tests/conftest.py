"""Strict test environment (STYLE.md habit 12): simulated CPU devices, strict dtype
promotion where the core runs, one tolerance table, a tree-compare helper."""

import os

# Hermetic runs: the commands' persistent compilation cache is off unless a test turns it on.
os.environ.setdefault("JAXMASK_COMPILATION_CACHE", "none")
# Four simulated CPU devices so mesh and sharding tests run on a laptop. Must precede jax import.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# One tolerance table: (rtol, atol) by dtype.
TOL = {
    np.dtype("float32"): (1e-5, 1e-6),
    np.dtype("float64"): (1e-10, 1e-12),
    np.dtype("float16"): (1e-2, 1e-3),
}


def assert_trees_close(actual, expected, rtol=None, atol=None):
    """``np.testing.assert_allclose`` over two pytrees of the same structure."""
    a_leaves, a_def = jax.tree_util.tree_flatten(actual)
    e_leaves, e_def = jax.tree_util.tree_flatten(expected)
    assert a_def == e_def, f"tree structures differ: {a_def} vs {e_def}"
    for a, e in zip(a_leaves, e_leaves, strict=True):
        a, e = np.asarray(a), np.asarray(e)
        r, t = TOL.get(a.dtype, (1e-5, 1e-6))
        np.testing.assert_allclose(
            a, e, rtol=r if rtol is None else rtol, atol=t if atol is None else atol
        )


@pytest.fixture
def tree_close():
    return assert_trees_close


@pytest.fixture(autouse=True)
def _strict_promotion(request):
    """Core tests run under strict dtype promotion: no silent float64 or int->float upcasts."""
    if "tests/core" in str(request.node.fspath).replace(os.sep, "/"):
        with jax.numpy_dtype_promotion("strict"):
            yield
    else:
        yield


# The test files that take longest (worker seconds, `--durations` on the 2-core CPU). The README's
# `-n 2 --dist loadfile` runs each file on one worker (a module's fixtures, e.g. the smoke
# training, are built once, not once per worker) and hands files out in collection order: these
# go first, and the many short files fill in around them.
_LONGEST = (
    "tests/ports/test_generate.py",
    "tests/ports/toyworld/test_train.py",
    "tests/ports/toyworld/test_quality.py",
    "tests/ports/toyworld/test_segmenter.py",
    "tests/ports/sd/test_sample.py",
    "tests/e2e/test_examples.py",
    "tests/ports/test_api.py",
    "tests/ports/toyworld/test_bundled.py",
    "tests/core/test_parity_code.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(_LONGEST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable
