"""DiffuMask's augmentations: splicing, noise, perspective, occlusion and their composition.

Invariants that catch wrong results: tiles land in the right cells, labels are only ever input
values (plus the documented 255/0), image and labels move together, the random parts are
key-driven (same key, same output), and jit / vmap agree with eager calls.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmask import augment as aug

KEY = jax.random.key(0)

# jitted once per module (parameters traced, so one compile per shape): eager JAX compiles every
# op separately, which is what makes small tests slow.
splice = jax.jit(aug.splice, static_argnames=("rows", "cols", "size"))
gaussian_noise = jax.jit(aug.gaussian_noise)
perspective = jax.jit(aug.perspective)
occlude = jax.jit(aug.occlude)
TRACES = []  # one entry each time ``augment`` below is traced


def _counted_augment(key, image, label, cfg):
    TRACES.append(cfg)
    return aug.augment(key, image, label, cfg)


augment = jax.jit(_counted_augment, static_argnames="cfg")
COLOURS = np.array(
    [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 1.0, 1.0]],
    np.float32,
)


def constant_tiles(m, h, w):
    """m tiles of size (h, w): tile t has colour (t / m, 1 - t / m, 0.5) and label t + 1."""
    t = np.arange(m, dtype=np.float32)
    colours = np.stack([t / m, 1 - t / m, np.full(m, 0.5, np.float32)], -1)
    images = np.broadcast_to(colours[:, None, None, :], (m, h, w, 3)).copy()
    labels = np.broadcast_to((np.arange(m) + 1).astype(np.uint8)[:, None, None], (m, h, w)).copy()
    return jnp.asarray(images), jnp.asarray(labels), colours


def random_pairs(m, h=16, w=16, values=(0, 1, 2, 255), seed=0):
    """m random images (m, h, w, 3) in [0, 1] and label maps (m, h, w) drawn from ``values``."""
    rng = np.random.default_rng(seed)
    images = rng.random((m, h, w, 3), dtype=np.float32)
    labels = rng.choice(np.asarray(values, np.uint8), (m, h, w))
    return jnp.asarray(images), jnp.asarray(labels)


def random_pair(h=16, w=16, values=(0, 1, 2, 255), seed=0):
    images, labels = random_pairs(1, h, w, values, seed)
    return images[0], labels[0]


def two_class_scene(h=32, w=32):
    """A blue background (label 1) with a red square (label 2)."""
    label = np.ones((h, w), np.uint8)
    label[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 2
    image = np.where((label == 2)[..., None], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]).astype(np.float32)
    return jnp.asarray(image), jnp.asarray(label)


# --- splice --------------------------------------------------------------------------------


def test_splice_2x2_puts_each_tile_in_its_cell():
    images, labels, colours = constant_tiles(4, 8, 8)
    image, label = splice(images, labels, 2, 2)
    assert image.shape == (8, 8, 3) and image.dtype == jnp.float32
    assert label.shape == (8, 8) and label.dtype == jnp.uint8
    expected_label = np.array([[1] * 4 + [2] * 4] * 4 + [[3] * 4 + [4] * 4] * 4)
    np.testing.assert_array_equal(label, expected_label)
    cells = {(0, 0): 0, (0, 1): 1, (1, 0): 2, (1, 1): 3}
    for (i, j), t in cells.items():
        block = np.asarray(image[4 * i : 4 * i + 4, 4 * j : 4 * j + 4])
        np.testing.assert_allclose(block, np.broadcast_to(colours[t], (4, 4, 3)), atol=1e-6)


@pytest.mark.parametrize(("rows", "cols"), [(1, 2), (2, 1)])
def test_splice_1x2_and_2x1_split_the_image_in_halves(rows, cols):
    images, labels, colours = constant_tiles(2, 6, 10)
    image, label = splice(images, labels, rows, cols)
    first, second = (np.s_[:, :5], np.s_[:, 5:]) if cols == 2 else (np.s_[:3], np.s_[3:])
    assert np.all(np.asarray(label)[first] == 1) and np.all(np.asarray(label)[second] == 2)
    np.testing.assert_allclose(
        np.asarray(image)[first],
        np.broadcast_to(colours[0], (6, 5, 3) if cols == 2 else (3, 10, 3)),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        np.asarray(image)[second],
        np.broadcast_to(colours[1], (6, 5, 3) if cols == 2 else (3, 10, 3)),
        atol=1e-6,
    )


@pytest.mark.parametrize(
    ("rows", "cols", "size"), [(3, 3, (16, 16)), (5, 7, (23, 30)), (8, 8, (20, 36))]
)
def test_splice_cells_cover_the_output_when_the_grid_does_not_divide_it(rows, cols, size):
    m = rows * cols
    images, labels, colours = constant_tiles(m, 12, 9)
    image, label = splice(images, labels, rows, cols, size=size)
    assert image.shape == (*size, 3) and label.shape == size
    h, w = size
    for t in range(m):
        i, j = divmod(t, cols)
        ys, xs = np.nonzero(np.asarray(label) == t + 1)
        # a cell: a rectangle at row i, column j, of size floor or ceil of (h/rows, w/cols)
        assert ys.min() == (i * h) // rows and ys.max() + 1 == ((i + 1) * h) // rows
        assert xs.min() == (j * w) // cols and xs.max() + 1 == ((j + 1) * w) // cols
        assert ys.size == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        np.testing.assert_allclose(
            np.asarray(image)[ys, xs], np.broadcast_to(colours[t], (ys.size, 3)), atol=1e-6
        )


@pytest.mark.parametrize(("rows", "cols"), [(1, 2), (2, 2), (4, 2)])
def test_splice_matches_jax_image_resize_per_cell(rows, cols):
    """Where the grid divides the output, each cell is the tile resized by jax.image.resize:
    antialiased bilinear for the image, nearest for the labels."""
    m, h, w = rows * cols, 16, 24
    images, labels = random_pairs(m, h, w, values=(0, 3, 7, 255))
    image, label = splice(images, labels, rows, cols)
    ch, cw = h // rows, w // cols
    for t in range(m):
        i, j = divmod(t, cols)
        cell = np.s_[i * ch : (i + 1) * ch, j * cw : (j + 1) * cw]
        want_image = jax.image.resize(images[t], (ch, cw, 3), "linear", antialias=True)
        want_label = jax.image.resize(labels[t], (ch, cw), "nearest")
        np.testing.assert_allclose(np.asarray(image)[cell], want_image, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(label)[cell], want_label)


def test_splice_upsampling_matches_jax_image_resize():
    images, labels = (x[None] for x in random_pair(8, 6, values=(1, 4)))
    image, label = splice(images, labels, 1, 1, size=(20, 15))
    np.testing.assert_allclose(image, jax.image.resize(images[0], (20, 15, 3), "linear"), atol=1e-5)
    np.testing.assert_array_equal(label, jax.image.resize(labels[0], (20, 15), "nearest"))


def test_splice_1x1_at_the_same_size_is_the_identity():
    image, label = random_pair(9, 13)
    out_image, out_label = splice(image[None], label[None], 1, 1)
    np.testing.assert_allclose(out_image, image, atol=1e-6)
    np.testing.assert_array_equal(out_label, label)


@pytest.mark.parametrize(("rows", "cols"), [(2, 2), (3, 3), (8, 8)])
def test_splice_labels_are_input_values_never_interpolated(rows, cols):
    values = (0, 3, 7, 255)
    images, labels = random_pairs(rows * cols, 16, 16, values)
    image, label = splice(images, labels, rows, cols, size=(40, 40))
    assert set(np.unique(label).tolist()) <= set(values)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0


def test_splice_jit_and_vmap_agree_with_eager():
    images, labels = random_pairs(3 * 4, 12, 12)
    images, labels = images.reshape(3, 4, 12, 12, 3), labels.reshape(3, 4, 12, 12)
    batched = jax.vmap(lambda image, label: aug.splice(image, label, 2, 2))(images, labels)
    for b in range(3):
        eager = aug.splice(images[b], labels[b], 2, 2)
        jitted = splice(images[b], labels[b], rows=2, cols=2)
        np.testing.assert_allclose(jitted[0], eager[0], atol=1e-6)
        np.testing.assert_array_equal(jitted[1], eager[1])
        np.testing.assert_allclose(batched[0][b], eager[0], atol=1e-6)
        np.testing.assert_array_equal(batched[1][b], eager[1])


@pytest.mark.unchecked("asserts the core's own error message")
def test_splice_errors():
    images, labels, _ = constant_tiles(4, 8, 8)
    with pytest.raises(ValueError, match=r"2x3 mosaic needs m = 6 pairs, got m = 4"):
        aug.splice(images, labels, 2, 3)
    with pytest.raises(ValueError, match="labels must be uint8 with shape"):
        aug.splice(images, labels.astype(jnp.int32), 2, 2)
    with pytest.raises(ValueError, match="labels must be uint8 with shape"):
        aug.splice(images, labels[:, :4], 2, 2)
    with pytest.raises(ValueError, match=r"images must be float \(m, h, w, 3\)"):
        aug.splice(images[..., :2], labels, 2, 2)
    with pytest.raises(ValueError, match="too small"):
        aug.splice(images, labels, 2, 2, size=(1, 8))
    with pytest.raises(ValueError, match="ints >= 1"):
        aug.splice(images, labels, 0, 4)


# --- gaussian noise ------------------------------------------------------------------------


def test_noise_has_the_requested_std_and_leaves_labels_alone():
    image = jnp.full((64, 64, 3), 0.5, jnp.float32)
    label = random_pair(64, 64)[1]
    noisy, same = gaussian_noise(KEY, image, label, 0.05)
    np.testing.assert_array_equal(same, label)
    diff = np.asarray(noisy) - 0.5
    assert abs(diff.std() - 0.05) < 0.05 * 0.05
    assert abs(diff.mean()) < 0.002


def test_noise_is_clipped_and_zero_sigma_is_identity():
    image, label = random_pair()
    noisy, _ = gaussian_noise(KEY, image, label, 2.0)
    assert float(noisy.min()) == 0.0 and float(noisy.max()) == 1.0
    same, _ = gaussian_noise(KEY, image, label, 0.0)
    np.testing.assert_array_equal(same, image)


# --- perspective ---------------------------------------------------------------------------


def test_unit_square_to_quad_maps_corners_and_identity():
    square = jnp.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], jnp.float32)
    np.testing.assert_array_equal(aug._unit_square_to_quad(square), np.eye(3, dtype=np.float32))
    rng = np.random.default_rng(0)
    for _ in range(5):
        quad = square + 0.2 * rng.uniform(-1.0, 1.0, (4, 2)).astype(np.float32)
        homography = jax.jit(aug._unit_square_to_quad)(quad)
        corners = jnp.concatenate([square, jnp.ones((4, 1), jnp.float32)], axis=1)
        mapped = corners @ homography.T
        np.testing.assert_allclose(mapped[:, :2] / mapped[:, 2:], quad, atol=1e-5)


def test_perspective_with_strength_zero_is_the_identity():
    image, label = random_pair(17, 23)
    out_image, out_label = perspective(KEY, image, label, 0.0)
    np.testing.assert_array_equal(out_label, label)
    np.testing.assert_allclose(out_image, image, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_perspective_keeps_image_and_labels_aligned(seed):
    image, label = two_class_scene()
    out_image, out_label = perspective(jax.random.key(seed), image, label, 0.2)
    out_image, out_label = np.asarray(out_image), np.asarray(out_label)
    assert not np.array_equal(out_label, label)  # it moved
    assert set(np.unique(out_label).tolist()) <= {1, 2, 255}
    red, blue = out_image[..., 0], out_image[..., 2]
    # a label-2 pixel's nearest source pixel is red, and carries >= 1/4 of the bilinear weight
    assert np.all(red[out_label == 2] >= 0.25 - 1e-6)
    assert np.all(blue[out_label == 1] >= 0.25 - 1e-6)
    # a pure red pixel is inside the square: all its bilinear neighbours, the nearest among them
    assert np.all(out_label[red > 1 - 1e-5] == 2)
    assert np.all(out_label[blue > 1 - 1e-5] == 1)
    # outside the source: ignore and black, and nowhere else
    outside = out_label == 255
    np.testing.assert_array_equal(np.all(out_image == 0, axis=-1), outside)
    assert np.sum(out_label == 2) > 0.5 * np.sum(np.asarray(label) == 2)


def test_perspective_moves_corners_out_to_ignore_somewhere():
    image, label = two_class_scene()
    labels = [perspective(jax.random.key(seed), image, label, 0.2)[1] for seed in range(8)]
    assert np.any(np.asarray(labels) == 255)


# --- occlusion -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_occlusion_changes_image_and_labels_on_the_same_rectangle(seed):
    h, w = 24, 20
    image = jnp.full((h, w, 3), 0.5, jnp.float32)
    label = random_pair(h, w, values=(1, 2, 255), seed=100 + seed)[1]
    out_image, out_label = occlude(jax.random.key(seed), image, label, 0.3)
    changed_image = np.any(np.asarray(out_image) != 0.5, axis=-1)
    changed_label = np.asarray(out_label) != np.asarray(label)
    np.testing.assert_array_equal(changed_image, changed_label)
    assert np.all(np.asarray(out_label)[changed_label] == 0)
    assert changed_label.sum() <= 0.3 * h * w
    if changed_label.any():
        ys, xs = np.nonzero(changed_label)
        box = np.zeros_like(changed_label)
        box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
        np.testing.assert_array_equal(changed_label, box)
        colours = np.asarray(out_image)[changed_label]
        np.testing.assert_array_equal(colours, np.broadcast_to(colours[0], colours.shape))


def test_occlusion_is_usually_visible_and_zero_fraction_is_identity():
    image, label = random_pair(values=(1, 2))
    labels = [occlude(jax.random.key(seed), image, label, 0.5)[1] for seed in range(32)]
    assert np.mean(np.any(np.asarray(labels) == 0, axis=(1, 2))) > 0.8
    out_image, out_label = occlude(KEY, image, label, 0.0)
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_label, label)


# --- errors, keys, jit and vmap for the per-pair functions ---------------------------------

PER_PAIR = [
    (aug.gaussian_noise, gaussian_noise, 0.1),
    (aug.perspective, perspective, 0.2),
    (aug.occlude, occlude, 0.4),
]


@pytest.mark.parametrize(("fn", "jitted", "param"), PER_PAIR)
def test_per_pair_same_key_same_output_other_key_other_output(fn, jitted, param):
    image, label = random_pair(values=(1, 2))
    a = jitted(jax.random.key(1), image, label, param)
    b = jitted(jax.random.key(1), image, label, param)
    c = jitted(jax.random.key(2), image, label, param)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize(("fn", "jitted", "param"), PER_PAIR)
def test_per_pair_jit_and_vmap_agree_with_eager(fn, jitted, param):
    keys = jax.random.split(KEY, 3)
    images, labels = random_pairs(3)
    eager = fn(keys[0], images[0], labels[0], param)
    once = [jitted(keys[n], images[n], labels[n], param) for n in range(3)]
    np.testing.assert_allclose(once[0][0], eager[0], atol=1e-5)
    np.testing.assert_array_equal(once[0][1], eager[1])
    batched = jax.jit(jax.vmap(fn, in_axes=(0, 0, 0, None)))(keys, images, labels, param)
    for n in range(3):
        np.testing.assert_allclose(batched[0][n], once[n][0], atol=1e-5)
        np.testing.assert_array_equal(batched[1][n], once[n][1])


@pytest.mark.parametrize(
    ("fn", "param", "message"),
    [
        (aug.gaussian_noise, -0.1, r"sigma must be in \[0.0, inf\]"),
        (aug.perspective, 0.25, r"strength must be in \[0.0, 0.25\)"),
        (aug.perspective, -0.01, r"strength must be in"),
        (aug.occlude, 1.5, r"max_fraction must be in \[0.0, 1.0\]"),
    ],
)
def test_per_pair_parameter_errors(fn, param, message):
    image, label = random_pair()
    with pytest.raises(ValueError, match=message):
        fn(KEY, image, label, param)


@pytest.mark.unchecked("asserts the core's own error message")
@pytest.mark.parametrize(("fn", "jitted", "param"), PER_PAIR)
def test_per_pair_shape_errors(fn, jitted, param):
    image, label = random_pair(8, 8)
    with pytest.raises(ValueError, match=r"label must be uint8 with shape \(8, 8\)"):
        fn(KEY, image, label[:4], param)
    with pytest.raises(ValueError, match=r"label must be uint8"):
        fn(KEY, image, label.astype(jnp.int32), param)
    with pytest.raises(ValueError, match=r"image must be float \(h, w, 3\)"):
        fn(KEY, image[..., 0], label, param)


# --- config and composition ----------------------------------------------------------------

OFF = aug.AugmentConfig(perspective_prob=0.0, occlusion_prob=0.0, noise_prob=0.0)
ALL = aug.AugmentConfig(perspective_prob=0.7, occlusion_prob=0.7, noise_prob=0.7)


def test_augment_with_nothing_enabled_is_the_identity():
    image, label = random_pair()
    out_image, out_label = augment(KEY, image, label, OFF)
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_label, label)


def test_augment_applies_each_step_as_often_as_its_probability_says():
    image, label = random_pair(values=(1, 2))
    cfg = dataclasses.replace(OFF, noise_prob=0.3)
    keys = jax.random.split(KEY, 400)
    many = jax.jit(jax.vmap(aug.augment, in_axes=(0, None, None, None)), static_argnums=3)
    images, labels = many(keys, image, label, cfg)
    chosen = np.asarray(jax.vmap(aug.choose_augmentations, in_axes=(0, None))(keys, cfg))
    changed = np.any(np.asarray(images) != np.asarray(image), axis=(1, 2, 3))
    np.testing.assert_array_equal(changed, chosen[:, 2])  # noise applied exactly when chosen
    assert not chosen[:, :2].any()  # probability 0 is never chosen
    assert np.all(np.asarray(labels) == np.asarray(label))  # noise never touches labels
    assert abs(changed.mean() - 0.3) < 0.08


def test_augment_keeps_label_values_and_is_key_driven():
    image, label = random_pair(values=(3, 5))
    outputs = [augment(jax.random.key(seed), image, label, ALL) for seed in (1, 1, 2, 3)]
    np.testing.assert_array_equal(outputs[0][0], outputs[1][0])
    np.testing.assert_array_equal(outputs[0][1], outputs[1][1])
    assert not np.array_equal(outputs[0][0], outputs[2][0])
    for out_image, out_label in outputs:
        assert set(np.unique(out_label).tolist()) <= {0, 3, 5, 255}
        assert float(out_image.min()) >= 0.0 and float(out_image.max()) <= 1.0


def test_augment_vmap_agrees_with_a_loop_and_a_new_key_does_not_retrace():
    """(jit == eager is checked per step above; augment only composes them.)"""
    keys = jax.random.split(KEY, 3)
    images, labels = random_pairs(3)
    once = [augment(keys[n], images[n], labels[n], ALL) for n in range(3)]
    batched = jax.jit(jax.vmap(aug.augment, in_axes=(0, 0, 0, None)), static_argnums=3)(
        keys, images, labels, ALL
    )
    for n in range(3):
        np.testing.assert_allclose(batched[0][n], once[n][0], atol=1e-5)
        np.testing.assert_array_equal(batched[1][n], once[n][1])
    traced = len(TRACES)
    augment(jax.random.key(9), images[1], labels[1], ALL)
    assert len(TRACES) == traced  # a new key or image does not retrace


def test_choose_grid_follows_the_weights_and_sources_are_in_range():
    cfg = aug.AugmentConfig(grids=((1, 2), (2, 2), (3, 3)), grid_weights=(1.0, 0.0, 3.0))
    keys = jax.random.split(KEY, 2000)
    picks = np.asarray(
        jax.jit(jax.vmap(aug.choose_grid, in_axes=(0, None)), static_argnums=1)(keys, cfg)
    )
    counts = np.bincount(picks, minlength=3)
    assert counts[1] == 0
    assert abs(counts[2] / counts.sum() - 0.75) < 0.04
    sources = np.asarray(aug.choose_sources(KEY, 64, 5))
    assert sources.shape == (64,) and sources.min() >= 0 and sources.max() <= 4
    assert len(set(sources.tolist())) == 5
    with pytest.raises(ValueError, match="count must be >= 1"):
        aug.choose_sources(KEY, 4, 0)


def test_default_config_is_diffumask_splicing():
    grids = dict(zip(aug.DIFFUMASK.grids, aug.DIFFUMASK.grid_weights, strict=True))
    assert set(grids) == {(1, 2), (2, 1), (2, 2), (3, 3), (5, 5), (6, 6), (7, 7), (8, 8)}
    assert grids[(1, 2)] + grids[(2, 1)] == 3000 and grids[(3, 3)] == 4000 and grids[(8, 8)] == 1000
    assert hash(aug.DIFFUMASK) == hash(aug.AugmentConfig())  # static under jit
    from_lists = aug.AugmentConfig(grids=[[1, 2], [2, 2]], grid_weights=[1, 3])
    assert from_lists.grids == ((1, 2), (2, 2)) and from_lists.grid_weights == (1, 3)
    hash(from_lists)


@pytest.mark.unchecked("asserts the core's own error message")
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"grids": ()}, "at least one"),
        ({"grids": ((0, 2),), "grid_weights": (1.0,)}, "ints >= 1"),
        ({"grids": ((2, 2),), "grid_weights": (1.0, 2.0)}, "one weight per grid"),
        ({"grids": ((2, 2),), "grid_weights": (0.0,)}, "positive sum"),
        ({"noise_prob": 1.5}, r"noise_prob must be in \[0.0, 1.0\]"),
        ({"perspective_strength": 0.3}, r"perspective_strength must be in \[0.0, 0.25\)"),
        ({"occlusion_max_fraction": -0.1}, "occlusion_max_fraction"),
        ({"noise_sigma": -1.0}, "noise_sigma"),
        ({"noise_sigma": "0.1"}, "noise_sigma must be a number"),
        ({"grids": ((2, 2),), "grid_weights": ("1",)}, "grid_weights must be a number"),
    ],
)
def test_config_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(aug.AugmentConfig(), **changes)
