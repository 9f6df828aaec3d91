"""A tiny random Stable Diffusion checkpoint in diffusers format, for tests.

``make_tiny_sd(path)`` writes what ``diffusers.StableDiffusionPipeline.save_pretrained`` writes for
a real SD 1.x / 2.x model (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``,
``model_index.json``; weights as safetensors), only tiny: the UNet has cross-attention at two latent
resolutions and in the mid block, the VAE downsamples by 4, the CLIP text encoder is 3 layers of
width 32, and the tokenizer is a hand-made BPE vocabulary of printable ASCII characters plus a few
whole words (``a photo of a cat``, ``dog``, ``red``, ``potted plant``), so prompts tokenize into
several tokens and unknown words fall back to character tokens.

Every parameter is perturbed from PyTorch's default initialisation by seeded N(0, 0.02)
noise, so layers that diffusers initialises to zero (``conv_out``, ``proj_out``) do not
make parity tests vacuous.

Needs torch (the ``test`` extra); it runs in about a second.
"""

import json
from pathlib import Path

import ports.sd  # noqa: F401  (silences the Flax deprecation message diffusers logs at import)
from ports.toyworld.vocab import write_clip_tokenizer

# Whole-word tokens of the tiny vocabulary (each also gets its BPE merge chain).
WORDS = ("a", "photo", "of", "cat", "dog", "red", "potted", "plant", "the", "on", "table")

HIDDEN = 32  # text width == UNet cross_attention_dim
MAX_LENGTH = 77


def _perturb(module, generator, std: float = 0.02) -> None:
    import torch

    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * std)


def make_tiny_sd(path, *, seed: int = 0, sd2: bool = False, three_levels: bool = False) -> Path:
    """Write a tiny random diffusers-format Stable Diffusion 1.x (or 2.x) checkpoint folder.

    Args:
      path: the folder to write (created; existing files are overwritten).
      seed: seeds the PyTorch initialisation and the perturbation noise.
      sd2: SD 2.x flavour: ``use_linear_projection=True``, per-block head counts, ``gelu`` in CLIP,
        a DDIM scheduler config (SD 1.x: ``quick_gelu``, one head count, a PNDM scheduler config).
      three_levels: a 3-level UNet whose deepest level has no attention blocks (``DownBlock2D``
        last, ``UpBlock2D`` first): at latent side 4 only the mid block attends, so there is no
        first up-block layer at ``finest / 4`` (a valid diffusers config).

    Returns:
      ``Path(path)``. The UNet takes 16x16x4 latents (``sample_size`` 16) and the VAE maps them
      to 64x64 images (scale factor 4); attention runs at latent sides 16 (down 0, up 1)
      and 8 (down 1, mid, up 0); with ``three_levels`` at 16 (down 0, up 2), 8 (down 1, up 1)
      and 4 (mid only).
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        PNDMScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)

    vocab_size = write_clip_tokenizer(path / "tokenizer", WORDS, MAX_LENGTH)

    if three_levels:
        levels = {
            "block_out_channels": (32, 32, 64),
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        }
    else:
        levels = {
            "block_out_channels": (32, 64),
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        }
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        **levels,
        layers_per_block=1,
        cross_attention_dim=HIDDEN,
        # diffusers' historical naming: for SD this is the number of heads
        # (SD 1.x: 8, SD 2.x: 5/10/20/20).
        attention_head_dim=(2, 4, 4)[: len(levels["block_out_channels"])] if sd2 else 2,
        use_linear_projection=sd2,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )
    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="gelu" if sd2 else "quick_gelu",
        projection_dim=HIDDEN,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    text_encoder = CLIPTextModel(text_config)
    for module in (unet, vae, text_encoder):
        _perturb(module, generator)
        module.eval()

    unet.save_pretrained(path / "unet", safe_serialization=True)
    vae.save_pretrained(path / "vae", safe_serialization=True)
    text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)

    scheduler_kwargs = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }
    if sd2:
        scheduler = DDIMScheduler(clip_sample=False, prediction_type="epsilon", **scheduler_kwargs)
    else:
        scheduler = PNDMScheduler(skip_prk_steps=True, **scheduler_kwargs)
    scheduler.save_pretrained(path / "scheduler")

    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.39.0",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", type(scheduler).__name__],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (path / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return path
