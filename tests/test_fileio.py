"""fileio: outputs appear whole under their real names, or not at all."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from defectfill import fileio
from defectfill.fileio import save_image_atomic, write_json_atomic, write_text_atomic


def test_text_and_json_are_written_whole(tmp_path):
    path = write_json_atomic(tmp_path / "a" / "run.json", {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.json"]


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = write_text_atomic(tmp_path / "notes.txt", "old")
    monkeypatch.setattr(fileio.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        write_text_atomic(path, "new")
    assert path.read_text() == "old"


def test_image_format_follows_the_real_extension(tmp_path):
    path = save_image_atomic(Image.new("RGB", (4, 4), (1, 2, 3)), tmp_path / "x.png")
    assert Image.open(path).format == "PNG" and Image.open(path).getpixel((0, 0)) == (1, 2, 3)
    assert not list(tmp_path.glob(".*"))
