"""The quality measurement end to end on the tiny random checkpoint (numbers are meaningless
there; the table must be complete, in range, and the same for the same seed)."""

import json

import jax
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
    assert quality.estimate_seconds(result, 200) > result["timings"]["generate + masks"]


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
    import jaxmask

    shrunk = {**SHRUNK, "methods": ("ca",), "pamr": (False,)}
    windowed = quality.measure(
        pipe, seed=0, **shrunk, synthetic=("ca", False), window=(0.0, 0.5), every=2
    )
    assert windowed["config"]["step_window"] == [0.0, 0.5] and windowed["config"]["every"] == 2
    assert result["config"]["step_window"] == [0.0, 1.0] and result["config"]["every"] == 1
    # the stage samples with the window, and the masks come from fewer steps' maps
    items = quality.prompts(1, seed=0)
    ca = jaxmask.methods.get("ca")
    first = quality.generate_stage(
        pipe, items, {"ca": ca}, (False,), steps=2, gen_batch=8, capture={"step_window": (0, 0.5)}
    )
    assert first.specs[0].steps_mask(2) == (True, False)
    texts, classes = [t for t, _ in items], [[scenes.CLASSES[c]] for _, c in items]
    key = jax.random.key(0)
    soft = [
        pipe.batch(texts, key, classes=classes, methods=[ca], steps=2, capture=capture).masks[0][0][
            0
        ]
        for capture in ({"step_window": (0, 0.5)}, None)
    ]
    assert np.abs(soft[0] - soft[1]).max() > 1e-3
    with pytest.raises(ValueError, match="step_window"):
        quality.measure(pipe, **shrunk, synthetic=("ca", False), window=(0.5, 0.2))


def test_bad_input_says_what_to_do(pipe):
    with pytest.raises(ValueError, match="cross_resolution"):  # ca_sa's, the first to fail
        quality.measure(pipe, **{**SHRUNK, "method_overrides": None})
    with pytest.raises(ValueError, match="unknown method"):
        quality.measure(pipe, **{**SHRUNK, "methods": ("nope",), "method_overrides": None})
    with pytest.raises(ValueError, match="synthetic"):
        quality.measure(pipe, **{**SHRUNK, "methods": ("ca",), "method_overrides": None})


def test_a_missing_bundled_model_says_how_to_train_one(monkeypatch, tmp_path):
    missing = tmp_path / "model"
    monkeypatch.setattr(quality, "DEFAULT_MODEL", missing)
    with pytest.raises(ValueError, match="train-toy"):
        quality.measure(missing, **SHRUNK)


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


def test_methods_share_captures_on_the_toy_sides():
    import jaxmask
    from jaxmask.maps import merge_specs

    specs = [jaxmask.methods.get(name).capture_spec((32, 16, 8)) for name in quality.METHODS]
    merged, where = merge_specs(specs)
    assert where == (0, 0, 1, 2)  # ca + ca_sa; seediff-paper (per-step max); seediff-code
    assert merged[0].cross == (8, 16, 32) and merged[0].self_attn == (16,)
    assert merged[1:] == tuple(specs[2:])


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


def test_filters_keep_what_generate_would_keep():
    from ports.generate import Filters

    maps = np.zeros((3, 10, 10), np.uint8)
    maps[0, :5] = 1  # half the image
    maps[1, :1, :2] = 1  # 2 %
    maps[2] = 1  # all of it
    generated = quality.Generated(
        images=np.zeros((3, 10, 10, 3), np.uint8),
        class_ids=np.array([0, 1, 2]),
        label_maps={("ca", False): maps},
        confidence={("ca", False): np.array([0.9, 0.95, 0.4], np.float32)},
        groups=[["ca"]],
        specs=(),
        batch=3,
        batch_seconds=[],
    )
    key = ("ca", False)
    assert quality.kept(generated, key, None).tolist() == [True, True, True]
    assert quality.kept(generated, key, Filters(min_area=0.05)).tolist() == [True, False, True]
    assert quality.kept(generated, key, Filters(max_area=0.9)).tolist() == [True, True, False]
    assert quality.kept(generated, key, Filters(min_confidence=0.5)).tolist() == [True, True, False]


def test_filtered_measure_scores_the_kept_pairs(pipe, result):
    from ports.generate import Filters

    shrunk = {**SHRUNK, "methods": ("ca",), "pamr": (False,), "synthetic": ("ca", False)}
    everything = quality.measure(pipe, seed=0, **shrunk, filters=Filters(min_area=0.0))
    row = everything["rows"][0]
    assert row["kept"] == 1.0 and row["miou_kept"] == row["miou"] == result["rows"][0]["miou"]
    synthetic = everything["synthetic"]["jaxmask"]
    assert synthetic["pairs"] == everything["config"]["images"]
    # every pair kept: the kept segmenter is the same one (same data, steps and initialisation)
    assert synthetic["kept"] == {k: v for k, v in synthetic.items() if k != "kept"}
    page = quality.render_markdown(everything)
    assert "kept by the filters" in page and '{"min_area": 0.0}' in page
    with pytest.raises(ValueError, match="keep none"):
        quality.measure(pipe, seed=0, **shrunk, filters=Filters(min_area=0.5, max_area=0.500001))


def test_kept_segmenter_learns_from_the_kept_pairs_only():
    """A filter that drops the pairs with wrong labels: the segmenter trained on all pairs learns
    the wrong labels in part, the one trained on the kept pairs only learns the scenes' own."""
    from ports.generate import Filters

    images, labels = quality.real_scenes(24, stream=0, size=32)
    counts = np.stack([np.bincount(m.ravel(), minlength=9) for m in labels])
    class_ids = counts[:, 1:].argmax(1)  # the scene's largest object is the "named" class
    maps = (labels == (class_ids + 1)[:, None, None]).astype(np.uint8)
    wrong = np.arange(24) % 2 == 1
    maps[wrong] = 1 - maps[wrong]  # half the pairs: the mask inverted, most of the image
    key = ("ca", False)
    generated = quality.Generated(
        images=images, class_ids=class_ids, label_maps={key: maps},
        confidence={key: np.ones(24, np.float32)}, groups=[["ca"]], specs=(), batch=24,
        batch_seconds=[],
    )  # fmt: skip
    eval_images, eval_labels = quality.real_scenes(16, stream=1, size=32)
    oracle = quality.Oracle(None, {}, True, None, eval_images, eval_labels)
    filters = Filters(max_area=0.5)
    assert quality.kept(generated, key, filters).tolist() == (~wrong).tolist()
    out = quality.synthetic_stage(oracle, generated, key, steps=60, batch=8, filters=filters)
    assert out["pairs"] == 24 and out["kept"]["pairs"] == 12
    # the inverted half teaches "background is the object": the kept half does not
    assert out["kept"]["pixel_accuracy"] > out["pixel_accuracy"] + 0.05
