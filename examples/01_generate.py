"""Generate images with masks from a Stable Diffusion checkpoint.

    python examples/01_generate.py                                   # the bundled toy model
    python examples/01_generate.py path/to/diffusers-folder-or-hub-id "a photo of a cat" cat

Writes image.png and labels.png (VOC palette) in the current folder. JAXMASK_EXAMPLE_SMALL=1
samples 2 steps instead of 50 (what the test suite runs).
"""

import os
import sys

import jax
import numpy as np
from PIL import Image

import jaxmask
from jaxmask.labels import VOC_PALETTE

model, prompt, *classes = sys.argv[1:] or [None, "a red star on a striped background", "star"]
steps = 2 if os.environ.get("JAXMASK_EXAMPLE_SMALL") == "1" else 50
pipe = jaxmask.load(model)
result = pipe.generate(
    [prompt], jax.random.key(0), classes=classes, method="seediff-code", steps=steps
)
Image.fromarray(result.images[0]).save("image.png")
labels = Image.fromarray(np.asarray(result.label_maps[0]), mode="P")
labels.putpalette(VOC_PALETTE.reshape(-1).tolist())
labels.save("labels.png")
print("classes:", result.classes, "| label values:", np.unique(result.label_maps[0]).tolist())
