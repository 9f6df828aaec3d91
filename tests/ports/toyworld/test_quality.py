"""The quality measurement end to end on the tiny random checkpoint (numbers are meaningless
there; the table must be complete, in range, and the same for the same seed)."""

import json

import numpy as np
import pytest

from ports.toyworld import quality, scenes

# The tiny UNet attends at sides 16 and 8 only: the methods' default sides (finest / 4) are not
# there, so the overrides pick 8 (the bundled toy model, 16/8/4, needs none).
OVERRIDES = {
    "ca_sa": {"cross_resolution": 8},
    "seediff-paper": {"seed_resolution": 8},
    "seediff-code": {"seed_resolution": 8},
}
SHRUNK = {
    "per_class": 1,
    "oracle_steps": 3,
    "batch": 4,
    "steps": 2,
    "gen_batch": 8,
    "oracle_scenes": 16,
    "eval_scenes": 8,
    "method_overrides": OVERRIDES,
    "progress": False,
}


@pytest.fixture(scope="module")
def pipe(sd1):
    from ports.api import Pipeline

    return Pipeline(sd1)


@pytest.fixture(scope="module")
def result(pipe):
    return quality.measure(pipe, seed=0, **SHRUNK)


def test_table_is_complete_and_in_range(result):
    rows = {(r["method"], r["pamr"]) for r in result["rows"]}
    assert rows == {(m, p) for m in quality.METHODS for p in (False, True)}
    for row in result["rows"]:
        for name in ("miou", "ignored", "foreground"):
            assert 0.0 <= row[name] <= 1.0, (row["method"], name, row[name])
        assert row["miou_present"] is None or 0.0 <= row["miou_present"] <= 1.0
        assert len(row["iou"]) == 9
    assert 0.0 <= result["oracle"]["miou"] <= 1.0
    assert 0.0 <= result["present"] <= 1.0 and len(result["present_per_class"]) == 8
    assert list(result["present_by_style"]) == ["colour words"]  # 8 items: the first round only
    assert result["present_by_style"]["colour words"]["present"] == result["present"]
    assert 0.0 <= result["vae"]["mae"] <= 255 and 0.0 <= result["vae"]["oracle_agreement"] <= 1
    assert 0.0 <= result["synthetic"]["jaxmask"]["miou"] <= 1.0
    assert result["synthetic"]["real"]["miou"] == result["oracle"]["miou"]
    assert result["config"]["images"] == 8
    assert result["config"]["capture_specs"] == [
        ["ca", "ca_sa"],
        ["seediff-paper"],
        ["seediff-code"],
    ]
    json.dumps(result)  # JSON-able


def test_markdown_holds_every_row(result):
    page = quality.render_markdown(result, command="jaxmask quality --per-class 1")
    assert "`jaxmask quality --per-class 1`" in page
    assert result["model"]["fingerprint"] in page
    for row in result["rows"]:
        line = f"| {row['method']} | {'yes' if row['pamr'] else 'no'} | {100 * row['miou']:.1f} |"
        assert line in page
    assert "## c. Train on synthetic, test on real" in page
    assert quality.estimate_seconds(result, 200) > result["timings"]["generate"]


def test_same_seed_same_numbers(pipe, result):
    again = quality.measure(pipe, seed=0, **SHRUNK)
    for key in ("rows", "oracle", "present", "present_per_class", "synthetic"):
        assert again[key] == result[key], key


def test_oracle_cache_is_reused(pipe, result, tmp_path):
    first = quality.measure(
        pipe, seed=0, **{**SHRUNK, "methods": ("ca",), "pamr": (False,)},
        synthetic=("ca", False), oracle_cache=tmp_path,
    )  # fmt: skip
    assert not first["oracle"]["cached"] and len(list(tmp_path.glob("oracle-*.msgpack"))) == 1
    second = quality.measure(
        pipe, seed=0, **{**SHRUNK, "methods": ("ca",), "pamr": (False,)},
        synthetic=("ca", False), oracle_cache=tmp_path,
    )  # fmt: skip
    assert second["oracle"]["cached"]
    assert second["oracle"]["miou"] == first["oracle"]["miou"] == result["oracle"]["miou"]
    assert second["rows"] == first["rows"] == result["rows"][:1]


def test_capture_window_and_stride_reach_the_sampler(pipe, result):
    shrunk = {**SHRUNK, "methods": ("ca",), "pamr": (False,)}
    windowed = quality.measure(
        pipe, seed=0, **shrunk, synthetic=("ca", False), window=(0.0, 0.5), every=2
    )
    assert windowed["config"]["step_window"] == [0.0, 0.5] and windowed["config"]["every"] == 2
    assert result["config"]["step_window"] == [0.0, 1.0] and result["config"]["every"] == 1
    with pytest.raises(ValueError, match="step_window"):
        quality.measure(pipe, **shrunk, synthetic=("ca", False), window=(0.5, 0.2))


