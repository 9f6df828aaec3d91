"""Training the toy Stable Diffusion: its pieces against references, and the whole command on the
``smoke`` preset (seconds of training; the folder must load and generate through the normal API)."""

import json
import math
import os
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ports.toyworld import train
from tests.ports.conftest import compilation_cache_on


@pytest.fixture(scope="module", autouse=True)
def _compiled_once(tmp_path_factory):
    """JAX's persistent compilation cache for this module, shared by the xdist workers: every
    ``train.train`` call jits its steps afresh, so without it each of the module's smoke runs
    (a dozen calls) compiles the same programs again."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    with compilation_cache_on(shared / "jax-cache-test-train", min_compile_secs=0.0):
        yield


def test_schedule_is_stable_diffusions():
    from diffusers import DDIMScheduler

    reference = DDIMScheduler.from_config(train.SCHEDULER_CONFIG).alphas_cumprod.numpy()
    np.testing.assert_allclose(np.asarray(train.alphas_cumprod()), reference, rtol=1e-5)


def test_crops_are_windows_of_each_image():
    images = jnp.arange(3 * 8 * 8 * 2).reshape(3, 8, 8, 2)
    key = jax.random.key(4)
    crops = np.asarray(train._crops(images, 4, key))
    corners = np.asarray(jax.random.randint(key, (3, 2), 0, jnp.array([5, 5])))
    for i, (y, x) in enumerate(corners):
        np.testing.assert_array_equal(crops[i], np.asarray(images)[i, y : y + 4, x : x + 4])
    np.testing.assert_array_equal(train._crops(images, 8, key), images)  # full side: identity


def test_config_errors_say_what_to_fix():
    with pytest.raises(ValueError, match="multiples of 32"):
        train.TrainConfig(unet_channels=(48, 64))
    with pytest.raises(ValueError, match="vae_crop must be in"):
        train.TrainConfig(vae_channels=(32, 64, 64), vae_crop=30)
    with pytest.raises(ValueError, match="unet_steps must be >= 1"):
        train.TrainConfig(unet_steps=0)
    assert train.PRESETS["cpu"].latent_side == 16 and train.PRESETS["gpu"].latent_side == 32


def test_run_chunks_averages_per_chunk_and_stops_at_the_deadline():
    def step(state, key, data):
        return state + data, state.astype(jnp.float32)  # loss = the step index

    state, curve = train._run_chunks(step, jnp.int32(0), 7, 3, jax.random.key(0), 1, "t", False)
    assert int(state) == 7 and curve == [1.0, 4.0, 6.0]  # means of 0..2, 3..5, 6
    state, curve = train._run_chunks(
        step, jnp.int32(0), 9, 3, jax.random.key(0), 1, "t", False, deadline=0.0
    )
    assert int(state) == 3 and curve == [1.0]  # the first chunk passes a deadline in the past

    def bad(state, key, data):
        return state, jnp.float32(jnp.nan)

    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        train._run_chunks(bad, jnp.int32(0), 2, 1, jax.random.key(0), 1, "unet", False)


@pytest.fixture(scope="module")
def smoke_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy") / "model"
    record = train.train(folder, train.PRESETS["smoke"], seed=3, progress=False)
    return folder, record


# With the compilation cache on (this module's), the mask extraction is lowered ahead of time
# (ports.executables), and jax.jit(...).lower rebuilds AttentionMaps around placeholder leaves
# (ArgInfo), as JAX's pytree rules allow; the runtime shape checks reject those leaves.
@pytest.mark.unchecked("jax's ahead-of-time lowering puts placeholders in AttentionMaps")
def test_smoke_training_writes_a_loadable_model_and_its_record(smoke_model):
    import jaxmask

    folder, record = smoke_model
    cfg = train.PRESETS["smoke"]
    on_disk = json.loads((folder / "training.json").read_text())
    assert on_disk["seed"] == 3 and on_disk["config"]["unet_steps"] == cfg.unet_steps
    assert len(on_disk["vae_loss"]) == math.ceil(cfg.vae_steps / cfg.chunk)
    assert len(on_disk["unet_loss"]) == math.ceil(cfg.unet_steps / cfg.chunk)
    assert len(on_disk["decoder_loss"]) == math.ceil(cfg.decoder_steps / cfg.chunk)
    curves = on_disk["vae_loss"] + on_disk["unet_loss"] + on_disk["decoder_loss"]
    assert all(math.isfinite(v) for v in curves)
    assert on_disk["scaling_factor"] == record["scaling_factor"] > 0

    pipe = jaxmask.load(folder)
    assert pipe.native_size == train.SIZE
    assert pipe.resolutions() == (8, 16, 32)  # attention at every level: seeds at 8, two stages
    out = pipe.generate(
        ["a red star on a plain background", "a ring on a striped background"],
        0,
        classes=[["star"], ["ring"]],
        steps=2,
    )
    assert out.images.shape == (2, 64, 64, 3) and out.label_maps.shape == (2, 64, 64)
    assert np.isfinite(out.soft_masks).all()


def test_run_chunks_resumes_at_start_and_saves():
    def step(state, key, data):
        return state + data, state.astype(jnp.float32)

    saves = []
    state, curve = train._run_chunks(
        step, jnp.int32(3), 7, 3, jax.random.key(0), 1, "t", False, start=3, curve=[1.0],
        save=lambda s, done, c: saves.append((int(s), done, list(c))), save_seconds=1e9,
    )  # fmt: skip
    assert int(state) == 7 and curve == [1.0, 4.0, 6.0]  # steps 3..5 then 6: same as one run
    assert saves == [(7, 7, [1.0, 4.0, 6.0])]  # saved once, when the loop ended


def test_min_snr_weights():
    t = jnp.arange(train.NUM_TRAIN_TIMESTEPS)
    acp = np.asarray(train.alphas_cumprod(), np.float64)
    snr = acp / (1 - acp)
    w = np.asarray(train.loss_weights(t, 5.0))
    np.testing.assert_allclose(w, np.minimum(snr, 5.0) / snr, rtol=1e-5)
    assert w[0] < 0.01 and w[-1] == 1.0  # nearly clean steps count little, noisy ones fully
    np.testing.assert_array_equal(train.loss_weights(t, None), np.ones(len(t)))
    with pytest.raises(ValueError, match="min_snr_gamma must be > 0"):
        train.TrainConfig(min_snr_gamma=0.0)


def _weights(folder):
    from safetensors.numpy import load_file

    return {
        part: load_file(str(next((folder / part).glob("*.safetensors"))))
        for part in ("unet", "vae", "text_encoder")
    }


def test_a_run_cut_into_segments_makes_the_same_model(smoke_model, tmp_path, monkeypatch):
    """Stopped by Ctrl-C in the VAE stage, then by the time budget in the UNet stage, then by
    Ctrl-C in the decoder stage, then resumed to the end: the same weights, bit for bit, as the
    uninterrupted run (the data order comes from the step index)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    straight, _ = smoke_model
    cfg, out = train.PRESETS["smoke"], tmp_path / "model"
    render, train_decoder = train.render_dataset, train.train_decoder

    def render_then_ctrl_c(*args, **kwargs):  # SIGINT once training has started
        scenes_ = render(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return scenes_

    def ctrl_c_then_decoder(*args, **kwargs):  # SIGINT as the decoder stage starts
        os.kill(os.getpid(), signal.SIGINT)
        return train_decoder(*args, **kwargs)

    monkeypatch.setattr(train, "render_dataset", render_then_ctrl_c)
    first = train.train(out, cfg, seed=3, progress=False)
    assert first["vae_steps_done"] == cfg.chunk and not out.exists()  # stopped in the VAE stage
    monkeypatch.undo()
    second = train.train(out, cfg, seed=3, progress=False, max_minutes=1e-9, resume=True)
    assert (second["vae_steps_done"], second["unet_steps_done"]) == (cfg.vae_steps, cfg.chunk)
    assert out.is_dir()  # every segment past the VAE stage leaves a usable model
    monkeypatch.setattr(train, "train_decoder", ctrl_c_then_decoder)
    third = train.train(out, cfg, seed=3, progress=False, resume=True)
    assert (third["unet_steps_done"], third["decoder_steps_done"]) == (cfg.unet_steps, cfg.chunk)
    monkeypatch.undo()
    fourth = train.train(out, cfg, seed=3, progress=False, resume=True)
    assert fourth["decoder_steps_done"] == cfg.decoder_steps
    assert [s["to"] for s in fourth["segments"]] == [
        {"vae": 2, "unet": 0, "decoder": 0}, {"vae": 4, "unet": 2, "decoder": 0},
        {"vae": 4, "unet": 4, "decoder": 2}, {"vae": 4, "unet": 4, "decoder": 4},
    ]  # fmt: skip
    a, b = _weights(straight), _weights(out)
    for part in a:
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            np.testing.assert_array_equal(a[part][name], b[part][name], err_msg=f"{part} {name}")
    record = json.loads((out / "training.json").read_text())
    assert record["vae_loss"] == json.loads((straight / "training.json").read_text())["vae_loss"]


def test_resume_refuses_what_it_cannot_continue(tmp_path):
    cfg, out = train.PRESETS["smoke"], tmp_path / "model"
    with pytest.raises(ValueError, match="no checkpoint at .*start the run without --resume"):
        train.train(out, cfg, seed=3, progress=False, resume=True)
    train.train(out, cfg, seed=3, progress=False, max_minutes=1e-9)
    with pytest.raises(ValueError, match="pass --resume to continue it, or remove"):
        train.train(out, cfg, seed=3, progress=False)
    with pytest.raises(ValueError, match=r"differs in: seed, config.unet_lr"):
        other = train.dataclasses.replace(cfg, unet_lr=1e-3)
        train.train(out, other, seed=4, progress=False, resume=True)
    (train.default_checkpoint(out) / "checkpoint.msgpack").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable training checkpoint"):
        train.train(out, cfg, seed=3, progress=False, resume=True)


def test_a_resumed_run_may_take_more_unet_steps(tmp_path):
    """Raising ``unet_steps`` on resume continues the run with the schedule stretched from there
    on (recorded per segment); a count below the steps already done is refused."""
    cfg, out = train.PRESETS["smoke"], tmp_path / "model"
    train.train(out, cfg, seed=3, progress=False)
    first_decoder = _weights(out)["vae"]
    longer = train.dataclasses.replace(cfg, unet_steps=cfg.unet_steps + cfg.chunk)
    record = train.train(out, longer, seed=3, progress=False, resume=True)
    assert record["unet_steps_done"] == longer.unet_steps == record["config"]["unet_steps"]
    assert len(record["unet_loss"]) == longer.unet_steps // cfg.chunk
    last = record["segments"][-1]
    assert last["unet_steps"] == {"from": cfg.unet_steps, "to": longer.unet_steps}
    assert last["from"]["unet"] == cfg.unet_steps and last["to"]["unet"] == longer.unet_steps
    assert record["decoder_steps_done"] == cfg.decoder_steps  # the decoder stage is kept
    decoder = _weights(out)["vae"]
    assert {n for n in decoder if n.startswith(train.DECODER_PARTS)} and all(
        np.array_equal(decoder[n], first_decoder[n]) for n in decoder
    )  # exported as the first run trained it (the UNet's steps do not change what it learned)
    with pytest.raises(ValueError, match=r"differs in: config.unet_steps"):
        train.train(out, cfg, seed=3, progress=False, resume=True)  # fewer than the 6 done


def test_a_finished_run_may_gain_the_decoder_stage(tmp_path):
    """Stage 3 added on resume to a run that ended without it (as the bundled model's run): the
    decoder alone changes; the encoder, so the latents, and the UNet and text encoder stay bit
    for bit what they were."""
    cfg, out = train.PRESETS["smoke"], tmp_path / "model"
    without = train.dataclasses.replace(cfg, decoder_steps=0)
    train.train(out, without, seed=3, progress=False)
    before = _weights(out)
    record = train.train(out, cfg, seed=3, progress=False, resume=True)
    after = _weights(out)
    assert record["decoder_steps_done"] == cfg.decoder_steps == record["config"]["decoder_steps"]
    assert record["segments"][-1]["decoder_steps"] == {"from": 0, "to": cfg.decoder_steps}
    for part in ("unet", "text_encoder"):
        for name in before[part]:
            np.testing.assert_array_equal(before[part][name], after[part][name], err_msg=name)
    changed = {n for n in before["vae"] if not np.array_equal(before["vae"][n], after["vae"][n])}
    assert changed and all(n.startswith(train.DECODER_PARTS) for n in changed), sorted(changed)
    assert any(n.startswith("encoder") for n in before["vae"])  # the check sees the encoder
    with pytest.raises(ValueError, match=r"differs in: config.decoder_steps"):
        train.train(out, without, seed=3, progress=False, resume=True)  # stage 3 has begun


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--max-minutes", "0"], "--max-minutes must be > 0"),
        (["--checkpoint-minutes", "-1"], "--checkpoint-minutes must be > 0"),
        (["--resume"], "no checkpoint at"),
    ],
)
def test_cli_refuses_bad_input_before_any_work(tmp_path, args, message):
    from typer.testing import CliRunner

    from ports.cli import app

    out = tmp_path / "model"
    result = CliRunner().invoke(app, ["train-toy", "--out", str(out), "--preset", "smoke", *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert list(tmp_path.iterdir()) == []  # nothing written
