"""``jaxmask sheet``: a contact sheet for prompts (image | overlay | one soft map per class)."""

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from ports import render
from ports.cli import app


def test_sheet_has_one_row_per_prompt_and_a_panel_per_class(tiny_sd_path, tmp_path):
    out = tmp_path / "sheet.png"
    args = ["sheet", "a photo of a cat", "a dog on the table", "-c", "cat", "-c", "dog,table"]
    args += ["--model", str(tiny_sd_path), "--method", "ca", "--steps", "2", "--out", str(out)]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    with Image.open(out) as sheet:
        tile, caption = 128, 16
        assert sheet.size == ((2 + 2) * tile, 2 * (tile + caption))  # widest row: 2 classes
        pixels = np.asarray(sheet.convert("RGB"))
    # row 1 has one class: its 4th panel is the white page, row 2's is a soft map
    row1, row2 = pixels[caption : caption + tile], pixels[2 * caption + tile :]
    assert (row1[:, 3 * tile :] == 255).all() and not (row2[:, 3 * tile :] == 255).all()


def test_prompt_rows_known_panels():
    class Result:
        prompts = ("p",)
        classes = (("a", "b"),)
        images = np.zeros((1, 4, 4, 3), np.uint8)
        label_maps = np.array([[[0, 1, 2, 255]] * 4], np.uint8)
        soft_masks = np.stack([np.zeros((4, 4)), np.ones((4, 4))])[None]

    ((text, panels),) = render.prompt_rows(Result)
    assert text == "p  [a, b]" and len(panels) == 4
    np.testing.assert_array_equal(panels[2], np.zeros((4, 4, 3)))  # soft 0: black
    np.testing.assert_array_equal(panels[3], np.full((4, 4, 3), 255))  # soft 1: white


def test_mismatched_classes_exit_2_and_write_nothing(tmp_path):
    out = tmp_path / "sheet.png"
    run = CliRunner().invoke(app, ["sheet", "a cat", "a dog", "-c", "cat", "--out", str(out)])
    assert run.exit_code == 2 and "one --classes per prompt" in run.output, run.output
    run = CliRunner().invoke(app, ["sheet", "-c", "cat", "--out", str(out)])
    assert run.exit_code == 2 and "give the prompts too" in run.output, run.output
    assert not out.exists()
