"""A procedural world of coloured shapes on textured backgrounds, with exact labels.

Each scene is deterministic from a seed: 1-2 objects of 8 classes, each with a random colour,
size, position and rotation, drawn in order (later objects occlude earlier ones), on one of
several background textures; the label map is exact (0 background, class id + 1 per pixel);
the caption names the objects, their colours and the background:
"a red star and a blue ring on a striped background".

World version 2 (``VERSION``) is sized for a model with 16x16 latents (4 px per latent pixel):
objects span 23-36 px (were 15-28 px, 1-3 objects; a 15 px star is a 4-latent-pixel blob), and
every texture varies on a scale the latents can hold (stripes and checks of 6 px or more, grain
on a 4 px grid; version 1's per-pixel grain cannot be reconstructed from 16x16x4 numbers).

Shapes are signed-distance functions evaluated on the pixel grid (numpy, vectorised over
pixels), so one 64x64 scene takes well under a millisecond of array work.
"""

import dataclasses

import numpy as np

CLASSES = ("circle", "square", "triangle", "star", "ring", "cross", "heart", "moon")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
VERSION = 2  # bump when scenes change: caches keyed on the world (the quality oracle) include it
BACKGROUNDS = ("plain", "striped", "checkered", "dotted", "gradient", "noisy")
BACKGROUND_WORDS = {  # the caption word of each background kind
    "plain": "plain",
    "striped": "striped",
    "checkered": "checkered",
    "dotted": "dotted",
    "gradient": "gradient",
    "noisy": "grainy",
}


@dataclasses.dataclass(frozen=True)
class Obj:
    cls: int
    colour: str
    cy: float
    cx: float
    size: float
    angle: float


@dataclasses.dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (h, w, 3) uint8
    labels: np.ndarray  # (h, w) uint8: 0 background, 1..8 = CLASSES index + 1
    caption: str
    objects: tuple[Obj, ...]
    background: str


