"""Manifest records: validation, canonical lines, mask statistics, software versions."""

import json

import numpy as np
import pytest

from ports.store.records import (
    REQUIRED_KEYS,
    encode_record,
    mask_stats,
    software_versions,
    validate_record,
)
from tests.ports.store._items import make_item


def test_validate_record_names_every_problem():
    record = make_item(0)[2]
    validate_record(record)
    broken = {k: v for k, v in record.items() if k not in ("prompt", "versions")}
    broken["seed"] = {"rule": "fold_in"}
    broken["classes"] = [{"id": 1, "name": "cat"}]
    broken["guidance"] = "7.5"
    with pytest.raises(ValueError) as caught:
        validate_record(broken)
    message = str(caught.value)
    for expected in (
        "missing 'prompt'",
        "missing 'versions'",
        "missing seed.value",
        "missing classes[0].token_positions",
        "'guidance' should be number",
    ):
        assert expected in message
    assert set(REQUIRED_KEYS) >= {"prompt", "classes", "seed", "method", "model", "versions"}


def test_record_lines_are_canonical_json():
    _, _, record, _ = make_item(3)
    shuffled = dict(reversed(list(record.items())))
    line = encode_record(record)
    assert line == encode_record(shuffled) and line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == record
    assert json.loads(encode_record({"x": np.float32(0.5), "y": np.arange(2)})) == {
        "x": 0.5,
        "y": [0, 1],
    }
    with pytest.raises(ValueError):
        encode_record({"x": float("nan")})


def test_mask_stats_by_hand():
    label_map = np.array([[0, 1, 1, 255], [0, 0, 2, 2]])
    assert mask_stats(label_map, [0, 1, 2]) == {
        "fraction": {"0": 0.375, "1": 0.25, "2": 0.25},
        "ignore": 0.125,
    }


def test_software_versions_names_jax_and_numpy():
    versions = software_versions()
    assert versions["numpy"] == np.__version__ and versions["jax"] and versions["python"]
