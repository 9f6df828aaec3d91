"""The ``jaxmask`` command. Each command parses, builds a run config, validates, makes one call."""

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


if __name__ == "__main__":
    app()
