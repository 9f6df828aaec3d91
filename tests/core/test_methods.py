"""The mask methods on hand-built scenes with known answers, plus invariants.

Scenes come from ``jaxmask.synthetic``: block-structured self-attention (a query attends to its
own region) and class tokens that attend to one pixel ("peak", like SD's sparse class-token
response) or to the whole object ("region"). The true label map is known at every side.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxmask
from jaxmask import methods, synthetic
from jaxmask.maps import AttentionMaps

sd = methods  # SeeDiff's building blocks are exported flat

SIDES = (4, 8, 16, 32)  # a miniature of SD's 8/16/32/64: seeds at 32/4 = 8
BOXES = ((0.125, 0.125, 0.5, 0.625), (0.625, 0.5, 0.875, 0.875))
KEY = jax.random.key(0)


def scene(mode="peak", self_layers="mean", boxes=BOXES, sides=SIDES):
    return synthetic.scene_maps(boxes, sides, KEY, mode=mode, self_layers=self_layers)


def truth(r, boxes=BOXES):
    return np.asarray(synthetic.region_labels(boxes, r))


_extract = jax.jit(jaxmask.extract_masks, static_argnums=(3, 4))


def labels_at_finest(maps, cfg, boxes=BOXES):
    """Label map at the finest side via the public composition (no resize)."""
    r = max(maps.resolutions)
    image = jnp.zeros((r, r, 3))
    _, label = _extract(maps, synthetic.class_weights(len(boxes)), image, cfg)
    return np.asarray(label)


# --- known answers -------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["seediff-code", "seediff-paper"])
def test_seediff_recovers_objects_from_peak_seeds(preset):
    cfg = methods.get(preset)
    maps = scene(self_layers=cfg.self_layers)
    np.testing.assert_array_equal(labels_at_finest(maps, cfg), truth(32))


def test_ca_alone_misses_objects_from_peak_seeds_but_finds_region_maps():
    """The SeeDiff paper's point: sparse class-token attention is not a mask."""
    peak = labels_at_finest(scene("peak"), methods.get("ca"))
    iou = np.sum((peak == 1) & (truth(32) == 1)) / np.sum((peak == 1) | (truth(32) == 1))
    assert iou < 0.5
    np.testing.assert_array_equal(labels_at_finest(scene("region"), methods.get("ca")), truth(32))


def test_ca_sa_spreads_cross_attention_over_the_object():
    cfg = methods.get("ca_sa")
    soft = cfg.apply(scene("peak"), synthetic.class_weights(2))
    assert soft.shape == (2, 16, 16)  # at the self-attention side, finest / 2
    label = jaxmask.labels.label_map(soft, cfg.fg_threshold, cfg.ignore_threshold)
    np.testing.assert_array_equal(label, truth(16))


def test_ca_sa_hand_value():
    """2x2 sides, explicit matrices: M = minmax(SA^tau @ vec(CA))."""
    sa = jnp.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.2, 0.2, 0.4, 0.2], [0.25] * 4])
    ca = jnp.zeros((1, 2, 2, 2)).at[0, 0, 0, 1].set(1.0)  # one CA layer, class token 1
    maps = AttentionMaps(cross={2: ca}, self_attn={2: sa}, resolutions=(2,))
    cfg = methods.get("ca_sa", power=2, cross_resolution=2, self_resolution=2)
    got = np.asarray(cfg.apply(maps, jnp.array([[0.0, 1.0]])))
    v = np.linalg.matrix_power(np.asarray(sa, np.float64), 2) @ np.array([1.0, 0, 0, 0])
    np.testing.assert_allclose(got.reshape(-1), (v - v.min()) / (v.max() - v.min()), atol=1e-5)


def test_expand_hand_values():
    sa = jnp.array(
        [[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.9, 0.1], [0.0, 0.0, 0.1, 0.9]]
    )
    seeds = jnp.array([[True, False], [False, False]])
    np.testing.assert_allclose(sd.expand(sa, seeds, "mean_rows"), [[1.0, 1.0], [0.0, 0.0]])
    np.testing.assert_allclose(sd.expand(sa, seeds, "cosine"), [[1.0, 1.0], [0.0, 0.0]])
    seeds2 = jnp.array([[False, False], [True, False]])  # seed at query 2
    # mean_rows: row 2 = (0, 0, .9, .1) -> minmax -> (0, 0, 1, 1/9)
    np.testing.assert_allclose(
        sd.expand(sa, seeds2, "mean_rows").reshape(-1), [0, 0, 1, 1 / 9], rtol=1e-5
    )
    # cosine: cos(row_j, row_2) = (0, 0, 1, .18/.82)
    np.testing.assert_allclose(
        sd.expand(sa, seeds2, "cosine").reshape(-1), [0, 0, 1, 0.18 / 0.82], rtol=1e-5
    )


