"""DiffuMask's data augmentations on ONE (image, label map) pair: splicing mosaics, Gaussian
noise, a random perspective transform and a random occluder. Key-driven and pure; batch with
``jax.vmap``.

Conventions (every function here):

- ``image``: float32 ``(h, w, 3)`` in ``[0, 1]`` (what the sampler and ``extract_masks`` use;
  the shell converts to and from uint8);
- ``label``: uint8 ``(h, w)``: ``0`` background, ``1..K`` classes, ``255`` ignore;
- image and label stay aligned: every geometric step moves both with the same map, the image
  resampled bilinearly and the labels by nearest neighbour, so a label value is only ever one of
  the input's (plus the documented ``0``/``255`` of a step). Labels are never interpolated.
- keys are traced arguments; the sub-steps of :func:`augment` use ``fold_in`` subkeys.

The reference (weijiawu/DiffuMask ``script/splicing_augmentation_VOC.py``) implements only
splicing; the paper's other augmentations (occlusion, perspective, blur/noise) are not in the
released code, so their parameters here are our choices.
"""

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, UInt8

# also the label of pixels a perspective transform maps from outside the source
from jaxmask.labels import IGNORE

OCCLUDER_LABEL = 0  #: label of the pixels under an occluder (background)

# The pair every function takes and returns (the conventions above), and a strength that may be
# traced (vmapped over items).
Image = Float[Array, "h w 3"]
Labels = UInt8[Array, "h w"]
Strength = float | Float[Array, ""]

#: DiffuMask's splicing grids (rows, cols): 1x2 (horizontal or vertical at random), 2x2, 3x3,
#: 5x5, 6x6, 7x7, 8x8 (weijiawu/DiffuMask ``script/splicing_augmentation_VOC.py``; no 4x4 there).
DIFFUMASK_GRIDS: tuple[tuple[int, int], ...] = (
    (1, 2),
    (2, 1),
    (2, 2),
    (3, 3),
    (5, 5),
    (6, 6),
    (7, 7),
    (8, 8),
)
#: How many images of each grid the reference script makes (3000 1x2 split evenly between
#: horizontal and vertical, 3000, 4000, 3000, 2000, 2000, 1000), used as sampling weights.
DIFFUMASK_GRID_WEIGHTS: tuple[float, ...] = (
    1500.0,
    1500.0,
    3000.0,
    4000.0,
    3000.0,
    2000.0,
    2000.0,
    1000.0,
)

# fold_in streams of an item key (see split_item_key) and of augment's key.
_GRID, _SOURCES, _PAIR = 0, 1, 2
_CHOICE, _PERSPECTIVE, _OCCLUSION, _NOISE = 0, 1, 2, 3

#: The largest perspective ``strength``: below 1/4 every corner stays on its side of the
#: diagonal through its neighbours, so the warped quadrilateral is convex and the homography has
#: no pole inside the image.
MAX_PERSPECTIVE = 0.25


