"""The test run checks the core's jaxtyping annotations at runtime (pyproject addopts,
conftest.py): a call whose shapes contradict its signature fails in the checker, before the
function's own checks; ``@pytest.mark.unchecked`` leaves the function's own error."""

import os

import jax.numpy as jnp
import pytest

from jaxmask.metrics import confusion_matrix


def _checked(config) -> bool:
    asked = bool(config.getoption("jaxtyping_packages", None))
    return asked and os.environ.get("JAXTYPING_DISABLE", "0").lower() not in ("1", "true")


def test_mismatched_shapes_fail_the_annotation(request):
    if not _checked(request.config):
        pytest.skip("run without --jaxtyping-packages, or with JAXTYPING_DISABLE=1")
    from jaxtyping import TypeCheckError

    # label: Integer[Array, "h w"], pred: Integer[Array, "h w"]: the same h and w
    with pytest.raises(TypeCheckError, match="pred"):
        confusion_matrix(jnp.zeros((2, 2), jnp.int32), jnp.zeros((3, 2), jnp.int32), 2)


@pytest.mark.unchecked("asserts the core's own error message")
def test_unchecked_leaves_the_core_s_own_error():
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(jnp.zeros((2, 2), jnp.int32), jnp.zeros((3, 2), jnp.int32), 2)
