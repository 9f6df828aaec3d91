"""A dataset from Python: every batch split over this host's devices, resumable.

    python examples/03_dataset_on_mesh.py path/to/diffusers-folder-or-hub-id out/cats-dogs

Same as `jaxmask generate --model MODEL --classes cat,dog --per-class 8 --out OUT`. On a
multi-host pod, call `ports.scale.hosts.initialize_distributed(auto=True)` first: each host
then writes its share and process 0 merges the manifests.

JAXMASK_EXAMPLE_SMALL=1 makes 1 item per class in 2 steps (what the test suite runs, on the
bundled toy model).
"""

import os
import sys
from pathlib import Path

import jax

from ports import generate, plan

model, out = sys.argv[1], Path(sys.argv[2])
small = os.environ.get("JAXMASK_EXAMPLE_SMALL") == "1"
cfg = generate.RunConfig(
    plan=plan.make_plan(
        "cat,dog", items_per_class=1 if small else 8, templates=("a photo of a {class}",)
    ),
    model=model,
    method="seediff-code",
    steps=2 if small else 50,
    guidance=7.5,
    seed=0,
)
batch = 2 * jax.local_device_count()  # a multiple of the devices: each gets 2 images per batch
result = generate.run(cfg, out, batch_size=batch)
print(
    f"{result.written} written, {result.resumed} already there;",
    f"{result.total} items in {result.out}",
)