def _check_range(name, value, lo, hi, open_hi=False) -> None:
    """ValueError unless ``lo <= value <= hi`` (``< hi`` when ``open_hi``); array values (which
    may be traced) are not checked."""
    if not isinstance(value, (int, float, np.integer, np.floating)):
        return
    value = float(value)
    ok = lo <= value < hi if open_hi else lo <= value <= hi
    if not ok:
        bound = f"[{lo}, {hi})" if open_hi else f"[{lo}, {hi}]"
        raise ValueError(f"{name} must be in {bound}, got {value}")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Which DiffuMask augmentations to apply and how strongly; static under jit.

    Attributes:
      grids: the splicing mosaics ``(rows, cols)`` an output item is drawn from; ``(1, 1)`` is a
        single (resized) item.
      grid_weights: a sampling weight per grid (need not sum to 1).
      perspective_prob: probability of a random perspective transform (:func:`perspective`).
      perspective_strength: its largest corner displacement, a fraction of the side, in
        ``[0, 0.25)``.
      occlusion_prob: probability of an occluder (:func:`occlude`).
      occlusion_max_fraction: its largest area, a fraction of the image, in ``[0, 1]``.
      noise_prob: probability of Gaussian noise (:func:`gaussian_noise`).
      noise_sigma: its standard deviation, in image units (``[0, 1]`` scale), ``>= 0``.

    The defaults are DiffuMask's splicing grids and weights; the probabilities and strengths of
    the other three are ours (the reference code has none of them).
    """

    grids: Sequence[Sequence[int]] = DIFFUMASK_GRIDS  # stored as a tuple of (rows, cols) tuples
    grid_weights: Sequence[float] = DIFFUMASK_GRID_WEIGHTS  # stored as a tuple
    perspective_prob: float = 0.5
    perspective_strength: float = 0.1
    occlusion_prob: float = 0.5
    occlusion_max_fraction: float = 0.25
    noise_prob: float = 0.5
    noise_sigma: float = 0.03

    def __post_init__(self):
        # lists (from a command line or JSON) become tuples, so the config stays hashable
        grids = tuple(tuple(g) if isinstance(g, (list, tuple)) else g for g in self.grids)
        object.__setattr__(self, "grids", grids)
        object.__setattr__(self, "grid_weights", tuple(self.grid_weights))
        if not self.grids:
            raise ValueError("grids must name at least one (rows, cols) mosaic, e.g. ((2, 2),)")
        for grid in self.grids:
            if (
                not isinstance(grid, tuple)
                or len(grid) != 2
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in grid)
            ):
                raise ValueError(
                    f"each grid must be a (rows, cols) tuple of ints >= 1, got {grid!r}"
                )
        numbers = ("grid_weights",) + tuple(
            f.name for f in dataclasses.fields(self) if f.name not in ("grids", "grid_weights")
        )
        for name in numbers:
            values = getattr(self, name) if name == "grid_weights" else (getattr(self, name),)
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise ValueError(
                    f"{name} must be a number (or numbers), got {getattr(self, name)!r}"
                )
        if len(self.grid_weights) != len(self.grids):
            raise ValueError(
                f"grid_weights has {len(self.grid_weights)} entries for {len(self.grids)} grids; "
                "give one weight per grid"
            )
        if any(not w >= 0 for w in self.grid_weights) or not sum(self.grid_weights) > 0:
            raise ValueError(
                f"grid_weights must be >= 0 with a positive sum, got {self.grid_weights}"
            )
        for name in ("perspective_prob", "occlusion_prob", "noise_prob"):
            _check_range(name, getattr(self, name), 0.0, 1.0)
        _check_range("perspective_strength", self.perspective_strength, 0.0, MAX_PERSPECTIVE, True)
        _check_range("occlusion_max_fraction", self.occlusion_max_fraction, 0.0, 1.0)
        _check_range("noise_sigma", self.noise_sigma, 0.0, math.inf)


#: DiffuMask's augmentations with the defaults above.
DIFFUMASK = AugmentConfig()


def _check_pair(image, label) -> None:
    if image.ndim != 3 or image.shape[-1] != 3 or not jnp.issubdtype(image.dtype, jnp.floating):
        raise ValueError(
            f"image must be float (h, w, 3) in [0, 1], got {image.dtype} {image.shape}"
        )
    if label.shape != image.shape[:2] or label.dtype != jnp.uint8:
        raise ValueError(
            f"label must be uint8 with shape {image.shape[:2]} (the image's h, w), "
            f"got {label.dtype} {label.shape}"
        )


# --- splicing ------------------------------------------------------------------------------


def _cell_bounds(size: int, parts: int) -> np.ndarray:
    """Pixel boundaries of ``parts`` cells along a side: cell ``i`` is ``[b[i], b[i+1])``."""
    return (np.arange(parts + 1) * size) // parts


def _linear_weights(in_size: int, out_size: int) -> np.ndarray:
    """``(out_size, in_size)`` bilinear resampling weights, half-pixel centres, antialiased.

    Each output sample at ``(o + 0.5) * in / out - 0.5`` (input pixel units) weighs input pixel
    ``p`` by the triangle ``max(0, 1 - |x - p| / s)``, ``s = max(in / out, 1)`` (widened when
    downsampling, so a shrunk tile is low-pass filtered rather than aliased), normalised to sum
    to 1. The same filter as ``jax.image.resize(..., "linear", antialias=True)``.
    """
    scale = in_size / out_size
    width = max(scale, 1.0)
    centres = (np.arange(out_size) + 0.5) * scale - 0.5
    distance = np.abs(centres[:, None] - np.arange(in_size)[None, :]) / width
    weights = np.maximum(0.0, 1.0 - distance)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def _nearest_index(in_size: int, out_size: int) -> np.ndarray:
    """``(out_size,)`` nearest-neighbour source pixels, half-pixel centres."""
    index = np.floor((np.arange(out_size) + 0.5) * in_size / out_size).astype(np.int64)
    return np.minimum(index, in_size - 1)


def _side_plan(in_size: int, out_size: int, parts: int):
    """For one side of a mosaic: the per-part resampling weights padded to the largest cell,
    and for every output pixel its part, its position in the part and its nearest source."""
    bounds = _cell_bounds(out_size, parts)
    cells = np.diff(bounds)
    longest = int(cells.max())
    weights = np.zeros((parts, longest, in_size), np.float32)
    nearest = np.zeros(out_size, np.int64)
    for i, cell in enumerate(cells):  # a loop over cells (<= 8), not pixels
        weights[i, :cell] = _linear_weights(in_size, int(cell))
        nearest[bounds[i] : bounds[i + 1]] = _nearest_index(in_size, int(cell))
    part = np.searchsorted(bounds, np.arange(out_size), side="right") - 1
    offset = np.arange(out_size) - bounds[part]
    return weights, part, offset, nearest


def splice(
    images: Float[Array, "m h w 3"],
    labels: UInt8[Array, "m h w"],
    rows: int,
    cols: int,
    size: tuple[int, int] | None = None,
) -> tuple[Float[Array, "H W 3"], UInt8[Array, "H W"]]:
    """A ``rows x cols`` mosaic of ``m = rows * cols`` (image, label) pairs (DiffuMask splicing).

    Tile ``t`` goes to cell ``(t // cols, t % cols)`` (row-major). The output side ``H`` is cut
    at ``floor(i * H / rows)`` (cells differ by at most one pixel when ``rows`` does not divide
    ``H``; likewise for ``W``), and each tile is resized to fill its cell: the image with an
    antialiased bilinear filter, the labels by nearest neighbour (so the mosaic's labels are
    exactly values of the input labels). ``rows = cols = 1`` with ``size`` is a plain resize.

    Args:
      images: ``(m, h, w, 3)`` float in [0, 1].
      labels: ``(m, h, w)`` uint8.
      rows, cols: the grid (static), e.g. 1x2, 2x1, 2x2, 3x3, 5x5, 6x6, 7x7, 8x8 in DiffuMask.
      size: ``(H, W)`` of the output (static); default ``(h, w)``: the mosaic has the size of one
        input, each tile shrunk ``rows x cols`` times.

    Returns:
      ``(image (H, W, 3) float32, label (H, W) uint8)``.

    >>> images = jnp.stack([jnp.full((4, 4, 3), v) for v in (0.0, 1.0)])
    >>> labels = jnp.stack([jnp.full((4, 4), v, jnp.uint8) for v in (1, 2)])
    >>> image, label = splice(images, labels, 1, 2)
    >>> label.tolist()[0], image[0, :, 0].tolist()
    ([1, 1, 2, 2], [0.0, 0.0, 1.0, 1.0])

    .. warning::
       DiffuMask's script pastes the tiles at full size (a ``rows x cols`` mosaic is ``rows``
       times taller and ``cols`` times wider than one image); here every mosaic is resized to
       ``size``, so a dataset keeps one image size.

    References:
      weijiawu/DiffuMask ``script/splicing_augmentation_VOC.py``.
    """
    if not (isinstance(rows, int) and isinstance(cols, int) and rows >= 1 and cols >= 1):
        raise ValueError(f"rows and cols must be ints >= 1, got {rows!r} and {cols!r}")
    if images.ndim != 4 or images.shape[-1] != 3 or not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(
            f"images must be float (m, h, w, 3) in [0, 1], got {images.dtype} {images.shape}"
        )
    m, h, w, _ = images.shape
    if labels.shape != (m, h, w) or labels.dtype != jnp.uint8:
        raise ValueError(
            f"labels must be uint8 with shape {(m, h, w)}, got {labels.dtype} {labels.shape}"
        )
    if m != rows * cols:
        raise ValueError(f"a {rows}x{cols} mosaic needs m = {rows * cols} pairs, got m = {m}")
    out_h, out_w = (h, w) if size is None else size
    if out_h < rows or out_w < cols:
        raise ValueError(
            f"output size {(out_h, out_w)} is too small for a {rows}x{cols} mosaic: every cell "
            "needs at least one pixel"
        )

    weights_y, part_y, offset_y, nearest_y = _side_plan(h, out_h, rows)
    weights_x, part_x, offset_x, nearest_x = _side_plan(w, out_w, cols)

    tiles = images.astype(jnp.float32).reshape(rows, cols, h, w, 3)
    hi = jax.lax.Precision.HIGHEST
    # resample each tile row to its cell height, then each tile column to its cell width
    cells = jnp.einsum("ius,ijstc->iujtc", weights_y, tiles, precision=hi)
    cells = jnp.einsum("jvt,iujtc->iujvc", weights_x, cells, precision=hi)
    image = cells[part_y[:, None], offset_y[:, None], part_x[None, :], offset_x[None, :]]

    tile = part_y[:, None] * cols + part_x[None, :]
    label = labels[tile, nearest_y[:, None], nearest_x[None, :]]
    return jnp.clip(image, 0.0, 1.0), label


# --- per-pair augmentations ----------------------------------------------------------------


def gaussian_noise(
    key: jax.Array, image: Image, label: Labels, sigma: Strength
) -> tuple[Image, Labels]:
    """Add i.i.d. Gaussian noise of standard deviation ``sigma`` to the image, then clip to
    [0, 1]; the labels are returned unchanged (DiffuMask's noise/blur augmentation, paper Sec.
    3.3; not in the reference code).

    Args:
      key: PRNG key (traced).
      image: ``(h, w, 3)`` float in [0, 1].
      label: ``(h, w)`` uint8.
      sigma: ``>= 0``, in image units.

    Returns:
      ``(noisy image, label)``.
    """
    _check_pair(image, label)
    _check_range("sigma", sigma, 0.0, math.inf)
    noise = jax.random.normal(key, image.shape, jnp.float32)
    return jnp.clip(image.astype(jnp.float32) + sigma * noise, 0.0, 1.0), label


def _unit_square_to_quad(quad: Float[Array, "4 2"]) -> Float[Array, "3 3"]:
    """The projective map taking the unit square's corners (0,0), (1,0), (1,1), (0,1) to
    ``quad`` (same order, ``(x, y)``), in closed form (Heckbert 1989, "Fundamentals of Texture
    Mapping", sec. 2.2.3). The unit square itself gives exactly the identity."""
    x0, x1, x2, x3 = quad[:, 0]
    y0, y1, y2, y3 = quad[:, 1]
    dx1, dx2, dx3 = x1 - x2, x3 - x2, x0 - x1 + x2 - x3
    dy1, dy2, dy3 = y1 - y2, y3 - y2, y0 - y1 + y2 - y3
    det = dx1 * dy2 - dx2 * dy1
    g = (dx3 * dy2 - dx2 * dy3) / det
    h = (dx1 * dy3 - dx3 * dy1) / det
    return jnp.stack(
        [
            jnp.stack([x1 - x0 + g * x1, x3 - x0 + h * x3, x0]),
            jnp.stack([y1 - y0 + g * y1, y3 - y0 + h * y3, y0]),
            jnp.stack([g, h, jnp.ones_like(g)]),
        ]
    )


def _warp(
    image: Image, label: Labels, src_x: Float[Array, "h w"], src_y: Float[Array, "h w"]
) -> tuple[Image, Labels]:
    """Sample ``image`` (bilinear) and ``label`` (nearest) at source pixel coordinates; samples
    whose nearest source pixel lies outside the image give 0 and ``IGNORE``."""
    h, w = label.shape
    inside = (src_x >= -0.5) & (src_x < w - 0.5) & (src_y >= -0.5) & (src_y < h - 0.5)

    near_x = jnp.clip(jnp.floor(src_x + 0.5), 0, w - 1).astype(jnp.int32)
    near_y = jnp.clip(jnp.floor(src_y + 0.5), 0, h - 1).astype(jnp.int32)
    warped_label = jnp.where(inside, label[near_y, near_x], jnp.uint8(IGNORE))

    left = jnp.floor(src_x)
    top = jnp.floor(src_y)
    fx = (src_x - left)[..., None]
    fy = (src_y - top)[..., None]
    x_a = jnp.clip(left, 0, w - 1).astype(jnp.int32)
    x_b = jnp.clip(left + 1, 0, w - 1).astype(jnp.int32)
    y_a = jnp.clip(top, 0, h - 1).astype(jnp.int32)
    y_b = jnp.clip(top + 1, 0, h - 1).astype(jnp.int32)
    upper = (1 - fx) * image[y_a, x_a] + fx * image[y_a, x_b]
    lower = (1 - fx) * image[y_b, x_a] + fx * image[y_b, x_b]
    sampled = (1 - fy) * upper + fy * lower
    warped_image = jnp.where(inside[..., None], sampled, jnp.zeros_like(sampled))
    return warped_image, warped_label


def perspective(
    key: jax.Array, image: Image, label: Labels, strength: Strength
) -> tuple[Image, Labels]:
    """One random homography applied to image and labels alike (DiffuMask's perspective
    augmentation, paper Sec. 3.3; not in the reference code).

    The output's four corners are taken from the source at the image corners each moved by
    ``strength * (w, h) * u``, ``u`` uniform in ``[-1, 1]^2`` (inward or outward); the output
    pixel at ``(x, y)`` reads the source at ``H((x + 0.5) / w, (y + 0.5) / h)`` where ``H`` maps
    the unit square onto that quadrilateral. The image is sampled bilinearly, the labels by
    nearest neighbour. Output pixels whose nearest source pixel lies **outside the source** get
    label ``255`` (ignore) and image ``0`` (black): the model is neither told they are
    background nor shown the class. ``strength = 0`` is the identity.

    Args:
      key: PRNG key (traced).
      image: ``(h, w, 3)`` float in [0, 1].
      label: ``(h, w)`` uint8.
      strength: largest corner displacement as a fraction of the side, in ``[0, 0.25)`` (below
        1/4 the quadrilateral stays convex).

    Returns:
      ``(image, label)`` warped by the same map.
    """
    _check_pair(image, label)
    _check_range("strength", strength, 0.0, MAX_PERSPECTIVE, open_hi=True)
    h, w = label.shape
    square = jnp.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], jnp.float32)
    shift = jax.random.uniform(key, (4, 2), jnp.float32, -1.0, 1.0)
    homography = _unit_square_to_quad(square + strength * shift)

    u = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
    v = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
    u, v = jnp.meshgrid(u, v)  # (h, w) each
    points = jnp.stack([u, v, jnp.ones_like(u)])  # (3, h, w)
    mapped = jnp.einsum("ij,jhw->ihw", homography, points, precision=jax.lax.Precision.HIGHEST)
    src_x = mapped[0] / mapped[2] * w - 0.5
    src_y = mapped[1] / mapped[2] * h - 0.5
    return _warp(image.astype(jnp.float32), label, src_x, src_y)


