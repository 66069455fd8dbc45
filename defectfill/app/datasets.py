"""Where 'Add to dataset' writes on a public server, and how much: one folder per browser session under the dataset
root given at launch (named by a digest of the session id; no path from the client is joined to it), with caps on
the images and bytes of a session's folder and of the root in total (`PublicLimits`), and a result already in the
session's folder not stored again."""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from defectfill.app.limits import PublicLimits, format_bytes
from defectfill.errors import RequestRefused
from defectfill.runs.folder import read_metadata

PUBLIC_DATASET_ROOT = "outputs/app-datasets"
SESSION_PREFIX = "session-"

# 'Add to dataset' checks and writes under this lock: the caps count what is on disk, so two writes at once
# could both pass them (the public queue runs one event at a time per endpoint; this holds across endpoints).
WRITE_LOCK = threading.Lock()


def session_folder_name(session_hash: str) -> str:
    """The dataset folder of a session: a digest of the session id, so what a client sends as its session id
    never becomes part of a path."""
    return SESSION_PREFIX + hashlib.sha256(session_hash.encode("utf-8", "replace")).hexdigest()[:16]


def session_folder(root: Path, session_hash: str) -> Path:
    """The session's folder under `root`, created root first; refused when the root moved (a symbolic link),
    or the folder is, or holds, a symbolic link."""
    name = session_folder_name(session_hash)
    root.mkdir(parents=True, exist_ok=True)
    folder = root / name
    if root.resolve() != root:
        raise RequestRefused("the server's dataset root has moved (a symbolic link); nothing was written")
    if folder.is_symlink() or (folder.exists() and not folder.resolve().is_relative_to(root)):
        raise RequestRefused(f"the dataset folder {name} is a symbolic link out of the dataset root; nothing was written")
    for parent, names, files in os.walk(folder):
        for entry in names + files:
            if (Path(parent) / entry).is_symlink():
                shown = (Path(parent) / entry).relative_to(root)
                raise RequestRefused(f"the dataset folder {name} holds a symbolic link ({shown}); nothing was written")
    return folder


@dataclass(frozen=True)
class Usage:
    """What a folder stores: its images (the files under images/ of each dataset folder) and its bytes."""

    images: int = 0
    bytes: int = 0


def usage(folder: Path) -> Usage:
    """The images and bytes under `folder` (symbolic links are not followed)."""
    images = size = 0
    for parent, _, files in os.walk(folder):
        for name in files:
            with_stat = Path(parent) / name
            try:
                size += with_stat.lstat().st_size
            except OSError:  # removed meanwhile
                continue
            images += Path(parent).name == "images"
    return Usage(images, size)


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8) * 255)
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def stored_copy(folder: Path, image: bytes, mask: bytes) -> str | None:
    """The file name of an output of `folder` whose image and mask files hold these PNG bytes, else None."""
    image_digest, mask_digest = hashlib.sha256(image).digest(), hashlib.sha256(mask).digest()
    for name, row in sorted(read_metadata(folder).items()):
        try:
            if (hashlib.sha256((folder / name).read_bytes()).digest() == image_digest
                    and hashlib.sha256((folder / row["mask_file_name"]).read_bytes()).digest() == mask_digest):
                return name
        except (OSError, KeyError, TypeError):
            continue
    return None


def check_quota(root: Path, folder: Path, new_bytes: int, limits: PublicLimits) -> None:
    """Refuse a write of one more image (about `new_bytes`) that would take the session's folder or the dataset
    root past its caps."""
    mine, everyone = usage(folder), usage(root)
    caps = [(mine, limits.max_session_images, limits.max_session_bytes, "this session's dataset folder"),
            (everyone, limits.max_dataset_images, limits.max_dataset_bytes, "this server's datasets")]
    for used, max_images, max_bytes, what in caps:
        if used.images + 1 > max_images:
            raise RequestRefused(f"{what} already hold{'s' if what.startswith('this session') else ''} {used.images} "
                                 f"images, the most this server keeps ({max_images}); nothing was added")
        if used.bytes + new_bytes > max_bytes:
            raise RequestRefused(f"{what} would pass {format_bytes(max_bytes)}, the most this server keeps "
                                 f"({format_bytes(used.bytes)} used); nothing was added")