def test_seed_rules():
    m = jnp.array([[0.0, 0.6], [0.75, 1.0]])
    np.testing.assert_array_equal(sd.initial_seeds(m, "alpha", 0.6), [[0, 1], [1, 1]])
    np.testing.assert_array_equal(sd.initial_seeds(m, "alpha_squared", 0.5), [[0, 0], [1, 1]])
    np.testing.assert_array_equal(sd.background_seeds(m, "alpha", 0.5), [[1, 0], [0, 0]])
    thr = float(sd.seed_threshold(m, "otsu_squared", 0.5, otsu="float"))
    from skimage.filters import threshold_otsu

    assert thr == pytest.approx(threshold_otsu(np.asarray(m) ** 2), rel=1e-5)
    np.testing.assert_array_equal(
        sd.initial_seeds(m, "otsu_squared", 0.5, otsu="float"), np.asarray(m) ** 2 > thr
    )


def test_otsu_cv2_seeds_are_the_codes():
    """The code: ``cv2.threshold((m*m*255).astype(uint16), 0, 255, BINARY + OTSU) > 0``."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:16, :16]
    for _ in range(30):
        cy, cx = rng.uniform(0, 16, 2)
        m = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / rng.uniform(4, 40)) + 0.2 * rng.random(
            (16, 16)
        )
        m = ((m - m.min()) / (m.max() - m.min()) * rng.uniform(0.9, 1.25)).astype(np.float32)
        levels = (m * m * 255).astype(np.uint16)  # values above 255 where m > 1 (overshoot)
        _, want = cv2.threshold(levels, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        got = sd.initial_seeds(jnp.asarray(m), "otsu_squared", 0.5)  # otsu="cv2", the default
        np.testing.assert_array_equal(got, want > 0)
        np.testing.assert_array_equal(
            sd.background_seeds(jnp.asarray(m), "otsu_squared", 0.5), want == 0
        )
        np.testing.assert_array_equal(sd.seed_score(jnp.asarray(m), "otsu_squared"), levels)


# --- fallbacks and errors -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(methods.PRESETS))
def test_flat_maps_and_absent_classes_give_empty_masks_never_nan(name):
    cfg = methods.get(name)
    maps = scene(self_layers=getattr(cfg, "self_layers", "mean"))
    flat = jax.tree_util.tree_map(jnp.ones_like, maps)
    flat = dataclasses.replace(
        flat, self_attn={r: a / a.shape[0] for r, a in flat.self_attn.items()}
    )
    for m, w in ((flat, synthetic.class_weights(2)), (maps, jnp.zeros((2, 8)))):
        soft, label = jaxmask.extract_masks(m, w, jnp.zeros((32, 32, 3)), cfg)
        assert np.all(np.isfinite(np.asarray(soft)))
        assert np.all(np.asarray(label) == 0)


@pytest.mark.unchecked("asserts the core's own error message")
def test_config_errors():
    with pytest.raises(ValueError, match="unknown method 'sam'"):
        methods.get("sam")
    with pytest.raises(ValueError, match="has no parameter"):
        methods.get("ca", beta=0.3)
    with pytest.raises(ValueError, match=r"beta|fg_threshold must lie in \[0, 1\]"):
        methods.get("seediff-code", beta=1.5)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        methods.get("seediff-paper", alpha=-0.1)
    with pytest.raises(ValueError, match="must not exceed fg_threshold"):
        methods.get("ca_sa", ignore_threshold=0.7)
    with pytest.raises(ValueError, match="seed_rule must be one of"):
        methods.get("seediff-code", seed_rule="median")
    with pytest.raises(ValueError, match="needs self-attention from 'first_up'"):
        methods.get("seediff-code").apply(scene(self_layers="mean"), synthetic.class_weights(2))
    with pytest.raises(ValueError, match="needs attention at side 8"):
        methods.get("ca_sa").capture_spec((16, 32))


def test_capture_specs_for_sd_sides():
    sd_sides = (8, 16, 32, 64)
    assert methods.get("ca").capture_spec(sd_sides).cross == (16, 32, 64)
    spec = methods.get("ca_sa").capture_spec(sd_sides)
    assert (spec.cross, spec.self_attn, spec.self_layers) == ((16,), (32,), "mean")
    spec = methods.get("seediff-code").capture_spec(sd_sides)
    assert (spec.cross, spec.self_attn, spec.self_layers) == ((16,), (16, 32, 64), "first_up")
    assert methods.get("seediff-paper").capture_spec(sd_sides).step_norm == "max"


def test_default_sides_on_a_unet_whose_finest_quarter_attends_only_in_the_mid_block():
    """A 3-level UNet with an UpBlock2D first: attention at 4 (mid only), 8 and 16. SeeDiff's
    code reads the first up-block layer, which exists at 8 and 16 only: its seeds move to 8."""
    layout = jaxmask.Layout((4, 8, 16), first_up=(8, 16), heads=(2, 2, 2))
    code = methods.get("seediff-code")
    assert code.sides(layout) == (8, 16)
    spec = code.capture_spec(layout)
    assert (spec.cross, spec.self_attn, spec.self_layers) == ((8,), (8, 16), "first_up")
    # the paper's layer mean has a self layer at 4 (the mid block): finest / 4 as usual
    assert methods.get("seediff-paper").sides(layout) == (4, 8, 16)
    # an explicit side without the layer fails before sampling, naming the parameter
    with pytest.raises(
        ValueError, match=r"seed_resolution=4 has no first up-block self-attention layer"
    ):
        methods.get("seediff-code", seed_resolution=4).capture_spec(layout)
    with pytest.raises(ValueError, match="set self_layers='mean'"):
        code.sides(jaxmask.Layout((4, 8), first_up=()))
    # SD's own sides keep finest / 4, and a plain tuple means every side has every layer
    assert code.sides(jaxmask.Layout((8, 16, 32, 64), first_up=(16, 32, 64))) == (16, 32, 64)
    assert code.sides((8, 16, 32, 64)) == (16, 32, 64)
    # without attention at finest / 4 at all (the 2-level tiny SD: 8, 16): name the field
    with pytest.raises(ValueError, match="needs attention at side 4.*seed_resolution"):
        code.sides((8, 16))
    assert methods.get("seediff-code", seed_resolution=8).sides((8, 16)) == (8, 16)
    # the other methods run there too (ca, ca_sa) or name their parameter
    assert methods.get("ca").capture_spec(layout).cross == (4, 8, 16)
    spec = methods.get("ca_sa").capture_spec(layout)
    assert (spec.cross, spec.self_attn) == ((4,), (8,))
    with pytest.raises(ValueError, match="cross_resolution"):
        methods.get("ca_sa").capture_spec((8, 16))


def test_seediff_reads_the_head_count_from_the_layout():
    """The flat-layer guard tests the head sum's variance against 1e-4. A weak layer that
    sees the second object (head-mean variance ~7e-6: above 1e-4 / 64, below 1e-4) is kept
    with 8 heads, so both objects are seeded, and muted with one head, so only the first is."""
    r = 16
    boxes = ((0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0))
    labels = synthetic.region_labels(boxes, r)
    sa = synthetic.block_self_attention(labels)
    first = (labels == 1).astype(jnp.float32)
    second = (labels == 2).astype(jnp.float32)
    t = 3  # tokens: BOS, the class, another
    strong = jnp.stack([1 - 0.5 * first, 0.5 * first, jnp.zeros((r, r))], -1)
    weak = jnp.stack([0.75 - 0.006 * second, 0.25 + 0.006 * second, jnp.zeros((r, r))], -1)
    assert 1e-4 / 64 < float(jnp.var(weak[..., 1])) < 1e-4
    cross = jnp.stack([strong, weak])  # (l=2, r, r, t)
    w = jnp.eye(t, dtype=jnp.float32)[1:2]
    cfg = methods.get("seediff-code", seed_resolution=r)
    found = {}
    for heads in (1, 8):
        maps = AttentionMaps(
            cross={r: cross},
            self_attn={r: sa},
            self_layers="first_up",
            resolutions=(r,),
            layout=jaxmask.Layout((r,), heads=(heads,)),
        )
        _, label = jaxmask.extract_masks(maps, w, jnp.zeros((r, r, 3)), cfg)
        found[heads] = np.asarray(label)
    np.testing.assert_array_equal(found[8], np.asarray(labels > 0))
    np.testing.assert_array_equal(found[1], np.asarray(labels == 1))


# --- transformations: jit, vmap, recompiles ------------------------------------------------


@pytest.mark.parametrize("name", sorted(methods.PRESETS))
def test_jit_equals_eager_and_vmap_equals_loop(name):
    cfg = methods.get(name)
    keys = jax.random.split(KEY, 3)
    batch = [
        synthetic.scene_maps(BOXES, SIDES, k, self_layers=getattr(cfg, "self_layers", "mean"))
        for k in keys
    ]
    w = synthetic.class_weights(2)
    images = jnp.zeros((3, 24, 24, 3))
    stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *batch)
    f = jax.jit(jax.vmap(jaxmask.extract_masks, in_axes=(0, None, 0, None)), static_argnums=3)
    soft_b, label_b = f(stacked, w, images, cfg)
    for i, m in enumerate(batch):
        soft, label = jaxmask.extract_masks(m, w, images[i], cfg)
        np.testing.assert_allclose(soft_b[i], soft, atol=2e-5)
        np.testing.assert_array_equal(label_b[i], label)


def test_no_recompile_on_new_values():
    cfg = methods.get("seediff-code")
    f = jax.jit(jaxmask.extract_masks, static_argnums=3)
    w = synthetic.class_weights(2)
    f(scene(self_layers="first_up"), w, jnp.zeros((32, 32, 3)), cfg)
    before = f._cache_size()
    other = synthetic.scene_maps(BOXES, SIDES, jax.random.key(9), self_layers="first_up")
    f(other, w * 1.0, jnp.ones((32, 32, 3)), cfg)
    assert f._cache_size() == before


# --- property: equivariance under spatial permutations ---------------------------------------


def _permute_maps(maps, perms):
    """Apply one spatial permutation per side to cross rows/cols and self rows and columns."""
    cross = {
        r: c.reshape(c.shape[0], r * r, -1)[:, perms[r]].reshape(c.shape)
        for r, c in maps.cross.items()
    }
    self_attn = {r: a[perms[r]][:, perms[r]] for r, a in maps.self_attn.items()}
    return dataclasses.replace(maps, cross=cross, self_attn=self_attn)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), expansion=st.sampled_from(["cosine", "mean_rows"]))
def test_seediff_single_side_equivariant_under_any_permutation(seed, expansion):
    """With one side there is no resize, so SeeDiff commutes with every pixel permutation."""
    key = jax.random.key(seed)
    r = 6
    cross = jax.random.uniform(key, (2, r, r, 5))
    sa = jax.nn.softmax(3 * jax.random.normal(jax.random.fold_in(key, 1), (r * r, r * r)), axis=1)
    maps = AttentionMaps(cross={r: cross}, self_attn={r: sa}, self_layers="mean", resolutions=(r,))
    cfg = methods.get("seediff-paper", seed_resolution=r, expansion=expansion)
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, 2), r * r))
    w = jnp.eye(5, dtype=jnp.float32)[1:3]
    out = np.asarray(cfg.apply(maps, w)).reshape(2, -1)
    out_p = np.asarray(cfg.apply(_permute_maps(maps, {r: perm}), w)).reshape(2, -1)
    np.testing.assert_allclose(out_p, out[:, perm], atol=1e-4)


@pytest.mark.parametrize("name", ["seediff-code", "seediff-paper"])
@pytest.mark.parametrize("op", ["flip_h", "flip_v", "transpose"])
def test_seediff_cascade_equivariant_under_dihedral_permutations(name, op):
    """Flips and the transpose commute with the separable resize of the 16->32->64 cascade."""
    cfg = methods.get(name)
    maps = synthetic.scene_maps(
        BOXES, SIDES, jax.random.key(3), mode="region", self_layers=cfg.self_layers
    )
    grid = {
        "flip_h": lambda g: g[:, ::-1],
        "flip_v": lambda g: g[::-1],
        "transpose": lambda g: g.T,
    }[op]
    perms = {r: grid(np.arange(r * r).reshape(r, r)).reshape(-1) for r in SIDES}
    w = synthetic.class_weights(2)
    out = np.asarray(cfg.apply(maps, w))
    out_p = np.asarray(cfg.apply(_permute_maps(maps, perms), w))
    expect = np.stack([grid(o) for o in out])
    np.testing.assert_allclose(out_p, expect, atol=1e-4)
