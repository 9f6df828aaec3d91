"""jaxmask vs diffusers' PyTorch pipeline on the bundled toy model, on the CPU, in one command.

The comparison of ``../shared/bench/peer_toy_cpu.py`` (the anchor), with each side in its own
worker process so that the two may run on different Pythons: jaxmask where jax is fastest
(jax 0.12 needs Python >= 3.12) and PyTorch where its wheel is (Python 3.11 here). The driver
warms every variant up once (first-call seconds: compilation for jax), then runs rounds in which
the four variants take turns, so that load on a shared machine hits all alike, and prints the
median img/s of each and the ratios the speed issue asks for (each the median over rounds of
the ratio within a round):

- ``jaxmask plain``: images only (no capture);
- ``jaxmask seediff-code masks``: images and the seediff-code masks of one class each;
- ``jaxmask generate (dataset run)``: ``ports.generate.run`` writing a VOC folder of at least four
  batches of the masks variant (encode, hash, write included), whose img/s against the masks
  variant is the share of the sampler's rate a dataset run sustains;
- ``torch plain``: ``StableDiffusionPipeline`` with SDPA attention;
- ``torch + attention store``: the same with a processor that keeps running sums of every cross-
  and self-attention map of the conditional half (what prompt-to-prompt style mask tools store).

Same folder (``ports/toyworld/model``), batch, steps, guidance 7.5, DDIM, float32, 2 threads.

    python bench/toy_cpu.py                                  # both sides on this Python
    python bench/toy_cpu.py --jax-python /path/py312/bin/python --batch 8 --steps 20 --rounds 3
    python bench/toy_cpu.py --cpu-devices 2     # the jaxmask side split over two CPU devices

A worker is this file with ``--worker jaxmask|torch``: it reads variant names on stdin, runs
each once and answers one JSON line with the seconds.
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

CLASSES = ("circle", "square", "triangle", "star", "ring", "cross", "heart", "moon")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
VARIANTS = {
    "jaxmask plain": ("jaxmask", "plain"),
    "jaxmask seediff-code masks": ("jaxmask", "masks"),
    "jaxmask generate (dataset run)": ("jaxmask", "generate"),
    "torch plain": ("torch", "plain"),
    "torch + attention store": ("torch", "store"),
}


def prompts(batch: int) -> list[str]:
    return [f"a {COLOURS[i % 8]} {CLASSES[i % 8]} on a plain background" for i in range(batch)]


def jaxmask_runner(batch: int, steps: int, cpu_devices: int):
    import jax

    # as `jaxmask generate --cpu-devices N` does: the batch split over N CPU devices
    jax.config.update("jax_num_cpu_devices", cpu_devices)
    import numpy as np

    import jaxmask
    from ports.scale.mesh import data_mesh

    pipe = jaxmask.load()
    text = prompts(batch)
    classes = [[CLASSES[i % 8]] for i in range(batch)]
    mesh = data_mesh() if cpu_devices > 1 else None

    def run(variant: str) -> int:
        if variant == "generate":
            return dataset_run(pipe, batch, steps)
        kw = {"classes": classes, "method": "seediff-code"} if variant == "masks" else {}
        out = pipe.generate(text, jax.random.key(0), steps=steps, guidance=7.5, mesh=mesh, **kw)
        np.asarray(out.images)  # wait for the device
        if variant == "masks":
            np.asarray(out.label_maps)
        return batch

    versions = {"jax": jax.__version__, "python": platform.python_version()}
    return run, {**versions, "cpu_devices": jax.local_device_count()}


def dataset_run(pipe, batch: int, steps: int) -> int:
    """A fresh ``jaxmask generate`` run of the bench's prompts into a temporary VOC folder: the
    images it wrote."""
    import tempfile

    from ports.generate import RunConfig, run
    from ports.plan import Plan

    per_class = max(1, -(-4 * batch // len(CLASSES)))
    plan = Plan(
        CLASSES,
        per_class,
        prompts=tuple((p, (CLASSES[i % 8],)) for i, p in enumerate(prompts(len(CLASSES)))),
    )
    cfg = RunConfig(plan=plan, model=None, steps=steps, guidance=7.5)
    with tempfile.TemporaryDirectory() as out:
        return run(cfg, Path(out) / "data", batch_size=batch, pipeline=pipe).written


class AttentionStore:
    """An attention processor that computes attention explicitly and keeps, per (kind, query
    length), the running sum of the conditional half's head-mean probabilities."""

    def __init__(self):
        self.sums = {}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, **_):
        import torch

        cross = encoder_hidden_states is not None
        context = encoder_hidden_states if cross else hidden_states
        b, n, _ = hidden_states.shape
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(q, k, None)
        out = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, v))))
        kept = probs.view(b, attn.heads, n, -1)[b // 2 :].float().mean(1)
        where = ("cross" if cross else "self", n)
        self.sums[where] = self.sums[where] + kept if where in self.sums else kept.clone()
        return out


def torch_runner(batch: int, steps: int):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.utils import logging

    logging.set_verbosity_error()  # accelerate's absence and the loading bars are noise here
    logging.disable_progress_bar()

    from ports.toyworld import MODEL

    torch.set_num_threads(2)
    pipe = StableDiffusionPipeline.from_pretrained(
        str(MODEL), safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    text = prompts(batch)

    def run(variant: str) -> int:
        pipe.unet.set_attn_processor(AttentionStore() if variant == "store" else AttnProcessor2_0())
        with torch.no_grad():
            pipe(
                text,
                num_inference_steps=steps,
                guidance_scale=7.5,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            )
        return batch

    return run, {"torch": torch.__version__, "python": platform.python_version()}


def worker(side: str, batch: int, steps: int, cpu_devices: int) -> None:
    if side == "jaxmask":
        run, versions = jaxmask_runner(batch, steps, cpu_devices)
    else:
        run, versions = torch_runner(batch, steps)
    print(json.dumps(versions), flush=True)
    for line in sys.stdin:
        t0 = time.perf_counter()
        images = run(line.strip())
        print(json.dumps({"seconds": time.perf_counter() - t0, "images": images}), flush=True)


class Worker:
    def __init__(self, python: str, side: str, batch: int, steps: int, cpu_devices: int):
        cmd = [python, __file__, "--worker", side, "--batch", str(batch), "--steps", str(steps)]
        cmd += ["--cpu-devices", str(cpu_devices)]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parents[1],
        )
        self.versions = self._answer()

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.proc.args[3]} worker stopped (see its stderr above)")
        return json.loads(line)

    def rate(self, variant: str) -> tuple[float, float]:
        """(seconds, img/s) of one run of ``variant``."""
        self.proc.stdin.write(variant + "\n")
        self.proc.stdin.flush()
        answer = self._answer()
        return answer["seconds"], answer["images"] / answer["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jax-python", default=sys.executable, help="Python of the jaxmask side")
    parser.add_argument("--torch-python", default=sys.executable, help="Python of the torch side")
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=1,
        help="JAX CPU devices the jaxmask side splits each batch over (jaxmask generate's "
        "default is one per core)",
    )
    parser.add_argument("--worker", choices=("jaxmask", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.batch, args.steps, args.cpu_devices)
    workers = {
        side: Worker(python, side, args.batch, args.steps, args.cpu_devices)
        for side, python in (("jaxmask", args.jax_python), ("torch", args.torch_python))
    }
    try:
        first = {name: workers[s].rate(v)[0] for name, (s, v) in VARIANTS.items()}
        print(
            json.dumps(
                {
                    "device": f"{platform.processor() or platform.machine()} CPU",
                    "batch": args.batch,
                    "steps": args.steps,
                    **{s: w.versions for s, w in workers.items()},
                    "first_call_s": {k: round(v, 2) for k, v in first.items()},
                }
            ),
            flush=True,
        )
        times = {name: [] for name in VARIANTS}  # img/s of each round
        for r in range(args.rounds):
            for name, (side, variant) in VARIANTS.items():
                times[name].append(workers[side].rate(variant)[1])
            print(json.dumps({"round": r, **{k: round(v[-1], 3) for k, v in times.items()}}))
    finally:
        for w in workers.values():
            w.close()
    ips = {k: statistics.median(v) for k, v in times.items()}
    # Each ratio is the median over rounds of the ratio within a round: a machine whose speed
    # drifts between rounds (seen: +-25%) moves both sides of one round alike.
    pairs = {
        "masks vs torch store": ("jaxmask seediff-code masks", "torch + attention store"),
        "plain vs torch plain": ("jaxmask plain", "torch plain"),
        "generate vs sampler": ("jaxmask generate (dataset run)", "jaxmask seediff-code masks"),
        "capture overhead jaxmask": ("jaxmask plain", "jaxmask seediff-code masks"),
        "capture overhead torch": ("torch plain", "torch + attention store"),
    }
    ratios = {
        name: statistics.median(a / b for a, b in zip(times[top], times[bottom], strict=True))
        for name, (top, bottom) in pairs.items()
    }
    for name in ("capture overhead jaxmask", "capture overhead torch"):
        ratios[name] -= 1.0  # plain over capturing, as a fraction
    print("| run | img/s | first call s |\n|---|---:|---:|")
    for name in VARIANTS:
        print(f"| {name} | {ips[name]:.2f} | {first[name]:.1f} |")
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")
    rounded = {k: round(v, 3) for k, v in ips.items()}
    print(json.dumps({"img_per_s": rounded, "ratios": {k: round(v, 3) for k, v in ratios.items()}}))


if __name__ == "__main__":
    main()