def _sdf(name: str, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) of a unit-size shape centred at the origin."""
    r = np.hypot(x, y)
    if name == "circle":
        return r - 1.0
    if name == "square":
        return np.maximum(np.abs(x), np.abs(y)) - 0.85
    if (
        name == "triangle"
    ):  # equilateral, pointing up, circumradius 1.3 (v1: 1, half a circle's area)
        k = np.sqrt(3.0)
        x, y = x / 1.3, y / 1.3
        return np.maximum(np.abs(x) * k / 2 + y / 2, -y) - 0.5
    if name == "star":  # five points: radius modulated by angle
        theta = np.arctan2(y, x)
        edge = 0.65 + 0.5 * np.abs(np.cos(2.5 * theta)) ** 3  # v1: 0.55 + 0.45
        return r - edge
    if name == "ring":
        return np.abs(r - 0.75) - 0.25
    if name == "cross":
        bar = 0.3
        return np.minimum(
            np.maximum(np.abs(x) - 1.0, np.abs(y) - bar),
            np.maximum(np.abs(x) - bar, np.abs(y) - 1.0),
        )
    if name == "heart":
        yy = -y + 0.25  # classic implicit heart, y up
        xx = 1.15 * x
        return (xx**2 + yy**2 - 0.6) ** 3 - xx**2 * yy**3
    if name == "moon":
        return np.maximum(r - 1.0, -(np.hypot(x - 0.45, y + 0.1) - 0.8))
    raise ValueError(f"unknown shape {name!r}; known: {CLASSES}")


def _background(kind: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(60, 200, 3)
    b = np.clip(a + rng.choice([-1, 1], 3) * rng.uniform(40, 80, 3), 0, 255)
    if kind == "plain":
        t = np.zeros((h, w))
    elif kind == "striped":
        period = rng.uniform(6, 12) * h / 64
        angle = rng.uniform(0, np.pi)
        t = (np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period) > 0).astype(
            np.float32
        )
    elif kind == "checkered":
        cell = max(2, int(rng.integers(6, 11) * h / 64))
        t = ((yy // cell + xx // cell) % 2).astype(np.float32)
    elif kind == "dotted":
        cell = rng.uniform(8, 12) * h / 64
        t = (np.hypot(yy % cell - cell / 2, xx % cell - cell / 2) < cell / 4).astype(np.float32)
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(angle) + yy * np.sin(angle)
        t = (t - t.min()) / max(np.ptp(t), 1e-6)
    elif kind == "noisy":
        grain = rng.uniform(0, 1, (-(-h // 4) + 1, -(-w // 4) + 1))  # a 4 px grid, bilinear
        gy, gx = yy / 4, xx / 4
        y0, x0 = gy.astype(int), gx.astype(int)
        fy, fx = gy - y0, gx - x0
        t = (grain[y0, x0] * (1 - fy) + grain[y0 + 1, x0] * fy) * (1 - fx) + (
            grain[y0, x0 + 1] * (1 - fy) + grain[y0 + 1, x0 + 1] * fy
        ) * fx
    else:
        raise ValueError(f"unknown background {kind!r}; known: {BACKGROUNDS}")
    return (a * (1 - t[..., None]) + b * t[..., None]).astype(np.float32)


MAX_OBJECTS = 2


def sample_objects(rng: np.random.Generator, max_objects: int = MAX_OBJECTS) -> tuple[Obj, ...]:
    n = int(rng.integers(1, max_objects + 1))
    classes = rng.choice(len(CLASSES), size=n, replace=False)
    colours = rng.choice(list(COLOURS), size=n, replace=False)
    objs = []
    for c, colour in zip(classes, colours, strict=True):
        size = rng.uniform(0.18, 0.28)
        objs.append(
            Obj(
                int(c),
                str(colour),
                float(rng.uniform(size, 1 - size)),
                float(rng.uniform(size, 1 - size)),
                float(size),
                float(rng.uniform(0, 2 * np.pi)),
            )
        )
    return tuple(objs)


def caption(objects: tuple[Obj, ...], background: str, colours: bool = True) -> str:
    """'a red star and a blue ring on a striped background' ('a star and a ring on a striped
    background' without ``colours``)."""

    def name(o: Obj) -> str:
        words = f"{o.colour} {CLASSES[o.cls]}" if colours else CLASSES[o.cls]
        return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"

    parts = [name(o) for o in objects]
    names = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{names} on a {BACKGROUND_WORDS[background]} background"


def _shape_mask(o: Obj, size: int) -> np.ndarray:
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    dy, dx = (yy - o.cy) / o.size, (xx - o.cx) / o.size
    ca, sa = np.cos(o.angle), np.sin(o.angle)
    return _sdf(CLASSES[o.cls], ca * dy - sa * dx, sa * dy + ca * dx) < 0


def render(
    objects: tuple[Obj, ...],
    background: str,
    rng: np.random.Generator,
    size: int,
    min_visible: float = 0.5,
) -> Scene:
    """Draw ``objects`` in order over the background. An object less than ``min_visible`` of
    which stays visible is left out altogether, so every captioned object can be seen."""
    masks = [_shape_mask(o, size) for o in objects]
    keep = list(range(len(objects)))
    while True:  # drop the most hidden object until all kept ones are visible enough
        covered = np.zeros((size, size), bool)
        visible = [None] * len(objects)
        for i in reversed(keep):
            visible[i] = masks[i] & ~covered
            covered |= masks[i]
        fractions = {i: visible[i].sum() / max(masks[i].sum(), 1) for i in keep}
        worst = min(keep, key=lambda i: fractions[i])
        if fractions[worst] >= min_visible or len(keep) == 1:
            break
        keep.remove(worst)
    image = _background(background, rng, size, size)
    labels = np.zeros((size, size), np.uint8)
    for i in keep:
        o = objects[i]
        shade = 1.0 + 0.15 * rng.uniform(-1, 1)
        image[visible[i]] = np.clip(np.asarray(COLOURS[o.colour], np.float32) * shade, 0, 255)
        labels[visible[i]] = o.cls + 1
    kept = tuple(objects[i] for i in keep)
    return Scene(
        image.round().astype(np.uint8), labels, caption(kept, background), kept, background
    )


def scene(seed: int, size: int = 64, max_objects: int = MAX_OBJECTS) -> Scene:
    """The scene of ``seed``: the same seed gives the same pixels, labels and caption.

    Seeds are item indices folded into a base seed by the caller (``fold_in`` semantics):
    ``np.random.SeedSequence((base, index))`` keeps streams independent.
    """
    rng = np.random.default_rng(seed)
    objects = sample_objects(rng, max_objects)
    background = str(rng.choice(BACKGROUNDS))
    return render(objects, background, rng, size)
