"""Real-IAD (as anomalib's parser reads it): ``--data_dir`` is one resolution folder (``realiad_1024``, ...) holding
``<class>/OK/SNNNN/*.jpg`` (defect-free; five camera views per sample) and ``<class>/NG/<code>/SNNNN/<name>.jpg``
with masks ``<name>_mask.png``. The defect codes become words (AK pit, BX deformation, CH abrasion, HS scratch,
PS damage, QS missing_parts, YW foreign_objects, ZW contamination; another code, lower-cased).

The split is the base JSON file, ``realiad_jsons/realiad_jsons/<class>.json`` next to or inside ``--data_dir``
(``train`` and ``test`` lists of image_path, mask_path, anomaly_class, paths relative to the class folder; a
view labelled OK is a good image). Without it: OK images are split train, NG images with a mask test, and an NG
view without a mask (the defect is not in sight) is not read.
"""

from __future__ import annotations

import json
from pathlib import Path

from defectfill.data.layouts.base import Layout, Sample, find_file, split_name
from defectfill.errors import DatasetError
from defectfill.images import image_files

CODES = {"AK": "pit", "BX": "deformation", "CH": "abrasion", "HS": "scratch", "PS": "damage", "QS": "missing_parts",
         "YW": "foreign_objects", "ZW": "contamination"}
GOOD, DEFECTIVE = "OK", "NG"


def defect_word(code: str) -> str:
    return CODES.get(code.upper(), code.lower())


def split_file(root: Path, object_class: str) -> Path | None:
    for base in (root, root.parent):
        path = base / "realiad_jsons" / "realiad_jsons" / f"{object_class}.json"
        if path.is_file():
            return path
    return None


def matches(root: Path, object_class: str) -> bool:
    folder = root / object_class
    return (folder / GOOD).is_dir() and (folder / DEFECTIVE).is_dir()


def _from_folders(folder: Path) -> list[Sample]:
    samples = [Sample(image, None, None, "train") for sample in sorted((folder / GOOD).iterdir()) for image in image_files(sample)]
    for code in sorted(p for p in (folder / DEFECTIVE).iterdir() if p.is_dir()):
        for sample in sorted(p for p in code.iterdir() if p.is_dir()):
            for image in image_files(sample):
                mask = None if image.stem.endswith("_mask") else find_file(sample, image.stem, ("_mask",))
                if mask is not None:
                    samples.append(Sample(image, mask, defect_word(code.name), "test"))
    return samples


def _entry(folder: Path, entry: dict, split: str, where: str) -> Sample:
    image = folder / entry["image_path"]
    if not image.is_file():
        raise DatasetError(f"{where}: image {image} does not exist")
    if entry.get("anomaly_class", GOOD) == GOOD:
        return Sample(image, None, None, split)
    if not entry.get("mask_path"):
        raise DatasetError(f"{where}: image {image} ({entry['anomaly_class']}) has no mask_path")
    mask = folder / entry["mask_path"]
    if not mask.exists():
        raise DatasetError(f"{where}: image {image} has no mask; {mask} does not exist")
    return Sample(image, mask, defect_word(entry["anomaly_class"]), split)


def read(root: Path, object_class: str) -> list[Sample]:
    folder, path = root / object_class, split_file(root, object_class)
    if path is None:
        return _from_folders(folder)
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DatasetError(f"cannot read the Real-IAD split {path}: {error}") from error
    samples = []
    for split in ("train", "test"):
        for entry in table.get(split, []) if isinstance(table, dict) else []:
            if not isinstance(entry, dict) or "image_path" not in entry:
                raise DatasetError(f"{path}: a {split} entry has no image_path: {entry!r}")
            samples.append(_entry(folder, entry, split_name(split, str(path)), str(path)))
    return samples


LAYOUT = Layout("realiad", "<class>/OK/S*/*.jpg and <class>/NG/<code>/S*/<name>.jpg with masks <name>_mask.png "
                "(split: realiad_jsons/realiad_jsons/<class>.json)", matches, read)
