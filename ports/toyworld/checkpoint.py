"""Resumable training state: one file holding the arrays and a JSON record, replaced atomically.

``jaxmask train-toy --resume`` continues a run from here: the state (parameters, EMA, optimiser
state, step counters) is restored exactly, and the data order needs nothing saved, because every
step draws its batch from ``fold_in(key, step)``. So a run cut into segments makes the same
weights as one uninterrupted run (tests/ports/toyworld/test_train.py checks it).
"""

import json
import os
from pathlib import Path

import jax
from flax import serialization

FILE = "checkpoint.msgpack"


def path(folder: str | os.PathLike) -> Path:
    return Path(folder) / FILE


def save(folder: str | os.PathLike, state, meta: dict) -> Path:
    """Write ``state`` (any pytree of arrays) and ``meta`` (JSON-able) as
    ``folder/checkpoint.msgpack``.

    Written to a temporary file, flushed to disk and renamed over the old one: a crash leaves the
    previous checkpoint or the new one, never half of either.
    """
    target = path(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    blob = serialization.msgpack_serialize(
        {"meta": json.dumps(meta), "state": serialization.to_state_dict(jax.device_get(state))}
    )
    tmp = target.with_name(f".{target.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return target


def read_meta(folder: str | os.PathLike) -> dict | None:
    """The record saved with the checkpoint in ``folder``, or None when there is none."""
    target = path(folder)
    if not target.is_file():
        return None
    return json.loads(_read(target)["meta"])


def load(folder: str | os.PathLike, template) -> tuple[object, dict]:
    """``(state, meta)``; ``template`` is a pytree of the saved structure (e.g. a fresh init)."""
    raw = _read(path(folder))
    return serialization.from_state_dict(template, raw["state"]), json.loads(raw["meta"])


def _read(target: Path) -> dict:
    try:
        return serialization.msgpack_restore(target.read_bytes())
    except Exception as err:  # msgpack raises several types for a damaged file
        raise ValueError(
            f"{target} is not a readable training checkpoint ({type(err).__name__}: {err}); "
            "remove it to start the run over"
        ) from err
