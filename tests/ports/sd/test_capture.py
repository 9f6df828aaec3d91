"""ports.sd.capture: the interceptor's UNet output equals diffusers' own attention, and the maps it
captures in one UNet call equal the probabilities a PyTorch attention processor records on the same
weights and inputs (every expected value comes from PyTorch or from diffusers' own Flax attention).

``MapRecorder`` and ``expected_maps`` are the PyTorch reference, shared with test_sample.py.
"""

import math
import re
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmask.maps import CaptureSpec
from ports.sd.capture import (
    MAPS,
    Layer,
    conditional_head_mean,
    intercept_attention,
    parse_layer,
    step_maps,
)

torch = pytest.importorskip("torch")

pytestmark = [
    # diffusers' PyTorch loaders, on these machines without accelerate/torchvision
    pytest.mark.filterwarnings("ignore::UserWarning:diffusers.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:transformers.*"),
]

BATCH = 2  # prompts: the UNet sees 2 * BATCH ([unconditional; conditional])
LATENT = 16


# ------------------------------------------------------------------------- PyTorch reference


class _RecordingProcessor:
    """diffusers' classic ``AttnProcessor`` (explicit softmax) that also records, per call, the
    head-mean probabilities of the conditional (second) half of the batch, as float64 numpy."""

    def __init__(self, store, name):
        self.store, self.name = store, name

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None
    ):
        assert hidden_states.ndim == 3 and attn.spatial_norm is None and attn.group_norm is None
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, None)  # (batch * heads, q, k), batch-major
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        per_head = probs.reshape(batch, attn.heads, *probs.shape[1:])
        self.store[self.name].append(per_head[batch // 2 :].double().mean(dim=1).numpy())
        return out / attn.rescale_output_factor


class MapRecorder:
    """Installs ``_RecordingProcessor`` on every attention layer of a PyTorch UNet.

    ``calls[name]`` lists, per UNet call, ``(b, q, k)`` for the layer ``name``
    (``"down_blocks.0.attentions.0.transformer_blocks.0.attn2"``).
    """

    def __init__(self, unet):
        self.calls = defaultdict(list)
        unet.set_attn_processor(
            {
                name: _RecordingProcessor(self.calls, name.removesuffix(".processor"))
                for name in unet.attn_processors
            }
        )


_TORCH_LAYER = re.compile(
    r"^(down_blocks|mid_block|up_blocks)(?:\.(\d+))?"
    r"\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.(attn[12])$"
)


def _torch_order(name):
    """(place, block, attention, transformer): diffusers' module order, written independently."""
    place, block, attention, transformer, _ = _TORCH_LAYER.match(name).groups()
    return (
        {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}[place],
        int(block or 0),
        int(attention),
        int(transformer),
    )


def _normalize(step, kind, step_norm):
    """SeeDiff Eq. 5's per-(layer, step) ``A / max A``, written independently of the core."""
    if step_norm == "none":
        return step
    if kind == "cross":  # each token's spatial map by its own max
        top = step.max(axis=1, keepdims=True)
    else:  # a self map by its global max
        top = step.max(axis=(1, 2), keepdims=True)
    return np.where(top > 1e-12, step / np.maximum(top, 1e-12), 0.0)


def expected_maps(calls, spec: CaptureSpec):
    """What the sampler should return for ``spec`` from a PyTorch run's recorded probabilities:
    ``(cross {r: (b, l, r, r, t)}, self {r: (b, n, n)})``, mean over the captured calls."""
    names = sorted(calls, key=_torch_order)
    num_calls = len(calls[names[0]])
    mask = spec.steps_mask(num_calls)
    chosen = [i for i in range(num_calls) if mask[i]]

    def mean_over_steps(name, kind):
        steps = [_normalize(calls[name][i], kind, spec.step_norm) for i in chosen]
        return np.mean(steps, axis=0)

    cross, self_attn = {}, {}
    for r in spec.cross:
        layers = [n for n in names if n.endswith("attn2") and calls[n][0].shape[1] == r * r]
        stacked = np.stack([mean_over_steps(n, "cross") for n in layers], axis=1)  # (b, l, n, t)
        cross[r] = stacked.reshape(stacked.shape[0], len(layers), r, r, stacked.shape[-1])
    for r in spec.self_attn:
        layers = [n for n in names if n.endswith("attn1") and calls[n][0].shape[1] == r * r]
        if spec.self_layers == "first_up":
            layers = [
                n
                for n in layers
                if re.match(r"^up_blocks\.\d+\.attentions\.0\.transformer_blocks\.0\.", n)
            ]
            assert len(layers) == 1, layers
        self_attn[r] = np.mean([mean_over_steps(n, "self") for n in layers], axis=0)
    return cross, self_attn


def assert_maps_close(actual, expected, rel):
    """Compare ``(cross, self)`` dicts: ``max |got - want| <= rel * max |want|`` per map; returns
    the worst such relative error."""
    worst = 0.0
    for got, want in zip(actual, expected, strict=True):
        assert sorted(got) == sorted(want)
        for r in want:
            got_r = np.asarray(got[r], np.float64)
            assert got_r.shape == want[r].shape, (r, got_r.shape, want[r].shape)
            error = float(np.abs(got_r - want[r]).max() / np.abs(want[r]).max())
            assert error <= rel, f"map at r={r}: relative max error {error:.2e} > {rel:.0e}"
            worst = max(worst, error)
    return worst


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def torch_unet1(tiny_sd_path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet").eval()


@pytest.fixture(scope="module")
def unet_inputs():
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2 * BATCH, 4, LATENT, LATENT)).astype(np.float32)
    text = rng.standard_normal((2 * BATCH, 77, 32)).astype(np.float32)
    return latents, 501, text


SPEC_MEAN = CaptureSpec(cross=(8, 16), self_attn=(8, 16))
SPEC_FIRST_UP = CaptureSpec(cross=(16,), self_attn=(8, 16), self_layers="first_up", step_norm="max")


def _unet_fn(sd, inputs, spec=None, mutable=True):
    """``f(weight) -> (output, maps collection)`` of one UNet call; ``spec=None``: no interceptor
    (diffusers' own FlaxAttention)."""
    latents, t, text = inputs
    timesteps = jnp.full((latents.shape[0],), t, jnp.int32)

    def apply(**kw):
        return sd.unet.apply({"params": sd.unet_params}, latents, timesteps, text, **kw)

    def f(weight=None):
        if spec is None:
            return apply().sample, {}
        with intercept_attention(spec, weight=weight):
            if not mutable:
                return apply().sample, {}
            out, variables = apply(mutable=[MAPS])
        return out.sample, variables.get(MAPS, {})

    return f


@pytest.fixture(scope="module")
def flax_calls(sd1, unet_inputs):
    """Jitted UNet calls on the same inputs as ``torch_calls``: diffusers' attention, and ours under
    each spec (the SPEC_MEAN call with a traced weight of 1, which gates the capture)."""
    traces = []

    def gated(weight):
        traces.append(1)
        return _unet_fn(sd1, unet_inputs, SPEC_MEAN)(weight)

    gated = jax.jit(gated)
    return {
        "reference": jax.jit(_unet_fn(sd1, unet_inputs))(),
        "mean": gated(jnp.float32(1.0)),
        "mean_weight_0": gated(jnp.float32(0.0)),
        "first_up": jax.jit(_unet_fn(sd1, unet_inputs, SPEC_FIRST_UP))(),
        "traces": len(traces),
    }


@pytest.fixture(scope="module")
def torch_calls(torch_unet1, unet_inputs):
    """One PyTorch UNet call with the recording processor: (output, recorded probabilities)."""
    latents, t, text = unet_inputs
    recorder = MapRecorder(torch_unet1)
    with torch.no_grad():
        out = torch_unet1(torch.tensor(latents), t, encoder_hidden_states=torch.tensor(text)).sample
    return out.numpy(), dict(recorder.calls)


# -------------------------------------------------------------------------------------- tests


def test_parse_layer():
    assert parse_layer(("down_blocks_1", "attentions_0", "transformer_blocks_2", "attn2")) == Layer(
        0, 1, 0, 2, "attn2"
    )
    assert parse_layer(("mid_block", "attentions_0", "transformer_blocks_0", "attn1")) == Layer(
        1, 0, 0, 0, "attn1"
    )
    # a prefix (the UNet inside another module) is skipped
    assert parse_layer(
        ("wrapper", "up_blocks_0", "attentions_1", "transformer_blocks_0", "attn1")
    ) == Layer(2, 0, 1, 0, "attn1")
    assert parse_layer(("up_blocks_0", "attentions_0", "transformer_blocks_0", "attn1")).is_first_up
    assert not parse_layer(
        ("up_blocks_0", "attentions_1", "transformer_blocks_0", "attn1")
    ).is_first_up
    assert parse_layer(("encoder", "mid_block", "attentions_0")) is None  # a VAE attention block
    assert parse_layer(("text", "layers_0", "attn1")) is None
    # UNet order: down < mid < up, then block, attention, transformer indices
    layers = [
        ("up_blocks_1", "attentions_0", "transformer_blocks_0", "attn2"),
        ("mid_block", "attentions_0", "transformer_blocks_0", "attn2"),
        ("down_blocks_10", "attentions_0", "transformer_blocks_0", "attn2"),
        ("down_blocks_2", "attentions_1", "transformer_blocks_0", "attn2"),
        ("down_blocks_2", "attentions_0", "transformer_blocks_0", "attn2"),
    ]
    order = sorted(layers, key=lambda p: parse_layer(p))
    assert [p[:2] for p in order] == [
        ("down_blocks_2", "attentions_0"),
        ("down_blocks_2", "attentions_1"),
        ("down_blocks_10", "attentions_0"),
        ("mid_block", "attentions_0"),
        ("up_blocks_1", "attentions_0"),
    ]


def test_output_equals_diffusers_attention(flax_calls, torch_calls):
    """The interceptor's attention (capturing) reproduces diffusers' FlaxAttention and PyTorch."""
    reference = np.asarray(flax_calls["reference"][0])
    for name in ("mean", "mean_weight_0", "first_up"):
        np.testing.assert_allclose(np.asarray(flax_calls[name][0]), reference, rtol=0, atol=2e-5)
    torch_out, _ = torch_calls
    assert np.abs(reference - torch_out).max() <= 1e-4 * np.abs(torch_out).max()
    assert (
        np.abs(np.asarray(flax_calls["mean"][0]) - torch_out).max()
        <= 1e-4 * np.abs(torch_out).max()
    )


@pytest.mark.parametrize("name, spec", [("mean", SPEC_MEAN), ("first_up", SPEC_FIRST_UP)])
def test_one_call_maps_equal_pytorch(flax_calls, torch_calls, name, spec):
    got = step_maps(flax_calls[name][1], spec)
    want = expected_maps(torch_calls[1], spec)
    # layer counts of the tiny UNet: cross at 8 = down_1, mid, up_0 x2; at 16 = down_0, up_1 x2
    if 8 in spec.cross:
        assert got[0][8].shape == (BATCH, 4, 8, 8, 77)
    assert got[0][16].shape == (BATCH, 3, 16, 16, 77)
    assert got[1][16].shape == (BATCH, 256, 256)
    # float32 vs float64 and the Flax UNet's own ~5e-5 deviation from PyTorch; "max" divides by
    # small maxima, so its relative error is larger
    worst = assert_maps_close(got, want, rel=1e-4 if spec.step_norm == "none" else 5e-4)
    print(f"{name}: worst relative map error {worst:.2e}")


def test_captures_only_what_the_spec_declares(sd1, unet_inputs, flax_calls):
    from flax.traverse_util import flatten_dict

    paths = sorted("/".join(p) for p in flatten_dict(flax_calls["first_up"][1]))
    assert paths == [
        "down_blocks_0/attentions_0/transformer_blocks_0/attn2/cross",
        "up_blocks_0/attentions_0/transformer_blocks_0/attn1/self",
        "up_blocks_1/attentions_0/transformer_blocks_0/attn1/self",
        "up_blocks_1/attentions_0/transformer_blocks_0/attn2/cross",
        "up_blocks_1/attentions_1/transformer_blocks_0/attn2/cross",
    ]
    # the empty spec sows nothing; without a mutable "maps" collection nothing is captured
    assert not jax.eval_shape(_unet_fn(sd1, unet_inputs, CaptureSpec()))[1]
    assert not jax.eval_shape(_unet_fn(sd1, unet_inputs, SPEC_MEAN, mutable=False))[1]


def test_weight_gates_the_capture_under_jit(flax_calls):
    """A traced weight: 0 sows zeros, > 0 the maps; one trace for both values."""
    assert flax_calls["traces"] == 1
    on = jax.tree_util.tree_leaves(flax_calls["mean"][1])
    off = jax.tree_util.tree_leaves(flax_calls["mean_weight_0"][1])
    assert len(on) == len(off) == 14  # 7 cross + 7 self layers in the tiny UNet
    assert all(np.all(np.asarray(m) > 0) for m in on)
    assert all(not np.any(np.asarray(m)) for m in off)


def test_errors(flax_calls):
    with pytest.raises(ValueError, match=r"no cross-attention layer was captured at resolution 32"):
        step_maps(flax_calls["mean"][1], CaptureSpec(cross=(32,)))
    odd = jnp.zeros((3, 4, 2, 8))
    with pytest.raises(ValueError, match="even size, got batch 3"):
        conditional_head_mean(odd, odd, 1.0)


def test_conditional_head_mean_by_hand():
    """Two heads, uniform logits for the unconditional half (ignored), hand-checkable rows."""
    query = np.zeros((2, 1, 2, 1), np.float32)  # (b, q=1, heads=2, d=1)
    key = np.zeros((2, 2, 2, 1), np.float32)  # (b, k=2, heads, d)
    query[1, 0, :, 0] = [1.0, 1.0]
    key[1, :, 0, 0] = [math.log(3.0), 0.0]  # head 0: softmax([log 3, 0]) = [3/4, 1/4]
    key[1, :, 1, 0] = [0.0, 0.0]  # head 1: [1/2, 1/2]
    got = np.asarray(conditional_head_mean(jnp.asarray(query), jnp.asarray(key), 1.0))
    np.testing.assert_allclose(got, [[[0.625, 0.375]]], rtol=1e-6)
