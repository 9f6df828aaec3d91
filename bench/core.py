"""Benchmark of the mask core at Stable Diffusion sizes: ms per image per method.

Maps of SD at 512 px (cross at 16/32/64 with 5 layers x 77 tokens, self-attention up to
4096 x 4096), a batch of images through ``jax.jit(jax.vmap(extract_masks))`` to 512 x 512
label maps, with and without PAMR. Random maps: the cost does not depend on the values.

    python bench/core.py --batch 8            # prints a markdown table and one JSON line
    python bench/core.py --parts              # SeeDiff-code's resizes and Otsus, old vs new

``--parts`` times the two building blocks SeeDiff's code path runs per image and class, in
both variants: the resizes 16 -> 32 -> 64 -> image (``bicubic_cv2``, OpenCV's kernel, vs jax's
``bicubic``) and the seed Otsus at 16, 32 and 64 (``threshold_otsu_levels`` of the uint16
levels vs the 256-bin float ``threshold_otsu``), and the whole methods with the old choices
(SeeDiff-code; ``ca`` normalised at the finest attention side instead of the image).
"""

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp

import jaxmask
from jaxmask import methods
from jaxmask.maps import AttentionMaps
from jaxmask.refine import PAMR_DEFAULT, resize
from jaxmask.threshold import threshold_otsu, threshold_otsu_levels

SD_SIDES = (8, 16, 32, 64)


def random_maps(key, spec, batch: int, tokens: int = 77, layers: int = 5) -> AttentionMaps:
    """Row-stochastic random maps with the shapes ``spec`` captures, for a batch."""
    cross, self_attn = {}, {}
    for i, r in enumerate(spec.cross):
        k = jax.random.fold_in(key, i)
        cross[r] = jax.nn.softmax(jax.random.normal(k, (batch, layers, r, r, tokens)), axis=-1)
    for i, r in enumerate(spec.self_attn):
        k = jax.random.fold_in(key, 100 + i)
        self_attn[r] = jax.nn.softmax(4 * jax.random.normal(k, (batch, r * r, r * r)), axis=-1)
    return AttentionMaps(
        cross=cross, self_attn=self_attn, self_layers=spec.self_layers, resolutions=SD_SIDES
    )


def time_call(f, *args, repeats: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(f(*args))
    return compile_s, (time.perf_counter() - t0) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=512, help="image side")
    parser.add_argument("--classes", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default=",".join(methods.PRESETS))
    parser.add_argument("--no-pamr", action="store_true")
    parser.add_argument(
        "--parts", action="store_true", help="time SeeDiff-code's resize and Otsu, old vs new"
    )
    args = parser.parse_args()
    if args.parts:
        return parts(args)

    key = jax.random.key(0)
    weights = jax.nn.one_hot(jnp.arange(args.classes) + 1, 77, dtype=jnp.float32)
    images = jax.random.uniform(key, (args.batch, args.size, args.size, 3))
    f = jax.jit(
        jax.vmap(jaxmask.extract_masks, in_axes=(0, None, 0, None, None)), static_argnums=(3, 4)
    )
    rows = []
    for name in args.methods.split(","):
        cfg = methods.get(name)
        maps = random_maps(key, cfg.capture_spec(SD_SIDES), args.batch)
        for pamr in (None,) if args.no_pamr else (None, PAMR_DEFAULT):
            compile_s, step_s = time_call(f, maps, weights, images, cfg, pamr, repeats=args.repeats)
            rows.append(
                {
                    "method": name,
                    "pamr": pamr is not None,
                    "batch": args.batch,
                    "size": args.size,
                    "classes": args.classes,
                    "ms_per_image": 1e3 * step_s / args.batch,
                    "compile_s": compile_s,
                }
            )
    device = (
        f"{jax.devices()[0].device_kind} ({jax.default_backend()}, {jax.device_count()} device(s))"
    )
    print(f"device: {device}; jax {jax.__version__}; {platform.processor() or platform.machine()}")
    print("| method | PAMR | batch | ms / image | compile s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {'yes' if r['pamr'] else 'no'} | {r['batch']} "
            f"| {r['ms_per_image']:.1f} | {r['compile_s']:.1f} |"
        )
    print(json.dumps({"device": device, "jax": jax.__version__, "results": rows}))


def _cascade_resize(method: str, size: int):
    def run(m16):  # (k, 16, 16): the cascade's three resizes
        m32 = resize(m16, (32, 32), method)
        m64 = resize(m32, (64, 64), method)
        return m64.sum() + resize(m64, (size, size), method).sum() + m32.sum()

    return run


def _cascade_otsu(kind: str):
    def run(maps):  # {r: (k, r, r)} in [0, 1.2]: the seed and background Otsus
        total = jnp.float32(0.0)
        for m in maps.values():
            sq = m * m
            if kind == "cv2":
                t = jax.vmap(threshold_otsu_levels)(jnp.floor(sq * 255.0)).astype(jnp.float32)
            else:
                t = jax.vmap(threshold_otsu)(sq)
            total = total + t.sum()
        return total

    return run


def parts(args) -> None:
    """ms per image of SeeDiff-code's resizes and Otsus, each variant jitted and vmapped."""
    key = jax.random.key(0)
    k = args.classes
    m16 = jax.random.uniform(key, (args.batch, k, 16, 16)) * 1.2
    levels = {
        r: jax.random.uniform(jax.random.fold_in(key, r), (args.batch, k, r, r)) * 1.2
        for r in (16, 32, 64)
    }
    rows = []
    for part, variant, f, x in (
        ("resize", "bicubic_cv2", _cascade_resize("bicubic_cv2", args.size), m16),
        ("resize", "bicubic (old)", _cascade_resize("bicubic", args.size), m16),
        ("otsu", "cv2 levels", _cascade_otsu("cv2"), levels),
        ("otsu", "float 256 bins (old)", _cascade_otsu("float"), levels),
    ):
        _, step_s = time_call(jax.jit(jax.vmap(f)), x, repeats=args.repeats)
        rows.append({"part": part, "variant": variant, "ms_per_image": 1e3 * step_s / args.batch})
    weights = jax.nn.one_hot(jnp.arange(k) + 1, 77, dtype=jnp.float32)
    images = jax.random.uniform(key, (args.batch, args.size, args.size, 3))
    g = jax.jit(
        jax.vmap(jaxmask.extract_masks, in_axes=(0, None, 0, None, None)), static_argnums=(3, 4)
    )
    variants = (
        ("seediff-code", methods.get("seediff-code")),
        (
            "seediff-code, old choices",
            methods.get("seediff-code", upsample="bicubic", otsu="float"),
        ),
        ("ca (normalised at the image)", methods.get("ca")),
        ("ca, normalize_at=finest", methods.get("ca", normalize_at="finest")),
    )
    for variant, cfg in variants:
        maps = random_maps(key, cfg.capture_spec(SD_SIDES), args.batch)
        _, step_s = time_call(g, maps, weights, images, cfg, None, repeats=args.repeats)
        rows.append(
            {"part": "method", "variant": variant, "ms_per_image": 1e3 * step_s / args.batch}
        )
    device = (
        f"{jax.devices()[0].device_kind} ({jax.default_backend()}, {jax.device_count()} device(s))"
    )
    print(f"device: {device}; jax {jax.__version__}; batch {args.batch}, {k} class(es)")
    print("| part | variant | ms / image |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['part']} | {r['variant']} | {r['ms_per_image']:.2f} |")
    print(json.dumps({"device": device, "jax": jax.__version__, "parts": rows}))


if __name__ == "__main__":
    main()
