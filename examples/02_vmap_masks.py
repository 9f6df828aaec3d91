"""Masks for a batch with jax.vmap: every item's maps through the same jitted function.

python examples/02_vmap_masks.py

JAXMASK_EXAMPLE_SMALL=1 makes 2 items of 128 px with attention up to side 32 instead of 4 items of
256 px up to side 64 (what the test suite runs).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

import jaxmask
from jaxmask import methods, metrics, synthetic

cfg = methods.get("seediff-code")
boxes = ((0.1, 0.1, 0.6, 0.5), (0.55, 0.5, 0.9, 0.9))
small = os.environ.get("JAXMASK_EXAMPLE_SMALL") == "1"
sides, items, size = ((8, 16, 32), 2, 128) if small else ((8, 16, 32, 64), 4, 256)

# The "generated images": the same scene with different attention noise.
keys = jax.random.split(jax.random.key(0), items)
batch = [synthetic.scene_maps(boxes, sides, k, self_layers=cfg.self_layers) for k in keys]
maps = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *batch)  # leading batch axis
weights = synthetic.class_weights(len(boxes))  # shared by every item
images = jnp.zeros((items, size, size, 3))

extract = jax.jit(jax.vmap(jaxmask.extract_masks, in_axes=(0, None, 0, None)), static_argnums=3)
soft, labels = extract(maps, weights, images, cfg)
print("soft masks", soft.shape, soft.dtype, "| label maps", labels.shape, labels.dtype)

truth = synthetic.region_labels(boxes, size)
conf = jax.vmap(metrics.confusion_matrix, in_axes=(None, 0, None))(
    truth, labels.astype(jnp.int32), 3
).sum(0)
print("mIoU over the batch:", float(metrics.mean_iou(conf)))
print("classes per item:", [sorted(np.unique(np.asarray(label)).tolist()) for label in labels])