def occlude(
    key: jax.Array, image: Image, label: Labels, max_fraction: Strength
) -> tuple[Image, Labels]:
    """Paste a random rectangle of one random colour over the image; its pixels become label
    ``0`` background (DiffuMask's occlusion augmentation, paper Sec. 3.3; not in the reference
    code).

    The occluder is an object in front of the scene, so what it covers is background (ignore
    pixels under it too). Its height and width are ``floor(f * h)`` and ``floor(g * w)`` with
    ``f, g`` uniform in ``[0, sqrt(max_fraction)]`` (so it covers at most ``max_fraction`` of
    the image, and may be empty), placed uniformly inside the image; its colour is uniform in
    ``[0, 1]^3``.

    Args:
      key: PRNG key (traced).
      image: ``(h, w, 3)`` float in [0, 1].
      label: ``(h, w)`` uint8.
      max_fraction: the occluder's largest area as a fraction of the image, in ``[0, 1]``.

    Returns:
      ``(image, label)`` with the same rectangle changed in both.
    """
    _check_pair(image, label)
    _check_range("max_fraction", max_fraction, 0.0, 1.0)
    h, w = label.shape
    k_size, k_top, k_left, k_colour = jax.random.split(key, 4)
    side = jnp.sqrt(jnp.float32(max_fraction))
    f = jax.random.uniform(k_size, (2,), jnp.float32, 0.0, 1.0) * side
    height = jnp.floor(f[0] * h).astype(jnp.int32)
    width = jnp.floor(f[1] * w).astype(jnp.int32)
    top = jax.random.randint(k_top, (), 0, h - height + 1)
    left = jax.random.randint(k_left, (), 0, w - width + 1)
    colour = jax.random.uniform(k_colour, (3,), jnp.float32)

    y = jnp.arange(h, dtype=jnp.int32)[:, None]
    x = jnp.arange(w, dtype=jnp.int32)[None, :]
    covered = (y >= top) & (y < top + height) & (x >= left) & (x < left + width)
    occluded = jnp.where(covered[..., None], colour, image.astype(jnp.float32))
    return occluded, jnp.where(covered, jnp.uint8(OCCLUDER_LABEL), label)


