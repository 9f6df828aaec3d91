"""The toy world: procedural scenes, the toy Stable Diffusion trained on them, and mask quality."""

from pathlib import Path

#: The bundled toy model (``jaxmask train-toy --preset cpu``): ``jaxmask.load()``'s default.
MODEL = Path(__file__).parent / "model"
