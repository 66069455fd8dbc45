"""KolektorSDD2 (from the dataset's page; anomalib reads only the first KolektorSDD): flat ``train/`` and
``test/`` folders of ``NNNNN.png`` images, each with its mask ``NNNNN_GT.png``; a defect-free image has an
all-zero mask. There is no class folder: ``--data_dir`` is the folder holding ``train/`` and ``test/`` (or
``<data_dir>/<class>/`` does) and ``--object_class`` names the product for the prompts. The dataset does not name
its defects: one type, "defect". The split is the folder."""

from __future__ import annotations

from pathlib import Path

from defectfill.data.layouts.base import DEFECT, SPLITS, Layout, Sample, find_file, missing_mask
from defectfill.data.mask_files import is_empty_mask
from defectfill.images import image_files

MASK_SUFFIX = "_GT"


def _images(folder: Path) -> list[Path]:
    return [p for p in image_files(folder) if not p.stem.endswith(MASK_SUFFIX)]


def _holds_pairs(folder: Path) -> bool:
    return any(p.stem.endswith(MASK_SUFFIX) for split in SPLITS for p in image_files(folder / split))


def dataset_folder(root: Path, object_class: str) -> Path | None:
    """``<root>/<class>`` when it holds the layout, else ``<root>`` when it does, else None."""
    for folder in (root / object_class, root):
        if _holds_pairs(folder):
            return folder
    return None


def matches(root: Path, object_class: str) -> bool:
    return dataset_folder(root, object_class) is not None


def read(root: Path, object_class: str) -> list[Sample]:
    folder = dataset_folder(root, object_class)
    samples = []
    for split in SPLITS:
        for image in _images(folder / split):
            mask = find_file(folder / split, image.stem, (MASK_SUFFIX,))
            if mask is None:
                raise missing_mask(image, folder / split / f"{image.stem}{MASK_SUFFIX}.png")
            defect = not is_empty_mask(mask)
            samples.append(Sample(image, mask if defect else None, DEFECT if defect else None, split))
    return samples


LAYOUT = Layout("kolektorsdd2", "{train,test}/NNNNN.png with masks NNNNN_GT.png (all-zero for a good image), in --data_dir "
                "or <class>/", matches, read, class_folder=False)
