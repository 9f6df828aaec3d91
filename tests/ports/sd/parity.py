"""The relative-error check shared by the PyTorch parity tests."""

import numpy as np


def assert_rel_close(actual, expected, rel):
    """max |actual - expected| <= rel * max |expected|; returns that relative error."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = float(np.abs(actual - expected).max() / np.abs(expected).max())
    assert error <= rel, f"relative max error {error:.2e} > {rel:.0e}"
    return error
