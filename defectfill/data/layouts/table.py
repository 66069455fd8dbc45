"""Your own images listed in a table: ``<data_dir>/<class>.csv`` with the columns

    image         path of the image, relative to the CSV's folder (``--data_dir``)
    mask          path of its mask (a file, or a folder of several masks: their union); empty for a good image
    defect_type   the defect's name; empty with a mask: "defect"; "good" (or empty without a mask): a good image
    split         optional: train or test (default: train for good images, test for defective ones)

One row per image; a defective row without a mask is an error naming the CSV line.
"""

from __future__ import annotations

from pathlib import Path

from defectfill.data.layouts.base import DEFECT, Layout, Sample, read_table, split_name
from defectfill.errors import DatasetError

COLUMNS = ("image", "mask", "defect_type")
GOOD = "good"


def table_path(root: Path, object_class: str) -> Path:
    return root / f"{object_class}.csv"


def matches(root: Path, object_class: str) -> bool:
    return table_path(root, object_class).is_file()


def _sample(root: Path, row: dict[str, str], where: str) -> Sample:
    if not row["image"]:
        raise DatasetError(f"{where}: no image")
    image, defect_type = root / row["image"], row["defect_type"] or None
    good = defect_type == GOOD or (defect_type is None and not row["mask"])
    if not good and not row["mask"]:
        raise DatasetError(f"{where}: image {image} of defect type {defect_type!r} has no mask")
    if not image.is_file():
        raise DatasetError(f"{where}: image {image} does not exist")
    default_split = "train" if good else "test"
    split = split_name(row["split"], where) if row.get("split") else default_split
    if good:
        return Sample(image, None, None, split)
    if not (root / row["mask"]).exists():
        raise DatasetError(f"{where}: image {image} has no mask; {root / row['mask']} does not exist")
    return Sample(image, root / row["mask"], defect_type or DEFECT, split)


def read(root: Path, object_class: str) -> list[Sample]:
    path = table_path(root, object_class)
    samples, lines = [], {}
    for line, row in enumerate(read_table(path, COLUMNS), start=2):
        where = f"{path} line {line}"
        sample = _sample(root, row, where)
        if sample.image in lines:
            raise DatasetError(f"{where}: image {sample.image} is listed again (first on line {lines[sample.image]}); "
                               "give several masks of one image as a folder")
        lines[sample.image] = line
        samples.append(sample)
    return samples


LAYOUT = Layout("csv", "<data_dir>/<class>.csv with the columns image, mask, defect_type[, split]", matches, read,
                class_folder=False)