def test_bad_input_says_what_to_do(pipe):
    with pytest.raises(ValueError, match="cross_resolution"):  # ca_sa's, the first to fail
        quality.measure(pipe, **{**SHRUNK, "method_overrides": None})
    with pytest.raises(ValueError, match="unknown method"):
        quality.measure(pipe, **{**SHRUNK, "methods": ("nope",), "method_overrides": None})
    with pytest.raises(ValueError, match="synthetic"):
        quality.measure(pipe, **{**SHRUNK, "methods": ("ca",), "method_overrides": None})
    if not quality.DEFAULT_MODEL.exists():
        with pytest.raises(ValueError, match="train-toy"):
            quality.measure(quality.DEFAULT_MODEL, **SHRUNK)


def test_prompts_follow_the_caption_grammar():
    items = quality.prompts(2, seed=0)
    assert len(items) == 16 and [c for _, c in items] == [i % 8 for i in range(16)]
    for i, (text, c) in enumerate(items):
        assert scenes.CLASSES[c] in text.split() and text.endswith(" background")
        named = any(colour in text.split() for colour in scenes.COLOURS)
        assert named == quality.has_colour(i) == (i < 8), text  # rounds of 8 alternate
    assert items == quality.prompts(2, seed=0) and items != quality.prompts(2, seed=1)
    assert quality.prompts(1, seed=0) == items[:8]


def test_label_mappings_known_values():
    jm = np.array([[[0, 1, 255]], [[1, 0, 255]]], np.uint8)
    np.testing.assert_array_equal(
        quality.to_world_labels(jm, np.array([3, 7])), [[[0, 4, 255]], [[8, 0, 255]]]
    )
    oracle = np.array([[[4, 2, 0]], [[8, 8, 4]]], np.uint8)
    np.testing.assert_array_equal(
        quality.named_only(oracle, np.array([3, 7])), [[[4, 0, 0]], [[8, 8, 0]]]
    )


def test_capture_groups_on_the_toy_sides():
    import jaxmask

    configs = {name: jaxmask.methods.get(name) for name in quality.METHODS}
    groups = quality.capture_groups(configs, (32, 16, 8))
    assert [names for _, names in groups] == [["ca", "ca_sa"], ["seediff-paper"], ["seediff-code"]]
    assert groups[0][0].cross == (8, 16, 32) and groups[0][0].self_attn == (16,)


def test_cli_writes_the_page(monkeypatch, tmp_path, result):
    from typer.testing import CliRunner

    from ports import cli

    seen = {}

    def fake_measure(model, **kwargs):
        seen.update(kwargs, model=model)
        return result

    monkeypatch.setattr(quality, "measure", fake_measure)
    out, js = tmp_path / "q.md", tmp_path / "q.json"
    args = ["quality", "--model", "m", "-n", "3", "--seed", "5", "--out", str(out)]
    args += ["--json", str(js), "--param", "seediff-code:seed_resolution=8"]
    args += ["--window", "0,0.5", "--every", "2"]
    run = CliRunner().invoke(cli.app, [*args, "--oracle-cache", "none"])
    assert run.exit_code == 0, run.output
    assert seen["per_class"] == 3 and seen["seed"] == 5 and seen["oracle_cache"] is None
    assert seen["method_overrides"] == {"seediff-code": {"seed_resolution": 8}}
    assert seen["window"] == (0.0, 0.5) and seen["every"] == 2
    assert "| ca | no |" in out.read_text() and "| ca | no |" in run.output
    assert json.loads(js.read_text())["rows"] == result["rows"]
    bad = CliRunner().invoke(cli.app, ["quality", "--param", "beta=0.5", "--out", str(out)])
    assert bad.exit_code == 2 and "METHOD:NAME=VALUE" in bad.output
    bad = CliRunner().invoke(cli.app, ["quality", "--window", "half", "--out", str(out)])
    assert bad.exit_code == 2 and "START,STOP" in bad.output


class _FrameVAE:
    """A stand-in VAE: the latent is the image itself; decoding adds ``frame`` grey levels in the
    outer 4 px (what a decoder that never saw a border does), so the answer is known."""

    def __init__(self, frame: float):
        self.frame = frame

    def apply(self, variables, x, method):
        return method(x)

    def encode(self, x):  # NCHW in, NHWC posterior out, as diffusers' Flax AutoencoderKL
        x = x.transpose(0, 2, 3, 1)
        dist = type("Dist", (), {"mean": x, "std": 0 * x})
        return type("Out", (), {"latent_dist": dist})

    def decode(self, z):
        ring = np.ones(z.shape[-2:], bool)
        ring[4:-4, 4:-4] = False
        return type("Out", (), {"sample": z + ring * self.frame / 127.5})


@pytest.mark.parametrize("frame", [0.0, 20.0])
def test_vae_fidelity_known_answers(frame):
    import types

    import jax

    from ports.toyworld import segmenter

    sd = types.SimpleNamespace(vae=_FrameVAE(frame), vae_params={}, dtype=np.float32)
    images = np.full((3, 32, 32, 3), 100, np.uint8)
    params = segmenter.init(jax.random.key(0), 32)
    out = quality.vae_fidelity(sd, images, params, segmenter.DEFAULT)
    ring_share = 1 - (24 * 24) / (32 * 32)
    assert out["ring_mae"] == pytest.approx(frame, abs=0.51)
    assert out["interior_mae"] == pytest.approx(0.0, abs=0.51)
    assert out["mae"] == pytest.approx(frame * ring_share, abs=0.51)
    if frame == 0:
        assert out["oracle_agreement"] == 1.0  # the same images: the same labels