# --- composition ---------------------------------------------------------------------------


def split_item_key(key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The three streams of an output item's key: (grid choice, source choice, per-pair
    augmentations), each ``fold_in(key, stream)``."""
    return (
        jax.random.fold_in(key, _GRID),
        jax.random.fold_in(key, _SOURCES),
        jax.random.fold_in(key, _PAIR),
    )


def choose_grid(key: jax.Array, cfg: AugmentConfig) -> Int[Array, ""]:
    """The index into ``cfg.grids`` of an item's mosaic, drawn with ``cfg.grid_weights``."""
    weights = jnp.asarray(cfg.grid_weights, jnp.float32)
    return jax.random.choice(key, len(cfg.grids), p=weights / jnp.sum(weights))


def choose_sources(key: jax.Array, m: int, count: int) -> Int[Array, " m"]:
    """``m`` source positions in ``[0, count)``, uniform, with replacement (a mosaic may need more
    tiles than the source has items)."""
    if count < 1:
        raise ValueError(f"count must be >= 1 (the number of source items), got {count}")
    return jax.random.randint(key, (m,), 0, count)


def choose_augmentations(key: jax.Array, cfg: AugmentConfig) -> Bool[Array, "3"]:
    """Which of (perspective, occlusion, noise) :func:`augment` applies under ``key``."""
    probs = jnp.array([cfg.perspective_prob, cfg.occlusion_prob, cfg.noise_prob], jnp.float32)
    return jax.random.uniform(jax.random.fold_in(key, _CHOICE), (3,), jnp.float32) < probs


