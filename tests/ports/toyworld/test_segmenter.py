"""The quality oracle's segmenter: it learns, ignores 255, round-trips through a file."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ports.toyworld import segmenter

SMALL = segmenter.SegmenterConfig(features=(8, 16), num_classes=3)


def colour_task(n: int, size: int = 32, seed: int = 0):
    """Piecewise-constant 4x4 blocks of random colours; the label thresholds the red channel
    (< 85: 0, < 170: 1, else 2), kept 20 levels away from the thresholds: separable pixel by
    pixel with a margin."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n, size // 4, size // 4, 3))
    red = rng.integers(0, 3, blocks.shape[:3]) * 85 + rng.integers(10, 66, blocks.shape[:3])
    blocks[..., 0] = red
    images = np.repeat(np.repeat(blocks, 4, axis=1), 4, axis=2).astype(np.uint8)
    labels = np.digitize(images[..., 0], [85, 170]).astype(np.uint8)
    return images, labels


def test_learns_a_separable_task():
    images, labels = colour_task(64)
    params, losses = segmenter.train(
        (images, labels), 250, 8, jax.random.key(0), cfg=SMALL, lr=1e-2, progress=False
    )
    assert losses.shape == (250,) and losses[-10:].mean() < losses[:10].mean() / 4
    test_images, test_labels = colour_task(16, seed=1)
    pred = segmenter.predict(params, test_images, cfg=SMALL)
    scores = segmenter.scores(segmenter.confusion(test_labels, pred, num_classes=3))
    assert scores["miou"] > 0.9, scores


def test_ignored_pixels_have_no_effect():
    params = segmenter.init(jax.random.key(0), 16, SMALL)
    images, labels = colour_task(2, size=16)
    ignored = labels.copy()
    ignored[:, :8] = segmenter.IGNORE

    # known answer: the mean cross-entropy over the labelled pixels only
    logits = segmenter.apply(params, images, SMALL)
    logp = jax.nn.log_softmax(logits)
    picked = np.take_along_axis(np.asarray(logp), labels[..., None].astype(np.int64), -1)[..., 0]
    expected = -picked[:, 8:].mean()
    np.testing.assert_allclose(segmenter.loss(params, images, ignored, SMALL), expected, rtol=1e-5)

    # the gradient is that of the hand-written loss over the labelled pixels alone
    def by_hand(p):
        logp = jax.nn.log_softmax(segmenter.apply(p, images, SMALL))
        onehot = jax.nn.one_hot(labels[:, 8:], 3)
        return -jnp.mean(jnp.sum(logp[:, 8:] * onehot, -1))

    grad = jax.grad(segmenter.loss)
    got, want = grad(params, images, ignored, SMALL), jax.grad(by_hand)(params)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)

    # all ignored: zero loss, exactly zero gradient
    everything = np.full_like(labels, segmenter.IGNORE)
    assert float(segmenter.loss(params, images, everything, SMALL)) == 0.0
    zero = grad(params, images, everything, SMALL)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(zero))


def test_training_is_deterministic_and_save_load_round_trips(tmp_path):
    images, labels = colour_task(8, size=16)
    a, la = segmenter.train((images, labels), 3, 4, jax.random.key(3), cfg=SMALL, progress=False)
    b, lb = segmenter.train((images, labels), 3, 4, jax.random.key(3), cfg=SMALL, progress=False)
    np.testing.assert_array_equal(la, lb)
    path = segmenter.save(tmp_path / "seg.msgpack", a, SMALL)
    loaded, cfg = segmenter.load(path)
    assert cfg == SMALL
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(loaded), strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(
        segmenter.predict(a, images, cfg=SMALL), segmenter.predict(loaded, images, cfg=cfg)
    )
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_train_from_an_iterator_of_batches():
    images, labels = colour_task(12, size=16)
    batches = ((images[i : i + 4], labels[i : i + 4]) for i in range(0, 12, 4))
    seen = []
    _, losses = segmenter.train(
        batches, 3, 4, jax.random.key(0), cfg=SMALL, progress=lambda d, v: seen.append(d)
    )
    assert losses.shape == (3,) and seen[-1] == 3


def test_shapes_and_errors():
    params = segmenter.init(jax.random.key(0), 64)
    assert segmenter.apply(params, np.zeros((2, 64, 64, 3), np.uint8)).shape == (2, 64, 64, 9)
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert 100_000 < n < 300_000
    with pytest.raises(ValueError, match="multiples of 8"):
        segmenter.apply(params, np.zeros((1, 60, 60, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\(b, h, w\)"):
        segmenter.loss(params, np.zeros((1, 64, 64, 3)), np.zeros((1, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="multiples of groups"):
        segmenter.SegmenterConfig(features=(12,))
    with pytest.raises(ValueError, match="steps and batch"):
        segmenter.train((np.zeros((1, 64, 64, 3)), np.zeros((1, 64, 64))), 0, 1, jax.random.key(0))


def test_scores_known_confusion():
    conf = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    s = segmenter.scores(conf)
    assert s["iou"][0] == pytest.approx(0.75) and s["iou"][1] == pytest.approx(2 / 3)
    assert s["iou"][2] is None and s["miou"] == pytest.approx((0.75 + 2 / 3) / 2)
    assert s["pixel_accuracy"] == pytest.approx(5 / 6)
    labels = np.array([[[0, 1, 255]]], np.uint8)
    np.testing.assert_array_equal(
        segmenter.confusion(labels, np.array([[[0, 0, 1]]], np.uint8), 2), [[1, 0], [1, 0]]
    )


def test_optimizer_schedule_warms_up():
    tx = segmenter.optimizer(100, lr=1e-2)
    state = tx.init({"w": jnp.zeros(())})
    updates, _ = tx.update({"w": jnp.ones(())}, state, {"w": jnp.zeros(())})
    assert float(jnp.abs(updates["w"])) == 0.0  # step 0 of the warmup: lr 0
