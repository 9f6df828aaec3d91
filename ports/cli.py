"""The ``jaxmask`` command. Each command parses, builds a run config, validates, makes one call."""

import dataclasses
import os
from pathlib import Path

# transformers announces at import that PyTorch is missing; jaxmask needs only its tokenizer.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import typer  # noqa: E402

from ports import compile_cache, progress  # noqa: E402

# Plain click help: it wraps long option names at 80 columns where rich's tables cut them.
app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None)


class _Command(typer.core.TyperCommand):
    """Usage lines as git and pip write them: ``DATASET``, not typer's ``{DATASET}``."""

    def collect_usage_pieces(self, ctx):
        return [piece.strip("{}") for piece in super().collect_usage_pieces(ctx)]


def _filter_option(help: str):
    """An item filter's option (generate, quality): a fraction F, off when not given."""
    return typer.Option(None, metavar="F", help=help)


def _cpu_devices(requested: int | None, batch_size: int | None = None) -> None:
    """One JAX CPU device per core (at most 8; with ``batch_size``, the most that divide it), so
    a data-parallel batch uses every core: XLA runs a CPU device's program mostly on one thread
    (on the 2-core CPU, split over two devices the toy model samples ~1.35x faster and trains
    1.34x faster). Only the CPU backend reads it, so a GPU or TPU run is unchanged. It must
    precede JAX's start: a process that has started JAX already (the CLI called in-process), or
    an environment that chose with ``--xla_force_host_platform_device_count``, keeps its devices
    unless ``requested``."""
    import jax

    if requested is not None and requested < 1:
        raise ValueError(f"--cpu-devices must be >= 1, got {requested}")
    count = requested
    if count is None:
        if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
            return
        cores = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
        count = max(d for d in range(1, cores + 1) if not batch_size or batch_size % d == 0)
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        if requested is not None:
            raise ValueError(
                "JAX has started already in this process: --cpu-devices needs a new process"
            ) from None


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import version

        typer.echo(f"jaxmask {version('jaxmask')}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Segmentation datasets from a text-to-image diffusion model: for each prompt an image and a
    label map of the classes it names, read out of Stable Diffusion's own attention.

    Start with `jaxmask generate --out data --per-class 2` (the bundled toy model), then
    `jaxmask preview data`. Each command's --help lists its options.
    """


@app.command(cls=_Command, short_help="Check every mask method on synthetic maps of a known scene.")
def demo(
    out: Path = typer.Option(Path("jaxmask-demo"), help="folder for demo.png"),
    size: int = typer.Option(128, min=16, max=1024, help="image side in pixels"),
    seed: int = typer.Option(0, help="key for the synthetic maps' noise"),
    pamr: bool = typer.Option(False, help="refine with PAMR (reference defaults)"),
) -> None:
    """Run every mask method on synthetic attention maps of a known scene; print mIoU and
    write a contact sheet (image | labels | soft map per class)."""
    from ports import demo as demo_run  # jax import deferred: --help stays fast

    result = demo_run.run(out, size=size, seed=seed, pamr=pamr)
    width = max(len(n) for n in result.miou)
    typer.echo(f"{'method':<{width}}  mIoU vs known labels")
    for name, value in result.miou.items():
        typer.echo(f"{name:<{width}}  {value:.3f}")
    typer.echo(f"contact sheet: {result.sheet}")


@app.command(cls=_Command, short_help="Generate a segmentation dataset (resumable).")
def generate(
    out: Path = typer.Option(
        ..., "--out", "-o", metavar="DIR", help="dataset folder (created, or resumed)"
    ),
    classes: str = typer.Option(
        None,
        metavar="CLASSES",
        help="'voc', 'cityscapes', 'shapes', 'cat,dog,...' or @file (one per line); default "
        "'shapes' with the bundled model, 'voc' with --model",
    ),
    per_class: int = typer.Option(..., "--per-class", "-n", metavar="N", help="images per class"),
    template: list[str] = typer.Option(
        [], metavar="TEMPLATE", help="prompt template with {class}; repeat for several"
    ),
    prompts: Path = typer.Option(
        None,
        metavar="FILE",
        help='JSONL of {"prompt": ..., "classes": [...]} (several classes per prompt)',
    ),
    model: str = typer.Option(
        None,
        metavar="MODEL",
        help="diffusers-format folder or hub id (default: the bundled toy model)",
    ),
    method: str = typer.Option(
        "seediff-code", metavar="METHOD", help="seediff-code, seediff-paper, ca or ca_sa"
    ),
    param: list[str] = typer.Option(
        [], metavar="NAME=VALUE", help="a method parameter, e.g. beta=0.5; repeatable"
    ),
    steps: int = typer.Option(50, metavar="N", help="denoising steps"),
    guidance: float = typer.Option(
        7.5, metavar="SCALE", help="classifier-free guidance scale (1: none)"
    ),
    size: int = typer.Option(
        None, metavar="PIXELS", help="image side in pixels (default: the model's)"
    ),
    scheduler: str = typer.Option("ddim", metavar="NAME", help="ddim, pndm or dpm++"),
    negative_prompt: str = typer.Option(
        "", metavar="TEXT", help="what the images should not show, for every prompt"
    ),
    seed: int = typer.Option(0, metavar="N", help="item i uses fold_in(key(seed), i)"),
    batch_size: int = typer.Option(4, metavar="N", help="images per sampler call"),
    cpu_devices: int = typer.Option(
        None,
        metavar="N",
        help="on a CPU, devices to split each batch over (default: one per core that divides "
        "the batch size, at most 8)",
    ),
    dtype: str = typer.Option("float32", metavar="DTYPE", help="float32, bfloat16 or float16"),
    format: str = typer.Option(
        "voc", metavar="FORMAT", help="voc (folder) or webdataset (tar shards)"
    ),
    pamr: bool = typer.Option(False, help="refine masks with PAMR"),
    soft_masks: bool = typer.Option(False, help="also store 64x64 soft masks (float16 .npz)"),
    min_area: float = _filter_option(
        "drop items where a named class covers less than this fraction of the image (its "
        "manifest line keeps the reason; no files)"
    ),
    max_area: float = _filter_option(
        "drop items where a named class covers more than this fraction"
    ),
    min_confidence: float = _filter_option(
        "drop items where a named class's mask is unsure: its mean soft score inside the mask "
        "is under F (0-1; the manifest records each score)"
    ),
    val_fraction: float = typer.Option(
        0.0,
        metavar="F",
        help="put about this fraction of the items in ImageSets/Segmentation/val.txt (by a hash "
        "of seed and index: a resume or host count never moves an item)",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="replace a dataset made with another config"
    ),
    coordinator: str = typer.Option(
        None, metavar="HOST:PORT", help="multi-host: the coordinator (jax.distributed)"
    ),
    num_processes: int = typer.Option(None, metavar="N", help="multi-host: number of processes"),
    process_id: int = typer.Option(None, metavar="I", help="multi-host: this process's id"),
    compilation_cache: str = typer.Option(
        compile_cache.DEFAULT,
        metavar="DIR",
        help="folder for compiled programs reused by later runs; 'none' for off",
    ),
) -> None:
    """Generate a segmentation dataset: images, label maps (VOC palette, 255 ignore), a manifest.
    Resumes an interrupted run; on several hosts each writes its share."""
    import time

    from ports import generate as gen
    from ports import plan as plans
    from ports.scale import hosts

    if classes is None:
        classes = "voc" if model else "shapes"
    try:
        if coordinator is not None or num_processes is not None or process_id is not None:
            hosts.check_cluster(coordinator, num_processes, process_id)
        plan = plans.make_plan(classes, per_class, template, prompts)
        params = tuple((k, _parse_value(v)) for k, v in (_split_param(p) for p in param))
        cfg = gen.RunConfig(
            plan=plan,
            model=model,
            method=method,
            method_params=params,
            steps=steps,
            guidance=guidance,
            size=size,
            scheduler=scheduler,
            negative_prompt=negative_prompt,
            seed=seed,
            dtype=dtype,
            format=format,
            pamr=pamr,
            soft_masks=soft_masks,
            val_fraction=val_fraction,
            min_area=min_area,
            max_area=max_area,
            min_confidence=min_confidence,
        )
        try:
            cfg.method_config()
        except ValueError as err:  # name the flag the error is about
            named = [p for p in param if str(err).startswith(_split_param(p)[0] + " ")]
            where = f"--param {named[0]}" if named else f"--method {method}"
            raise ValueError(f"{where}: {err}") from err
        gen.check(cfg, batch_size)  # everything the model is not needed for, before loading it
    except (ValueError, TypeError) as err:
        _fail(err)
    try:
        _cpu_devices(cpu_devices, batch_size)
    except ValueError as err:
        _fail(err)
    hosts.initialize_distributed(coordinator, num_processes, process_id)
    try:
        compile_cache.enable(compilation_cache)
    except OSError as err:
        _fail(err)
    import jax

    bar = progress.bar(disable=jax.process_index() != 0)  # process 0 shows it
    start, task, made = time.perf_counter(), None, 0

    def on_start(total, done):  # the folder is open, so every check has passed: draw the bar
        nonlocal task
        bar.start()
        # The first batch compiles the sampler (about 30 s for the toy model on a CPU; the
        # compilation cache makes later runs start at once): say so, not a frozen 0/N.
        task = bar.add_task("compiling the sampler", total=total, completed=done, rate="")

    def on_batch(n):
        nonlocal made
        made += n * jax.process_count()
        bar.update(task, advance=n * jax.process_count(), description="generate")
        bar.update(task, rate=f"{made / (time.perf_counter() - start):.2f} img/s")

    try:
        result = gen.run(
            cfg,
            out,
            batch_size=batch_size,
            overwrite=overwrite,
            on_start=on_start,
            on_batch=on_batch,
        )
    except (ValueError, OSError) as err:
        if task is not None:
            bar.stop()
        _fail(err)
    bar.stop()
    if jax.process_index() == 0:
        damaged = f", {result.damaged} damaged and made again" if result.damaged else ""
        dropped = f" ({result.filtered} filtered out, no files)" if result.filtered else ""
        typer.echo(
            f"{result.written} generated, {result.resumed} already there{damaged}, "
            f"{result.total} in {result.out}{dropped} ({result.seconds:.1f} s)"
        )


@app.command(cls=_Command, short_help="Check a dataset's files against its manifest.")
def verify(
    dataset: Path = typer.Argument(..., metavar="DATASET", help="a jaxmask dataset folder"),
) -> None:
    """Check every item's files against the manifest (size and sha256). Exits 1 and names the
    items when any differ or are missing; `jaxmask generate` with the same flags remakes them."""
    import time

    from ports.store import StoreError
    from ports.store import verify as verify_dataset

    start = time.perf_counter()
    try:
        found = verify_dataset(dataset)
    except (StoreError, ValueError) as err:
        _fail(err)
    from ports.store.dataset import read_run_config

    plan = read_run_config(dataset).get("plan") or {}
    total = plan.get("items_per_class", 0) * len(plan.get("classes", ())) or None
    seconds = time.perf_counter() - start
    for name, problem in found.problems:
        typer.echo(f"{name}: {problem}")
    missing = total - len(found.items) - len(found.problems) if total else 0
    if found.problems:
        typer.echo(
            f"{len(found.problems)} damaged item(s) in {dataset}: run the same jaxmask generate "
            "command again to make them again",
            err=True,
        )
    if missing > 0:
        typer.echo(
            f"{missing} of {total} items are not made yet: run the same jaxmask generate "
            "command again to finish",
            err=True,
        )
    if found.problems or missing > 0:
        raise typer.Exit(1)
    typer.echo(
        f"ok: {len(found.items)} items in {dataset}, every file as written ({seconds:.1f} s)"
    )


@app.command(cls=_Command, short_help="A dataset as Hugging Face Parquet or COCO instances.")
def export(
    dataset: Path = typer.Argument(..., metavar="DATASET", help="a finished jaxmask VOC dataset"),
    out: Path = typer.Argument(..., metavar="OUT", help="the new folder to write"),
    to: str = typer.Option(..., "--to", metavar="FORMAT", help="hf (datasets Parquet) or coco"),
) -> None:
    """Write DATASET in a format training code loads as it is: `--to hf` for
    `datasets.load_dataset(OUT)` (image and label as Image features, class names in the
    schema), `--to coco` for pycocotools, detectron2 and mmdet (one instance per connected
    component of each class, RLE masks). Needs `pip install 'jaxmask[export]'`."""
    from ports import export as exporters
    from ports.store import StoreError

    writers = {"hf": exporters.to_hf, "coco": exporters.to_coco}
    if to not in writers:
        _fail(ValueError(f"--to must be hf or coco, got {to!r}"))
    try:
        result = writers[to](dataset, out)
    except ImportError as err:
        _fail(ValueError(f"{err.name} is not installed: pip install 'jaxmask[export]'"))
    except (StoreError, ValueError, OSError) as err:
        _fail(err)
    splits = ", ".join(f"{n} {k}" for k, n in result.splits.items())
    extra = f", {result.instances} instances" if result.instances is not None else ""
    typer.echo(f"{result.items} items ({splits}{extra}) -> {result.out}")


@app.command(cls=_Command, short_help="A contact sheet of a dataset's first items.")
def preview(
    dataset: Path = typer.Argument(
        ..., metavar="DATASET", help="a jaxmask dataset folder (VOC layout)"
    ),
    out: Path = typer.Option(
        None,
        metavar="FILE",
        help="PNG to write (default: DATASET-preview.png beside the dataset, not in it, where "
        "dataset loaders would find it)",
    ),
    count: int = typer.Option(8, min=1, metavar="N", help="items to show"),
) -> None:
    """A contact sheet of a dataset: image | label overlay | label map, one row per item."""
    from ports import render

    dataset = Path(os.path.normpath(dataset))  # "data/" names the folder "data"
    try:
        path = render.preview_dataset(
            dataset, out or dataset.with_name(f"{dataset.name}-preview.png"), count
        )
    except (ValueError, OSError) as err:
        _fail(err)
    typer.echo(f"contact sheet: {path}")


@app.command(cls=_Command, short_help="A contact sheet of masks for a few prompts.")
def sheet(
    prompt: list[str] = typer.Argument(
        None,
        metavar="PROMPT...",
        help="prompts; default: six toy-world prompts for the bundled model",
    ),
    classes: list[str] = typer.Option(
        [], "--classes", "-c", help="the classes of each prompt, comma-separated; one per prompt"
    ),
    out: Path = typer.Option(Path("jaxmask-sheet.png"), "--out", "-o", help="PNG to write"),
    model: str = typer.Option(None, help="diffusers-format folder or hub id (default: bundled)"),
    method: str = typer.Option("seediff-code", help="seediff-code, seediff-paper, ca or ca_sa"),
    steps: int = typer.Option(50, min=1),
    guidance: float = typer.Option(7.5),
    seed: int = typer.Option(0),
    pamr: bool = typer.Option(False, help="refine masks with PAMR"),
    compilation_cache: str = typer.Option(
        compile_cache.DEFAULT,
        help="folder for compiled programs reused by later runs; 'none' for off",
    ),
) -> None:
    """A contact sheet for a few prompts: image | label overlay | per-class soft maps."""
    from ports import render

    if not prompt:
        if classes:
            _fail(ValueError("--classes without prompts: give the prompts too"))
        prompt, names = zip(*render.SHEET_PROMPTS, strict=True)
    else:
        if len(classes) != len(prompt):
            _fail(
                ValueError(
                    f"{len(prompt)} prompts but {len(classes)} --classes: give one --classes "
                    "per prompt, e.g. -c cat 'a photo of a cat'"
                )
            )
        names = [tuple(c.strip() for c in text.split(",") if c.strip()) for text in classes]
    import jax

    import jaxmask
    from ports import api
    from ports.sd.sample import check_guidance, check_steps

    try:
        render.check_png_path(out)
        check_steps(steps)
        check_guidance(guidance)
        api.check_seed(seed)
        jaxmask.methods.get(method)  # an unknown method fails before the model loads
        compile_cache.enable(compilation_cache)
        pipe = api.load(model)
        rows = []
        # One generate call per class count (a batch shares the number of classes).
        for k in sorted({len(n) for n in names}):
            idx = [i for i, n in enumerate(names) if len(n) == k]
            result = pipe.generate(
                [prompt[i] for i in idx],
                jax.random.key(seed),
                classes=[list(names[i]) for i in idx],
                method=method,
                steps=steps,
                guidance=guidance,
                pamr=pamr,
                item_ids=idx,
            )
            rows += list(zip(idx, render.prompt_rows(result), strict=True))
    except (ValueError, OSError) as err:
        _fail(err)
    path = render.write_sheet([row for _, row in sorted(rows, key=lambda r: r[0])], out, tile=128)
    typer.echo(f"contact sheet: {path}")


def _window(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        start, stop = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--window {text!r} must be START,STOP, e.g. 0,0.5") from None
    return start, stop


def _split_param(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ValueError(f"method parameter {text!r} must be NAME=VALUE, e.g. beta=0.5")
    name, value = text.split("=", 1)
    return name.strip(), value.strip()


def _parse_value(text: str):
    """Numbers, booleans and None as such; anything else stays a string."""
    import json

    try:
        value = json.loads(text)
    except ValueError:
        return text
    return tuple(value) if isinstance(value, list) else value  # configs are hashable


def _fail(err: Exception) -> None:
    """Bad input: one line that says what to do (in flags, see ``ports.errors``), exit code 2,
    no traceback."""
    from ports.errors import for_cli

    typer.echo(f"error: {for_cli(err)}", err=True)
    raise typer.Exit(2)


@app.command(cls=_Command, short_help="DiffuMask's augmentations of a dataset, as a new one.")
def augment(
    src: Path = typer.Argument(
        ..., metavar="SOURCE", help="an existing jaxmask dataset (VOC layout)"
    ),
    dst: Path = typer.Argument(..., metavar="DEST", help="the new dataset's folder"),
    count: int = typer.Option(..., "--count", "-n", min=1, help="items to write"),
    seed: int = typer.Option(0, help="item i uses fold_in(key(seed), i)"),
    size: int = typer.Option(None, help="output side in pixels (default: the source's)"),
    grids: str = typer.Option(
        None, help="mosaics, e.g. '1x2,2x2,3x3' (default DiffuMask's 1x2..8x8)"
    ),
    perspective: float = typer.Option(0.5, min=0, max=1, help="probability of a perspective warp"),
    occlusion: float = typer.Option(0.5, min=0, max=1, help="probability of an occluder"),
    noise: float = typer.Option(0.5, min=0, max=1, help="probability of Gaussian noise"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="replace a dataset made with other settings"
    ),
) -> None:
    """DiffuMask's augmentations (splicing mosaics, perspective, occlusion, noise) over an
    existing dataset, written as a new dataset; image and labels stay aligned. Resumable."""
    import time

    from jaxmask.augment import DIFFUMASK, AugmentConfig
    from ports.augment import augment_dataset

    cfg = DIFFUMASK
    try:
        if size is not None and size < 1:
            raise ValueError(f"--size must be a positive number of pixels, got {size}")
        if grids is not None:
            pairs = [g.strip().lower().split("x") for g in grids.split(",")]
            if not all(len(p) == 2 and all(v.isdigit() and int(v) > 0 for v in p) for p in pairs):
                raise ValueError(
                    f"--grids takes ROWSxCOLS mosaics separated by commas, e.g. 1x2,2x2,3x3; "
                    f"got {grids!r}"
                )
            pairs = [tuple(int(v) for v in p) for p in pairs]
            cfg = AugmentConfig(grids=tuple(pairs), grid_weights=(1.0,) * len(pairs))
        cfg = dataclasses.replace(
            cfg, perspective_prob=perspective, occlusion_prob=occlusion, noise_prob=noise
        )
    except ValueError as err:
        _fail(err)
    start = time.perf_counter()
    with progress.bar() as bar:
        task = bar.add_task("augment", total=count, rate="")

        def on_item(_index, _id):
            done = bar.tasks[task].completed + 1
            bar.update(task, advance=1, rate=f"{done / (time.perf_counter() - start):.1f} img/s")

        try:
            result = augment_dataset(
                src,
                dst,
                seed,
                cfg,
                count,
                size=(size, size) if size is not None else None,
                overwrite=overwrite,
                on_item=on_item,
            )
        except (ValueError, OSError) as err:
            _fail(err)
    typer.echo(
        f"{result.written} written, {result.total - result.written} already there -> {result.out}"
    )


@app.command(cls=_Command, short_help="Measure mask quality on the toy world (docs/quality.md).")
def quality(
    model: str = typer.Option(
        None, help="diffusers-format folder (default: the bundled toy model)"
    ),
    per_class: int = typer.Option(200, "--per-class", "-n", min=1, help="images per class"),
    seed: int = typer.Option(0, help="scenes, prompts, noise and segmenters derive from it"),
    out: Path = typer.Option(Path("docs/quality.md"), help="markdown page to (re)write"),
    json_path: Path = typer.Option(None, "--json", help="also write the full result as JSON"),
    steps: int = typer.Option(50, min=1, help="denoising steps"),
    oracle_steps: int = typer.Option(
        None, help="segmenter steps (default: 50 x per-class, 400..3000)"
    ),
    oracle_cache: str = typer.Option(
        "~/.cache/jaxmask", help="folder caching the trained oracle; 'none' to always retrain"
    ),
    param: list[str] = typer.Option(
        [], help="METHOD:NAME=VALUE method override, e.g. seediff-code:seed_resolution=8"
    ),
    window: str = typer.Option(
        None, help="capture only in START,STOP (fractions of the steps), e.g. 0,0.5"
    ),
    every: int = typer.Option(None, min=1, help="capture every k-th step"),
    min_area: float = _filter_option("also score the pairs generate --min-area F would keep"),
    max_area: float = _filter_option("also score the pairs generate --max-area F would keep"),
    min_confidence: float = _filter_option(
        "also score the pairs generate --min-confidence F would keep"
    ),
) -> None:
    """Measure mask quality on the toy world: every method (with and without PAMR) against a
    supervised oracle on generated images, and a segmenter trained on jaxmask's pairs tested on
    real scenes; print the table and write it to --out (docs/quality.md)."""
    import json
    import sys

    from ports.generate import Filters
    from ports.toyworld import quality as q

    overrides: dict[str, dict] = {}
    try:
        bounds = (min_area, max_area, min_confidence)
        filters = Filters(*bounds) if any(b is not None for b in bounds) else None
        for text in param:
            method, _, assignment = text.partition(":")
            if not assignment:
                raise ValueError(f"--param {text!r} must be METHOD:NAME=VALUE")
            name, value = _split_param(assignment)
            overrides.setdefault(method.strip(), {})[name] = _parse_value(value)
        result = q.measure(
            Path(model) if model else q.DEFAULT_MODEL,
            per_class=per_class,
            seed=seed,
            steps=steps,
            oracle_steps=oracle_steps,
            method_overrides=overrides,
            oracle_cache=None if oracle_cache == "none" else Path(oracle_cache).expanduser(),
            window=_window(window),
            every=every,
            filters=filters,
        )
    except (ValueError, OSError) as err:
        _fail(err)
    page = q.render_markdown(result, command=" ".join(["jaxmask", *sys.argv[1:]]))
    typer.echo(page)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    if json_path:
        json_path.write_text(json.dumps(result, indent=1))
    typer.echo(f"wrote {out}" + (f" and {json_path}" if json_path else ""))


@app.command(
    "train-toy", cls=_Command, short_help="Train the bundled toy model from scratch (resumable)."
)
def train_toy(
    out: Path = typer.Option(..., "--out", "-o", help="folder for the diffusers-format model"),
    preset: str = typer.Option(
        "cpu", help="cpu (the bundled model, 16x16 latents), gpu (32x32 latents), smoke"
    ),
    seed: int = typer.Option(0, help="data, initialisation and noise all derive from it"),
    max_minutes: float = typer.Option(
        None, help="stop this segment after this wall time (checkpoint saved; --resume goes on)"
    ),
    resume: bool = typer.Option(False, help="continue the run saved in the checkpoint folder"),
    checkpoint_dir: Path = typer.Option(
        None, "--checkpoint", help="folder of the resumable training state [default: OUT.train]"
    ),
    checkpoint_minutes: float = typer.Option(10.0, help="minutes between checkpoint saves"),
    cpu_devices: int = typer.Option(
        None, help="CPU devices to split each batch over (default: one per core, at most 8)"
    ),
) -> None:
    """Train the toy Stable Diffusion (VAE, CLIP text encoder, UNet) on the shapes world from
    scratch and save it in diffusers format (the bundled model was made with --preset cpu).

    Training is resumable: the state is saved to the checkpoint folder every few minutes and
    when a segment stops (--max-minutes, or Ctrl-C: it stops after the current chunk); the same
    command with --resume continues it and gives the same weights as one uninterrupted run."""

    if preset not in _train_presets():
        _fail(ValueError(f"unknown preset {preset!r}; choose from {sorted(_train_presets())}"))
    if max_minutes is not None and not max_minutes > 0:
        _fail(ValueError(f"--max-minutes must be > 0, got {max_minutes}"))
    if not checkpoint_minutes > 0:
        _fail(ValueError(f"--checkpoint-minutes must be > 0, got {checkpoint_minutes}"))
    try:
        _cpu_devices(cpu_devices)
    except ValueError as err:
        _fail(err)
    from ports.toyworld import train

    try:
        record = train.train(
            out,
            train.PRESETS[preset],
            seed=seed,
            max_minutes=max_minutes,
            resume=resume,
            checkpoint_dir=checkpoint_dir,
            checkpoint_minutes=checkpoint_minutes,
        )
    except ValueError as err:
        _fail(err)
    where = f"VAE step {record['vae_steps_done']}, UNet step {record['unet_steps_done']}"
    if "scaling_factor" not in record:  # stopped inside the VAE stage: nothing to export yet
        typer.echo(f"stopped at {where}; the checkpoint is saved: add --resume to go on")
        return
    left = record["config"]["unet_steps"] - record["unet_steps_done"]
    typer.echo(
        f"saved {out} at {where}: vae loss {record['vae_loss'][-1]:.4f}, unet loss "
        f"{record['unet_loss'][-1]:.4f}; {record['segments'][-1]['minutes']:.1f} min on "
        f"{record['device']}" + (f"; {left} UNet steps left: add --resume to go on" if left else "")
    )


def _train_presets():
    from ports.toyworld.train import PRESETS

    return PRESETS


if __name__ == "__main__":
    app()
