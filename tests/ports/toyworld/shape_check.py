"""A cheap check of which toy-world shape an image shows, with no trained network: the object of a
one-object image on a plain background is cut out by its distance from the border colour, and
its rotation-invariant shape descriptors (log Hu moments, solidity, Euler number, circularity,
eccentricity, from scikit-image's ``regionprops``) go to a k-nearest-neighbour vote over real
scenes rendered by ``ports.toyworld.scenes``. About 99% right on real scenes
(``test_draws_shapes.py`` holds it to 95%), and seconds to build."""

import numpy as np
from skimage import filters, measure

from ports.toyworld import scenes

MIN_CONTRAST = 30.0  # RGB distance from the background below which no pixel is the object


def foreground(image: np.ndarray) -> np.ndarray | None:
    """The largest connected region of pixels far from the median border colour (Otsu on the
    distance, at least ``MIN_CONTRAST``), or None when nothing stands out."""
    img = image.astype(np.float64)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    distance = np.linalg.norm(img - np.median(border, axis=0), axis=-1)
    if distance.max() <= MIN_CONTRAST:
        return None
    regions = measure.label(distance > max(filters.threshold_otsu(distance), MIN_CONTRAST))
    if regions.max() == 0:
        return None
    return regions == np.argmax(np.bincount(regions.ravel())[1:]) + 1


def features(mask: np.ndarray) -> np.ndarray:
    """Rotation-invariant descriptors of a binary region (8 numbers)."""
    props = measure.regionprops(mask.astype(np.uint8))[0]
    hu = measure.moments_hu(
        measure.moments_normalized(measure.moments_central(mask.astype(np.float64)), 3)
    )
    hu = -np.sign(hu) * np.log10(np.abs(hu) + 1e-12)
    circularity = 4 * np.pi * props.area / max(props.perimeter, 1.0) ** 2
    return np.r_[hu[:4], props.solidity, props.euler_number, circularity, props.eccentricity]


def real_scenes(n: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """``n`` one-object scenes on a plain background (classes in turn, random colour, place,
    size and angle as the world draws them): the images and their class indices."""
    rng = np.random.default_rng(seed)
    images, classes = [], []
    for i in range(n):
        size = rng.uniform(0.18, 0.28)
        obj = scenes.Obj(
            i % len(scenes.CLASSES),
            str(rng.choice(list(scenes.COLOURS))),
            rng.uniform(size, 1 - size),
            rng.uniform(size, 1 - size),
            size,
            rng.uniform(0, 2 * np.pi),
        )
        images.append(scenes.render((obj,), "plain", rng, 64).image)
        classes.append(obj.cls)
    return images, np.asarray(classes)


class ShapeClassifier:
    """k-NN over the standardised descriptors of ``n`` real scenes."""

    def __init__(self, n: int = 400, seed: int = 0, k: int = 5):
        images, classes = real_scenes(n, seed)
        masks = [foreground(image) for image in images]
        keep = [i for i, m in enumerate(masks) if m is not None]
        self.x = np.stack([features(masks[i]) for i in keep])
        self.y = classes[keep]
        self.mean, self.std = self.x.mean(0), self.x.std(0) + 1e-9
        self.k = k

    def __call__(self, image: np.ndarray) -> str | None:
        """The class name the image's object looks like, or None when there is no object."""
        mask = foreground(image)
        if mask is None:
            return None
        z = (features(mask) - self.mean) / self.std
        nearest = np.argsort(np.linalg.norm((self.x - self.mean) / self.std - z, axis=1))
        votes = np.bincount(self.y[nearest[: self.k]], minlength=len(scenes.CLASSES))
        return scenes.CLASSES[int(votes.argmax())]
