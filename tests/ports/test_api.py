"""ports.api (``jaxmask.load`` / ``jaxmask.generate``) end to end on the tiny SD 1.x checkpoint:
shapes and dtypes, label values, determinism, batch-size independence, no recompiles, the errors.
"""

import os

import jax
import numpy as np
import pytest

import jaxmask
from ports import api

pytest.importorskip("torch")  # the tiny checkpoint is written with PyTorch

pytestmark = [
    # diffusers' PyTorch loaders, on these machines without accelerate/torchvision
    pytest.mark.filterwarnings("ignore::UserWarning:diffusers.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:transformers.*"),
]

PROMPTS = ["a photo of a cat", "a red dog on the table"]
CLASSES = [["cat"], ["dog"]]
STEPS = 3
# the tiny UNet attends at 8 and 16: SeeDiff's default seed side (finest / 4 = 4) does not exist
METHOD = jaxmask.methods.get("seediff-code", seed_resolution=8)


@pytest.fixture(scope="module")
def pipe(tiny_sd_path):
    # the pipeline jaxmask.generate(model=tiny_sd_path) caches: both share compiled programs
    return api._cached_pipeline(os.fspath(tiny_sd_path), "float32")


@pytest.fixture(scope="module")
def batch_of_two(pipe, tiny_sd_path):
    kwargs = {"classes": CLASSES, "method": METHOD, "steps": STEPS, "return_maps": True}
    first = jaxmask.generate(PROMPTS, jax.random.key(0), model=tiny_sd_path, **kwargs)
    compiled = pipe.sampler.cache_size()
    again = pipe.generate(PROMPTS, jax.random.key(0), **kwargs)
    assert pipe.sampler.cache_size() == compiled  # same shapes: no recompile
    return first, again


def test_facade():
    assert jaxmask.generate is api.generate and jaxmask.load is api.load
    assert jaxmask.Pipeline is api.Pipeline and jaxmask.GenerateResult is api.GenerateResult


def test_shapes_dtypes_and_label_values(batch_of_two):
    result, _ = batch_of_two
    assert result.images.shape == (2, 64, 64, 3) and result.images.dtype == np.uint8
    assert result.label_maps.shape == (2, 64, 64) and result.label_maps.dtype == np.uint8
    assert result.soft_masks.shape == (2, 1, 64, 64) and result.soft_masks.dtype == np.float32
    assert set(np.unique(result.label_maps)) <= {0, 1, 255}
    assert np.all((result.soft_masks >= 0) & (result.soft_masks <= 1))
    assert result.classes == (("cat",), ("dog",)) and result.prompts == tuple(PROMPTS)
    maps = result.maps
    assert maps.cross[8].shape == (2, 4, 8, 8, 77) and isinstance(maps.cross[8], np.ndarray)
    assert maps.self_attn[16].shape == (2, 256, 256) and maps.self_layers == METHOD.self_layers
    assert maps.resolutions == (8, 16)
    assert "images 2x64x64" in repr(result)


def test_same_key_same_result(batch_of_two):
    first, again = batch_of_two
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.label_maps, again.label_maps)
    np.testing.assert_array_equal(first.soft_masks, again.soft_masks)


@pytest.fixture(scope="module")
def alone(pipe):
    """Prompt 0 in a batch of one."""
    return pipe.generate(
        PROMPTS[0], jax.random.key(0), classes="cat", method=METHOD, steps=STEPS, return_maps=True
    )


def test_batch_size_does_not_change_an_item(pipe, batch_of_two, alone):
    """Item 0 alone equals item 0 of the batch of two (its noise is fold_in(key, 0) either way)."""
    pair, _ = batch_of_two
    assert alone.images.shape == (1, 64, 64, 3)
    assert np.abs(alone.images[0].astype(int) - pair.images[0].astype(int)).max() <= 1
    np.testing.assert_allclose(alone.maps.cross[8][0], pair.maps.cross[8][0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(alone.soft_masks[0], pair.soft_masks[0], rtol=0, atol=1e-3)
    assert np.mean(alone.label_maps[0] == pair.label_maps[0]) > 0.99
    # a different key gives a different image
    other = pipe.generate(PROMPTS[0], jax.random.key(1), classes="cat", method=METHOD, steps=STEPS)
    assert not np.array_equal(other.images, alone.images)


def test_without_classes_no_masks(pipe, alone):
    """classes=None: images (and maps when asked) but no masks; same image as with masks."""
    compiled = pipe.sampler.cache_size()
    result = pipe.generate(PROMPTS[0], 0, method=METHOD, steps=STEPS, return_maps=True)
    assert pipe.sampler.cache_size() == compiled  # same spec as ``alone``: its program is reused
    assert result.label_maps is None and result.soft_masks is None and result.classes == ((),)
    np.testing.assert_array_equal(result.images, alone.images)
    np.testing.assert_array_equal(result.maps.cross[8], alone.maps.cross[8])


def test_errors(pipe):
    def generate(**kwargs):
        return pipe.generate(PROMPTS, 0, **{"method": METHOD, "steps": STEPS, **kwargs})

    compiled = pipe.sampler.cache_size()
    with pytest.raises(ValueError, match=r"prompt 'a red dog on the table': 'cat' does not occur"):
        generate(classes="cat")
    with pytest.raises(
        ValueError, match=r"multiple of 8, e\.g\. 32, 56, 64, 72, 128 \(native 64\)"
    ):
        generate(height=60)
    with pytest.raises(ValueError, match="height 64 != width 128"):
        generate(height=64, width=128)
    with pytest.raises(
        ValueError, match="needs attention at side 4"
    ):  # the default SeeDiff on tiny
        pipe.generate(PROMPTS, 0, classes=CLASSES)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        generate(classes=CLASSES, method="nope")
    with pytest.raises(ValueError, match="unknown scheduler 'euler'"):
        generate(scheduler="euler")
    with pytest.raises(ValueError, match="one list per prompt"):
        generate(classes=[["cat"]])
    with pytest.raises(ValueError, match="same number of classes"):
        generate(classes=[["cat"], ["dog", "table"]])
    with pytest.raises(ValueError, match="negative_prompt has 3 entries for 2 prompts"):
        generate(negative_prompt=["", "", ""])
    with pytest.raises(ValueError, match="prompts is empty"):
        pipe.generate([], 0)
    assert pipe.sampler.cache_size() == compiled  # every error is raised before sampling