def augment(
    key: jax.Array, image: Image, label: Labels, cfg: AugmentConfig
) -> tuple[Image, Labels]:
    """DiffuMask's per-pair augmentations, composed: perspective -> occlusion -> noise, each
    applied with its probability in ``cfg`` (decided by :func:`choose_augmentations`), each
    drawing from its own ``fold_in(key, step)`` subkey.

    Splicing (:func:`splice`) comes before this and is done by the caller, which must read the
    tiles' files; an augmentation with probability 0 is not traced at all.

    Args:
      key: PRNG key (traced).
      image: ``(h, w, 3)`` float in [0, 1].
      label: ``(h, w)`` uint8.
      cfg: static.

    Returns:
      ``(image, label)``, float32 and uint8.

    References:
      DiffuMask paper Sec. 3.3 (data augmentation).
    """
    _check_pair(image, label)
    chosen = choose_augmentations(key, cfg)
    image = image.astype(jnp.float32)
    steps = (
        (cfg.perspective_prob, _PERSPECTIVE, perspective, cfg.perspective_strength),
        (cfg.occlusion_prob, _OCCLUSION, occlude, cfg.occlusion_max_fraction),
        (cfg.noise_prob, _NOISE, gaussian_noise, cfg.noise_sigma),
    )
    for n, (prob, stream, step, param) in enumerate(steps):
        if prob == 0:  # static: skip what can never apply
            continue
        new_image, new_label = step(jax.random.fold_in(key, stream), image, label, param)
        image = jnp.where(chosen[n], new_image, image)
        label = jnp.where(chosen[n], new_label, label)
    return image, label
