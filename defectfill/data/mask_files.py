"""Reading defect masks as users have them.

A dataset's mask FILE marks a defect wherever a pixel is non-zero: 0/1 (VisA), 0/255 (MVTec AD), grey values
(MVTec LOCO), a palette or RGB image (any non-black colour), with an alpha channel (transparent pixels are not a
defect). JPEG masks are the one exception: lossy compression leaves small non-zero values around every edge, so
they are read at half range (`MASK_THRESHOLD`). A mask SOURCE is a file or a folder of files: several masks of
one image, whose union is its defect (LOCO's ``NNN/000.png, 001.png``).

Inside the pipeline, masks that were resized or generated keep the half-range rule of `defectfill.masks`
(`binarize_mask`): a dataset's mask is read here once, as 0/255, and from then on both rules agree.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from defectfill.errors import DatasetError
from defectfill.images import image_files, open_checked
from defectfill.masks import MASK_THRESHOLD

LOSSY_EXTENSIONS = (".jpg", ".jpeg")


def defect_pixels(mask: Image.Image, lossy: bool = False) -> np.ndarray:
    """Boolean (H, W): the pixels of a mask image that mark a defect (non-zero; >= `MASK_THRESHOLD` when `lossy`)."""
    if mask.mode == "P":
        mask = mask.convert("RGBA")
    values = np.asarray(mask)
    alpha = None
    if mask.mode in ("RGBA", "LA", "PA"):
        values, alpha = values[..., :-1], values[..., -1]
    defect = values >= MASK_THRESHOLD if lossy else values > 0
    if defect.ndim == 3:
        defect = defect.any(axis=-1)
    return defect & (alpha > 0) if alpha is not None else defect


def mask_files(source: Path) -> list[Path]:
    """The files of a mask source: the file itself, or the image files of a folder (none is an error)."""
    source = Path(source)
    if source.is_dir():
        files = image_files(source)
        if not files:
            raise DatasetError(f"mask folder {source} holds no image files")
        return files
    if not source.is_file():
        raise DatasetError(f"mask {source} does not exist")
    return [source]


def read_mask_file(path: Path) -> np.ndarray:
    with open_checked(Path(path), "mask") as image:
        return defect_pixels(image, Path(path).suffix.lower() in LOSSY_EXTENSIONS)


def read_mask(source: Path, image_path: Path | None = None, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """The boolean defect mask of a source (the union of its files). With `image_size` (width, height), a file of
    another size is an error naming it and `image_path`."""
    union = None
    for path in mask_files(source):
        mask = read_mask_file(path)
        size = (mask.shape[1], mask.shape[0])
        if image_size is not None and size != tuple(image_size):
            raise DatasetError(f"mask {path} is {size[0]}x{size[1]} but its image {image_path} is "
                               f"{image_size[0]}x{image_size[1]}; they must be the same size")
        if union is not None and mask.shape != union.shape:
            raise DatasetError(f"the masks of {source} differ in size ({path} is {size[0]}x{size[1]})")
        union = mask if union is None else union | mask
    return union


def is_empty_mask(source: Path) -> bool:
    return not read_mask(source).any()


def mask_image(mask: np.ndarray) -> Image.Image:
    """A boolean mask as the L image (0 / 255) every tool reads."""
    return Image.fromarray(mask.astype(np.uint8) * 255)


def open_mask(source: Path) -> Image.Image:
    """A mask source (a file, or a folder of several) as the L image (0 / 255) of its union: what a tool that
    opened a dataset's mask file with `Image.open` opens instead (a 0/1 or grey mask would read as empty at half
    range)."""
    return mask_image(read_mask(source))


def png_bytes(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    mask_image(mask).save(buffer, format="PNG")
    return buffer.getvalue()
