"""What every layout module returns: the same table of samples, whatever the folder looked like.

A `Sample` is one image of a product: its file, its defect mask (a file, or a folder whose image files are
unioned; None for a defect-free image), its defect type (None for a defect-free image) and the split the dataset
itself puts it in ("train" or "test"; a dataset's "validation" images count as "train": they are not its test
set). A `Layout` names a folder convention, says what it expects (for the message when nothing matches), tells
whether a folder holds it (`matches`) and reads it (`read`). The helpers below are the file-name rules the
layouts share."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from defectfill.errors import DatasetError
from defectfill.images import IMAGE_EXTENSIONS, image_files

# The defect type of a dataset that does not name its defects (MVTec AD 2, BTAD, KolektorSDD2, a plain folder
# without type subfolders): one word, the same in every layout.
DEFECT = "defect"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Sample:
    image: Path
    mask: Path | None = None
    defect_type: str | None = None
    split: str = "train"

    @property
    def is_good(self) -> bool:
        return self.defect_type is None


@dataclass(frozen=True)
class Layout:
    """A folder convention. `matches(root, object_class)` and `read(root, object_class)` take the data folder
    (``--data_dir``) and the product (``--object_class``); `expects` says what the folder must hold, with
    ``<class>`` for the product's folder."""

    name: str
    expects: str
    matches: Callable[[Path, str], bool]
    read: Callable[[Path, str], list[Sample]]
    class_folder: bool = True  # False: the product is only a name (KolektorSDD2, a table)


def find_file(folder: Path, stem: str, suffixes: tuple[str, ...] = ("",)) -> Path | None:
    """The image file ``<folder>/<stem><suffix>.<ext>`` for the first suffix that exists, any image extension
    (any case), or None."""
    if not folder.is_dir():
        return None
    by_name = {p.name.lower(): p for p in folder.iterdir() if p.is_file()}
    for suffix in suffixes:
        for extension in IMAGE_EXTENSIONS:
            found = by_name.get(f"{stem}{suffix}{extension}".lower())
            if found is not None:
                return found
    return None


def find_mask(folder: Path, image: Path, suffixes: tuple[str, ...] = ("_mask", "")) -> Path | None:
    """The mask of `image` in `folder`: a folder ``<stem>/`` of mask files (several masks of one image, unioned)
    or a file ``<stem><suffix>.<ext>``."""
    several = folder / image.stem
    if several.is_dir() and image_files(several):
        return several
    return find_file(folder, image.stem, suffixes)


def missing_mask(image: Path, expected: Path) -> DatasetError:
    return DatasetError(f"image {image} has no mask; expected {expected}")


def type_name(label: str) -> str:
    """A dataset's defect label as a defect type: lower case, words joined by "_" ("Chunk of wax missing" ->
    "chunk_of_wax_missing"); several labels of one image ("a,b") sorted and joined by "+"."""
    parts = sorted({re.sub(r"[^0-9a-z]+", "_", part.strip().lower()).strip("_") for part in label.split(",")} - {""})
    return "+".join(parts) or DEFECT


def good_samples(folder: Path, split: str) -> list[Sample]:
    return [Sample(path, None, None, split) for path in image_files(folder)]


def defect_samples(images: Path, masks: Path, defect_type: str, split: str,
                   suffixes: tuple[str, ...] = ("_mask", "")) -> list[Sample]:
    """The images of `images`, each with its mask found in `masks` (`find_mask`); a missing one is an error."""
    samples = []
    for image in image_files(images):
        mask = find_mask(masks, image, suffixes)
        if mask is None:
            raise missing_mask(image, masks / f"{image.stem}{suffixes[0]}{image.suffix}")
        samples.append(Sample(image, mask, defect_type, split))
    return samples


def subfolders(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name) \
        if folder.is_dir() else []


def split_name(value: str, where: str) -> str:
    """A split as a dataset writes it ("train", "val", "validation", "test", any case) as "train" or "test"."""
    value = value.strip().lower()
    if value in ("train", "training", "val", "valid", "validation"):
        return "train"
    if value in ("test", "testing"):
        return "test"
    raise DatasetError(f"{where}: split {value!r} is not train, validation or test")


def read_table(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """The rows of a CSV file with a header; a missing column is an error naming the file."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:
            reader = csv.DictReader(file)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(columns)}, "
                                   f"found {', '.join(reader.fieldnames or []) or 'none'}")
            return [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DatasetError(f"cannot read {path}: {error}") from error
