"""The core on synthetic attention maps: every method, a contact sheet and mIoU against the
scene's known labels. Runs in seconds on a laptop CPU; no model needed."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxmask
import jaxmask.refine
from jaxmask import methods, metrics, synthetic
from ports import render

# A miniature of SD at 512 px (attention at 8/16/32/64), two objects.
SIDES = (8, 16, 32, 64)
BOXES = ((0.12, 0.10, 0.55, 0.50), (0.50, 0.55, 0.90, 0.92))
COLOURS = np.array([[200, 200, 200], [240, 200, 60], [60, 120, 220]], np.uint8)  # bg, class 1, 2


@dataclasses.dataclass(frozen=True)
class DemoResult:
    miou: dict[str, float]
    sheet: Path


def scene_image(size: int) -> np.ndarray:
    labels = np.asarray(synthetic.region_labels(BOXES, size))
    return COLOURS[labels]


def run(out: Path, size: int = 128, seed: int = 0, pamr: bool = False) -> DemoResult:
    key = jax.random.key(seed)
    truth = jnp.asarray(synthetic.region_labels(BOXES, size))
    image = scene_image(size)
    image_f = jnp.asarray(image, jnp.float32) / 255.0
    weights = synthetic.class_weights(len(BOXES))
    refine = jaxmask.refine.PAMR_DEFAULT if pamr else None
    rows = [("scene: image | true labels", [image, render.overlay(image, np.asarray(truth))])]
    miou = {}
    for name, cfg in methods.PRESETS.items():
        maps = synthetic.scene_maps(
            BOXES, SIDES, key, self_layers=getattr(cfg, "self_layers", "mean")
        )
        f = jax.jit(jaxmask.extract_masks, static_argnums=(3, 4))
        soft, label = f(maps, weights, image_f, cfg, refine)
        conf = metrics.confusion_matrix(truth, label.astype(jnp.int32), len(BOXES) + 1)
        miou[name] = float(metrics.mean_iou(conf))
        panels = [image, render.overlay(image, np.asarray(label))] + [
            render.heat(np.asarray(s)) for s in soft
        ]
        rows.append((f"{name}: mIoU {miou[name]:.3f}", panels))
    sheet = render.write_sheet(rows, Path(out) / "demo.png")
    return DemoResult(miou=miou, sheet=sheet)
