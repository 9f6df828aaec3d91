"""Contact sheets: image | label overlay | per-class soft maps, one row per item (PNG)."""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from jaxmask.labels import VOC_PALETTE


def overlay(image: np.ndarray, label_map: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Blend the VOC colour of each labelled pixel over the image (background untouched)."""
    colours = VOC_PALETTE[label_map].astype(np.float32)
    fg = (label_map > 0)[..., None]
    out = np.where(fg, (1 - alpha) * image.astype(np.float32) + alpha * colours, image)
    return out.astype(np.uint8)


def heat(soft: np.ndarray) -> np.ndarray:
    """A [0, 1] map as an RGB heat image (black -> red -> yellow -> white)."""
    s = np.clip(soft, 0.0, 1.0)[..., None]
    ramp = np.concatenate(
        [np.clip(3 * s, 0, 1), np.clip(3 * s - 1, 0, 1), np.clip(3 * s - 2, 0, 1)], -1
    )
    return (255 * ramp).astype(np.uint8)


def contact_sheet(rows: list[tuple[str, list[np.ndarray]]], tile: int = 160) -> Image.Image:
    """Grid of RGB uint8 panels; each row has a caption strip above it."""
    cols = max(len(panels) for _, panels in rows)
    caption = 16
    sheet = Image.new("RGB", (cols * tile, len(rows) * (tile + caption)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (text, panels) in enumerate(rows):
        y = i * (tile + caption)
        draw.text((4, y + 2), text, fill=(0, 0, 0))
        for j, panel in enumerate(panels):
            img = Image.fromarray(panel).resize((tile, tile), Image.NEAREST)
            sheet.paste(img, (j * tile, y + caption))
    return sheet


def write_sheet(rows, path: Path, tile: int = 160) -> Path:
    path = check_png_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        contact_sheet(rows, tile).save(tmp, format="PNG")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_png_path(path) -> Path:
    """``path`` as a place to write a PNG: not a folder, and its parent not a file.

    Raises:
      ValueError: saying which, and what to give instead.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{path} is a folder; give the PNG file to write, e.g. {path / 'sheet.png'}"
        )
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(
                    f"{parent} is a file, not a folder; choose another path for {path.name}"
                )
            break
    return path


def preview_dataset(dataset: Path, out: Path, count: int = 8, tile: int = 160) -> Path:
    """Contact sheet of the first ``count`` items of a VOC-layout jaxmask dataset."""
    import json

    dataset = Path(dataset)
    manifest = dataset / "manifest.jsonl"
    if not manifest.is_file():
        raise ValueError(f"{dataset} has no manifest.jsonl: is it a finished jaxmask VOC dataset?")
    rows = []
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    for record in [r for r in lines if not r.get("filtered")][:count]:
        with Image.open(dataset / "JPEGImages" / f"{record['id']}.jpg") as img:
            image = np.asarray(img.convert("RGB"))
        with Image.open(dataset / "SegmentationClass" / f"{record['id']}.png") as img:
            labels = np.asarray(img)
        rows.append(
            (
                f"{record['id']}: {record['prompt']}",
                [image, overlay(image, labels), VOC_PALETTE[labels]],
            )
        )
    if not rows:
        raise ValueError(f"{manifest} lists no items yet")
    return write_sheet(rows, Path(out), tile)


# The sheet's default prompts: one per toy-world class, in the world's caption grammar.
SHEET_PROMPTS = (
    ("a red star on a plain background", ("star",)),
    ("a blue circle on a striped background", ("circle",)),
    ("a yellow triangle on a checkered background", ("triangle",)),
    ("a green heart on a dotted background", ("heart",)),
    ("a red square and a blue ring on a plain background", ("square", "ring")),
    ("an orange moon and a purple cross on a gradient background", ("moon", "cross")),
)


def prompt_rows(result) -> list[tuple[str, list[np.ndarray]]]:
    """Rows of a ``GenerateResult``: image | label overlay | one heat map per class."""
    rows = []
    for i, prompt in enumerate(result.prompts):
        image, labels = result.images[i], result.label_maps[i]
        soft = [heat(s) for s in result.soft_masks[i]]
        rows.append(
            (f"{prompt}  [{', '.join(result.classes[i])}]", [image, overlay(image, labels), *soft])
        )
    return rows
