"""The README's main command, shrunk: `jaxmask demo` on synthetic maps of a known scene."""

from PIL import Image
from typer.testing import CliRunner

from ports.cli import app


def test_demo_command_writes_sheet_and_seediff_beats_plain_cross_attention(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--size", "64"])
    assert result.exit_code == 0, result.output
    scores = {}
    for line in result.output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("ca", "ca_sa", "seediff-paper", "seediff-code"):
            scores[parts[0]] = float(parts[1])
    assert set(scores) == {"ca", "ca_sa", "seediff-paper", "seediff-code"}
    # the scene's class tokens attend to one pixel per object: cross-attention alone cannot
    # recover the objects, self-attention expansion can (SeeDiff Table 5's ordering)
    assert scores["seediff-paper"] > 0.9 and scores["seediff-code"] > 0.9
    assert scores["ca"] < 0.5 < scores["ca_sa"]
    with Image.open(tmp_path / "demo.png") as sheet:
        assert sheet.size[0] > 0 and sheet.mode == "RGB"


def test_demo_rejects_bad_size(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--size", "3"])
    assert result.exit_code == 2
    assert "size" in result.output
