"""bench/sd.py: the tiny configuration runs end to end on CPU and reports sane fields; its FLOP
count is text + VAE + the number of UNet calls x one denoising step, each costed on its own.

No timing is asserted: only that the measured quantities exist, are positive and agree with
independent counts (the method's own capture spec, the UNet costed on its own)."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jaxmask import methods
from jaxmask.maps import CaptureSpec

BENCH = Path(__file__).resolve().parents[2] / "bench" / "sd.py"
STEPS = 4
WINDOW = (0.0, 0.5)


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_sd", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_bench()


@pytest.fixture(scope="module")
def report(bench, tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "sd.json"
    returned = bench.main(
        [
            "--config", "tiny",
            "--batch", "1",
            "--steps", str(STEPS),
            "--methods", "ca",
            "--window", ",".join(map(str, WINDOW)),
            "--repeats", "1",
            "--json", str(path),
        ]
    )  # fmt: skip
    written = json.loads(path.read_text())
    return returned, written


@pytest.fixture(scope="module")
def tiny(bench):
    return bench.build("tiny")


def test_json_is_written_and_has_one_row_per_method(report):
    returned, written = report
    assert written == json.loads(json.dumps(returned))
    assert written["config"] == "tiny"
    assert written["steps"] == STEPS
    assert written["platform"] == jax.devices()[0].platform
    assert [r["method"] for r in written["results"]] == ["ca"]
    assert written["peer_command"].startswith("python ../shared/bench/peer_torch_sd.py")


def test_measurements_are_present_and_positive(report):
    _, written = report
    for row in written["results"]:
        assert row["batch"] == 1 and row["steps"] == STEPS and row["model_calls"] == STEPS
        for field in ("compile_s", "run_s", "images_per_s", "ms_per_step", "flops",
                      "achieved_tflops", "program_gib"):  # fmt: skip
            assert row[field] > 0, (row["method"], field, row[field])
        assert row["images_per_s"] == pytest.approx(row["batch"] / row["run_s"], rel=1e-2)
        assert row["ms_per_step"] == pytest.approx(1e3 * row["run_s"] / STEPS, rel=1e-2)
        assert row["images_finite"] and row["maps_finite"]
        # the method's masks were extracted from the sampled maps, at image size
        assert row["mask_ms_per_image"] > 0 and row["mask_compile_s"] > 0
        assert row["label_maps_shape"] == [row["batch"], row["size"], row["size"]]
        assert 0 < row["images_per_s_with_masks"] < row["images_per_s"]
        if written["platform"] == "cpu":  # no MFU or allocator peak on a CPU
            assert row["mfu"] is None and row["peak_gib"] is None


def test_capture_follows_the_method_spec_and_the_window(report, tiny):
    _, written = report
    (ca,) = written["results"]
    assert ca["method"] == "ca"
    size = written["size"]
    expected = methods.get("ca").capture_spec(tiny.attention_resolutions(size, size))
    assert ca["spec"]["cross"] == list(expected.cross)
    assert ca["spec"]["step_window"] == list(WINDOW)
    window = CaptureSpec(cross=expected.cross, step_window=WINDOW)
    assert ca["captured_steps"] == sum(window.steps_mask(STEPS)) < STEPS
    # one cross map per captured side: (batch, layers, r, r, 77 tokens)
    assert sorted(ca["maps"]["cross"], key=int) == [str(r) for r in expected.cross]
    for r, shape in ca["maps"]["cross"].items():
        assert shape[0] == 1 and shape[2:] == [int(r), int(r), 77]
    assert ca["maps"]["self"] == {}


def test_flops_count_every_unet_call(bench, tiny):
    # cost_flops lowers for the CPU from abstract arguments: a matmul is 2 n^3, a scan of one
    # counts its body once (why the sampler is not costed as a whole)
    x = jnp.ones((32, 32), jnp.float32)
    assert bench.cost_flops(lambda a: a @ a, x) == 2 * 32**3

    def scan(a):
        return jax.lax.scan(lambda c, _: (c @ c, None), a, None, length=7)[0]

    assert bench.cost_flops(scan, x) < 7 * 2 * 32**3

    sampler = bench.Sampler(tiny)
    batch = 2
    flops = bench.sampler_flops(sampler, batch, STEPS, bench.NOTHING)
    side = sampler.native_size() // tiny.vae_scale_factor
    text_dim = tiny.text_encoder.config.hidden_size
    unet = jax.jit(lambda p, x, t, c: tiny.unet.apply({"params": p}, x, t, c).sample).lower(
        tiny.unet_params,
        jnp.zeros((2 * batch, tiny.latent_channels, side, side), tiny.dtype),
        jnp.zeros((2 * batch,), jnp.int32),
        jnp.zeros((2 * batch, 77, text_dim), tiny.dtype),
    )
    unet_flops = unet.cost_analysis()["flops"]
    assert flops["model_calls"] == STEPS
    # one denoising step = one CFG UNet call plus a little (guidance, scheduler)
    assert unet_flops <= flops["per_model_call"] <= 1.05 * unet_flops
    assert flops["text"] > 0 and flops["vae"] > 0
    assert flops["total"] == pytest.approx(
        flops["text"] + flops["vae"] + STEPS * flops["per_model_call"]
    )
    assert flops["total"] > STEPS * unet_flops
    # capturing costs FLOPs on top of plain sampling
    ca = bench.capture_spec(tiny, "ca", sampler.native_size())
    assert ca.cross
    assert bench.sampler_flops(sampler, batch, STEPS, ca)["total"] > flops["total"]
