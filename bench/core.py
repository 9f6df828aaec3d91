"""Benchmark of the mask core at Stable Diffusion sizes: ms per image per method.

Maps of SD at 512 px (cross at 16/32/64 with 5 layers x 77 tokens, self-attention up to
4096 x 4096), a batch of images through ``jax.jit(jax.vmap(extract_masks))`` to 512 x 512
label maps, with and without PAMR. Random maps: the cost does not depend on the values.

    python bench/core.py --batch 8            # prints a markdown table and one JSON line
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
from jaxmask.refine import PAMR_DEFAULT

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
    args = parser.parse_args()

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
            f"| {r['method']} | {'yes' if r['pamr'] else 'no'} | {r['batch']} | {r['ms_per_image']:.1f} | {r['compile_s']:.1f} |"
        )
    print(json.dumps({"device": device, "jax": jax.__version__, "results": rows}))


if __name__ == "__main__":
    main()
