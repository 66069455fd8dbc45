"""Reading image files: which files are images, full decoding with a clear error, bit depth, tensors.

Shared by the dataset loaders, synthesis and the tools that read synthesis folders."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image

from defectfill.errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def image_files(folder: Path) -> list[Path]:
    """Image files of a folder, sorted by name; other files (README, .DS_Store, ...) are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)


def to_8bit(image: Image.Image) -> Image.Image:
    """An 8-bit image for any PIL mode: 16-bit grayscale (``I;16*``) is scaled by its type's range (/257);
    ``I`` (32-bit int) and ``F`` (float) by the range their values use: [0, 1] floats and values up to 255
    are taken as 8-bit scale, up to 65535 as 16-bit, beyond by their maximum. PIL's own ``convert`` clips
    instead, so a 16-bit image would turn white. 8-bit modes are returned as they are."""
    if image.mode not in HIGH_BIT_DEPTH_MODES:
        return image
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        scale = 65535.0
    else:
        peak = float(values.max()) if values.size else 0.0
        scale = 1.0 if image.mode == "F" and peak <= 1.0 else 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
    return Image.fromarray(np.clip(np.round(values / scale * 255.0), 0, 255).astype(np.uint8), mode="L")


def open_checked(path: Path, what: str) -> Image.Image:
    """The image at `path`, fully decoded now (a truncated or corrupt file fails here, named, not at the first
    training step)."""
    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise DatasetError(f"{what} {path} cannot be read as an image ({error})") from error
    return image


def check_images(paths: Iterable[Path], what: str) -> None:
    """Decode every image of `paths` once (each path once) before a tool writes anything: a truncated or corrupt
    file is named up front, not after part of the output is written."""
    for path in dict.fromkeys(Path(p) for p in paths):
        open_checked(path, what).close()


def to_signed_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a (3, H, W) float tensor in [-1, 1], the range the VAE and LPIPS take."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def read_rgb(path: str | Path, what: str) -> Image.Image:
    """The image at `path` as 8-bit RGB, read as synthesis reads a good image: fully decoded (a broken file fails
    here, named), a high bit depth scaled to 8 bits (`to_8bit`, not clipped to white), any other mode (palette,
    CMYK, grey, alpha) converted."""
    with open_checked(Path(path), what) as image:
        return to_8bit(image).convert("RGB")
