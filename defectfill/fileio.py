"""Atomic file writes: every output is written to a temporary name in the same folder and renamed into
place, so an interrupted run never leaves a half-written file under the real name. And the one check every tool
makes of its output folder before it writes anything (`check_output_folder`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from defectfill.errors import OutputFolderError


def check_output_folder(path: str | os.PathLike, flag: str) -> Path:
    """Before anything is written: `path` is a folder that exists or can be made, and that this process may write
    to. Refuses (naming `flag` and the folder) a path that is a file or lies under one, and a folder (or the nearest
    existing folder above a new one) without write permission (read-only, immutable, another user's)."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "exists and is not a folder" if existing == path else f"lies under {existing}, which is a file, not a folder"
        raise OutputFolderError(f"{flag} {path} {where}; choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "is not writable" if existing == path else f"cannot be made: {existing} is not writable"
        raise OutputFolderError(f"{flag} {path} {where} (permission denied, read-only or immutable); choose another "
                                f"{flag} or make the folder writable")
    return path


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
