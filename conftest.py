"""Runtime shape checks (jaxtyping + beartype) for the tests.

pyproject's ``addopts`` installs jaxtyping's import hook on ``jaxmask``: every annotated function
and dataclass of the core checks its arguments' types and shapes when called. The checks are on
in every test under ``tests/`` (the shell's tests hand the core stacked ``AttentionMaps``, which
the ``*b`` axes of ``jaxmask/maps.py`` allow) and off in the doctests, which show the core's own
errors. A test marked ``@pytest.mark.unchecked(reason)`` runs without them, e.g. one that
asserts the core's own error message for an input the annotations already reject.
``JAXTYPING_DISABLE=1`` turns them off everywhere.
"""

import os

import pytest

_ASKED_OFF = False  # JAXTYPING_DISABLE=1


def pytest_configure(config):
    """Checks off outside the tests that turn them on, including module and session fixtures
    (they run before a test's own fixtures)."""
    import jaxtyping

    global _ASKED_OFF
    _ASKED_OFF = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)


@pytest.fixture(autouse=True)
def _shape_checks(request):
    import jaxtyping

    path = str(request.node.path).replace(os.sep, "/")
    on = "/tests/" in path and request.node.get_closest_marker("unchecked") is None
    jaxtyping.config.update("jaxtyping_disable", _ASKED_OFF or not on)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", True)
