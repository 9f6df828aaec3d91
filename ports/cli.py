"""The ``jaxmask`` command. Each command parses, builds a run config, validates, makes one call."""

import dataclasses
from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


@app.callback()
def main() -> None:
    """jaxmask: segmentation datasets from Stable Diffusion's own attention."""


@app.command()
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


def _fail(err: Exception) -> None:
    """Bad input: one line that says what to do, exit code 2, no traceback."""
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


def _progress(total: int, description: str):
    """A rich progress bar with images/s and ETA (process 0 only shows it)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn(description), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
    )


@app.command()
def augment(
    src: Path = typer.Argument(..., help="an existing jaxmask dataset (VOC layout)"),
    dst: Path = typer.Argument(..., help="the new dataset's folder"),
    count: int = typer.Option(..., "--count", "-n", min=1, help="items to write"),
    seed: int = typer.Option(0, help="item i uses fold_in(key(seed), i)"),
    size: int = typer.Option(None, help="output side in pixels (default: the source's)"),
    grids: str = typer.Option(None, help="mosaics, e.g. '1x2,2x2,3x3' (default DiffuMask's 1x2..8x8)"),
    perspective: float = typer.Option(0.5, min=0, max=1, help="probability of a perspective warp"),
    occlusion: float = typer.Option(0.5, min=0, max=1, help="probability of an occluder"),
    noise: float = typer.Option(0.5, min=0, max=1, help="probability of Gaussian noise"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a dataset made with other settings"),
) -> None:
    """DiffuMask's augmentations (splicing mosaics, perspective, occlusion, noise) over an
    existing dataset, written as a new dataset; image and labels stay aligned. Resumable."""
    import time

    from jaxmask.augment import DIFFUMASK, AugmentConfig
    from ports.augment import augment_dataset

    cfg = DIFFUMASK
    try:
        if grids:
            pairs = [tuple(int(v) for v in g.lower().split("x")) for g in grids.split(",")]
            cfg = AugmentConfig(grids=tuple(pairs), grid_weights=(1.0,) * len(pairs))
        cfg = dataclasses.replace(cfg, perspective_prob=perspective, occlusion_prob=occlusion,
                                  noise_prob=noise)
    except ValueError as err:
        _fail(err)
    start = time.perf_counter()
    with _progress(count, "augment") as bar:
        task = bar.add_task("augment", total=count, rate="")

        def on_item(_index, _id):
            done = bar.tasks[task].completed + 1
            bar.update(task, advance=1, rate=f"{done / (time.perf_counter() - start):.1f} img/s")

        try:
            result = augment_dataset(src, dst, seed, cfg, count, size=(size, size) if size else None,
                                     overwrite=overwrite, on_item=on_item)
        except (ValueError, OSError) as err:
            _fail(err)
    typer.echo(f"{result.written} written, {result.total - result.written} already there -> {result.out}")


if __name__ == "__main__":
    app()
