"""ports.api (``jaxmask.load`` / ``jaxmask.generate``) end to end on the tiny SD 1.x checkpoint:
shapes and dtypes, label values, determinism, batch-size independence, no recompiles, the errors.
"""

import dataclasses
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
    with pytest.raises(ValueError, match="needs attention at side 4.*seed_resolution"):
        pipe.generate(PROMPTS, 0, classes=CLASSES)  # the default SeeDiff on tiny
    with pytest.raises(ValueError, match="needs attention at side 4.*cross_resolution"):
        generate(classes=CLASSES, method="ca_sa")  # the default ca_sa on tiny: no CA at 16 / 4
    with pytest.raises(ValueError, match="seed_resolution=4 has no first up-block"):
        generate(classes=CLASSES, method=jaxmask.methods.get("seediff-code", seed_resolution=4))
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


def test_a_class_the_prompt_lacks_is_refused_before_sampling(pipe):
    """Holds in any test order: the cache-size check above cannot see work whose program an
    earlier test compiled, so here the sampler itself refuses to run."""

    class Refuses:
        def __getattr__(self, name):
            return getattr(pipe.sampler, name)

        def __call__(self, *args, **kwargs):
            raise AssertionError("sampled before the classes were checked")

    refusing = api.Pipeline(pipe.sd)
    refusing.sampler = Refuses()
    with pytest.raises(ValueError, match=r"'cat' does not occur"):
        refusing.generate(PROMPTS, 0, classes="cat", method=METHOD, steps=STEPS)


# --- every method's default on every UNet ``load`` accepts ------------------------------------


def _defaults_run_or_name_a_parameter(pipe) -> dict:
    """Each preset's default spec on ``pipe``'s UNet, or the ValueError it raises (which must name
    the parameter to set). A spec that is returned only asks for layers the UNet has: its sides
    are attention sides, and a ``first_up`` spec's self sides have a first up-block layer."""
    layout = pipe.layout()
    specs = {}
    for name in sorted(jaxmask.methods.PRESETS):
        cfg = jaxmask.methods.get(name)
        try:
            spec = cfg.capture_spec(layout)
        except ValueError as error:
            fields = {f.name for f in dataclasses.fields(cfg)}
            assert any(f in str(error) for f in fields if f.endswith("resolution")), error
            continue
        assert set(spec.cross) | set(spec.self_attn) <= set(layout.sides)
        if spec.self_layers == "first_up":
            assert set(spec.self_attn) <= set(layout.first_up)
        specs[name] = spec
    return specs


def test_default_methods_on_the_tiny_unet(pipe):
    """Attention at 8 and 16 only: finest / 4 = 4 does not exist. ca uses both sides; SeeDiff
    names seed_resolution and ca_sa cross_resolution, before sampling."""
    specs = _defaults_run_or_name_a_parameter(pipe)
    assert sorted(specs) == ["ca"]


@pytest.fixture(scope="module")
def pipe3(tiny_sd3_path):
    return api.load(tiny_sd3_path)


def test_seediff_code_default_on_a_unet_without_a_first_up_layer_at_finest_quarter(pipe3):
    """3 levels, an UpBlock2D first: at 4 = 16 / 4 only the mid block attends. The default
    SeeDiff-code used to ask for a first up-block layer at 4 and fail inside the sampler."""
    assert pipe3.layout() == jaxmask.Layout((4, 8, 16), first_up=(8, 16), heads=(2, 2, 2))
    result = pipe3.generate(
        "a photo of a cat", 0, classes="cat", method="seediff-code", steps=2, return_maps=True
    )
    assert sorted(result.maps.self_attn) == [8, 16] and sorted(result.maps.cross) == [8]
    assert result.maps.layout == pipe3.layout()
    assert result.label_maps.shape == (1, 64, 64) and np.isfinite(result.soft_masks).all()
    assert set(np.unique(result.label_maps)) <= {0, 1}


def test_every_default_runs_on_the_three_level_unet(pipe3):
    """One sampling pass captures every preset's default spec; each method's masks come out."""
    from ports.sd.tokenizer import class_ids, tokenize

    specs = _defaults_run_or_name_a_parameter(pipe3)
    assert sorted(specs) == sorted(jaxmask.methods.PRESETS)  # all four run here
    names = sorted(specs)
    ids = tokenize(pipe3.sd.tokenizer, ["a photo of a cat"])
    samples = pipe3.sampler(
        ids,
        tokenize(pipe3.sd.tokenizer, [""]),
        jax.random.key(0),
        steps=2,
        spec=tuple(specs[n] for n in names),
    )
    weights = jaxmask.class_token_weights(ids[0], [class_ids(pipe3.sd.tokenizer, "cat")], ["cat"])
    for name, maps in zip(names, samples.maps, strict=True):
        one = jax.tree_util.tree_map(lambda x: x[0], maps)
        soft, label = jaxmask.extract_masks(
            one, jax.numpy.asarray(weights), samples.images[0], jaxmask.methods.get(name)
        )
        assert soft.shape == (1, 64, 64) and np.isfinite(np.asarray(soft)).all(), name
        assert set(np.unique(np.asarray(label))) <= {0, 1, 255}, name
