"""Does a toy model draw the shape a prompt names? The progress check of issue 17's training run.

Generates ``--per-class`` one-object images per class from "a {shape} on a plain background"
(the shapes preset's template; ``--colour`` puts a colour word in front of the shape), names each
image's shape with the descriptor classifier of ``tests/ports/toyworld/shape_check.py`` (~99%
right on real scenes), and prints the hits per class. ``--sheet`` writes the images as one PNG
(a row per class) to look at. The default model is the bundled one; pass a training run's
export to watch it learn:

    python bench/draws_shapes.py /work/run/model --per-class 6 --seed 1 --sheet /tmp/shapes.png

``--per-class 6 --seed 0`` is the test's own set
(``test_the_bundled_model_draws_the_named_shape_without_a_colour_word``: >= 32 of 48).
"""

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

import jaxmask
from ports.toyworld import scenes
from tests.ports.toyworld.shape_check import ShapeClassifier


def prompts(per_class: int, colour: bool) -> tuple[list[str], list[str]]:
    """The prompts and the shape each names: classes in turn, colours cycling when asked."""
    named = [name for name in scenes.CLASSES for _ in range(per_class)]
    colours = list(scenes.COLOURS)
    words = [
        f"{colours[i % len(colours)]} {name}" if colour else name for i, name in enumerate(named)
    ]
    return [f"a {w} on a plain background" for w in words], named


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None, help="model folder (default: bundled)")
    parser.add_argument("--per-class", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--colour", action="store_true", help="name a colour before the shape")
    parser.add_argument("--sheet", type=Path, help="write the images here as one PNG")
    args = parser.parse_args()
    if args.per_class < 1:
        parser.error(f"--per-class must be >= 1, got {args.per_class}")

    texts, named = prompts(args.per_class, args.colour)
    out = jaxmask.load(args.model).generate(
        texts, args.seed, steps=args.steps, guidance=args.guidance
    )
    classify = ShapeClassifier()
    drawn = [classify(np.asarray(image)) for image in out.images]
    per_class = {
        name: sum(d == n for d, n in zip(drawn, named, strict=True) if n == name)
        for name in scenes.CLASSES
    }
    hits = sum(per_class.values())
    print(f"{hits}/{len(named)} drawn as named ({'with' if args.colour else 'no'} colour word)")
    print(json.dumps({"hits": hits, "of": len(named), "per_class": per_class, "drawn": drawn}))
    if args.sheet is not None:
        from PIL import Image

        side = out.images.shape[1]
        grid = np.asarray(out.images).reshape(len(scenes.CLASSES), args.per_class, side, side, 3)
        grid = grid.transpose(0, 2, 1, 3, 4).reshape(len(scenes.CLASSES) * side, -1, 3)
        Image.fromarray(grid).save(args.sheet)
        print(f"sheet: {args.sheet} (a row per class: {', '.join(scenes.CLASSES)})")


if __name__ == "__main__":
    main()
