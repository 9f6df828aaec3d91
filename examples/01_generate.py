"""Generate images with masks from a Stable Diffusion checkpoint.

    python examples/01_generate.py                                   # the bundled toy model
    python examples/01_generate.py path/to/diffusers-folder-or-hub-id "a photo of a cat" cat

Writes image.png and labels.png (VOC palette) in the current folder.
"""

import sys

import jax
import numpy as np
from PIL import Image

import jaxmask
from jaxmask.labels import VOC_PALETTE

model, prompt, *classes = sys.argv[1:] or [None, "a red star on a striped background", "star"]
pipe = jaxmask.load(model)
result = pipe.generate([prompt], jax.random.key(0), classes=classes, method="seediff-code")
Image.fromarray(result.images[0]).save("image.png")
labels = Image.fromarray(np.asarray(result.label_maps[0]), mode="P")
labels.putpalette(VOC_PALETTE.reshape(-1).tolist())
labels.save("labels.png")
print("classes:", result.classes, "| label values:", np.unique(result.label_maps[0]).tolist())
