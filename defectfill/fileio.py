"""Atomic file writes: every output is written to a temporary name in the same folder and renamed into
place, so an interrupted run never leaves a half-written file under the real name."""

from __future__ import annotations

import json
import os
from pathlib import Path


def temporary_name(path: Path) -> Path:
    # Hidden, and marked .tmp: ignored by listings of images and by Hub uploads.
    return path.with_name(f".{path.name}.tmp")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | os.PathLike, payload) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def save_image_atomic(image, path: str | os.PathLike) -> Path:
    """A PIL image saved atomically; the format follows the real name's extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    from PIL import Image

    Image.init()
    image.save(tmp, format=Image.EXTENSION[path.suffix.lower()])  # the temporary name's extension is .tmp
    os.replace(tmp, path)
    return path
