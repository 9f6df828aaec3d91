"""The sampler split over a data mesh (4 simulated CPU devices, see tests/conftest.py) gives the
same images and maps as on one device."""

import jax
import numpy as np
import pytest

from jaxmask.maps import CaptureSpec
from ports.scale.mesh import data_mesh
from ports.sd.load import load
from ports.sd.sample import Sampler
from ports.sd.tokenizer import tokenize

pytest.importorskip("torch")  # the tiny checkpoint is written with PyTorch diffusers


def test_sharded_batch_equals_single_device(tiny_sd_path):
    sd = load(tiny_sd_path)
    mesh = data_mesh()
    assert mesh.devices.size == 4
    prompts = ["a photo of a cat", "a dog", "a red cat", "a photo of a dog"]
    ids, neg = tokenize(sd.tokenizer, prompts), tokenize(sd.tokenizer, [""] * 4)
    spec = CaptureSpec(cross=(8,), self_attn=(16,))
    key = jax.random.key(3)
    plain = Sampler(sd)(ids, neg, key, steps=3, spec=spec)
    sharded = Sampler(sd, mesh=mesh)(ids, neg, key, steps=3, spec=spec)
    assert len(sharded.images.sharding.device_set) == 4  # the work really was split
    np.testing.assert_allclose(sharded.images, plain.images, atol=1e-5)
    np.testing.assert_allclose(sharded.maps.self_attn[16], plain.maps.self_attn[16], atol=1e-6)
    with pytest.raises(ValueError, match="not a multiple of the 4 devices"):
        Sampler(sd, mesh=mesh)(ids[:3], neg[:3], key, steps=3)
