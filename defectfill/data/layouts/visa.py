"""VisA as downloaded (as anomalib's `prepare_data` reads it): ``<class>/Data/Images/Normal/*.JPG`` (defect-free),
``<class>/Data/Images/Anomaly/*.JPG`` with masks ``<class>/Data/Masks/Anomaly/<stem>.png`` whose values are
0, 1, 2 ... (any non-zero pixel is a defect), ``<class>/image_anno.csv`` (image, label, mask: the label names the
defect, "normal" for a good image; several labels "a,b" make the type "a+b") and, at the data root,
``split_csv/1cls.csv`` (object, split, label, image, mask: the train / test split of the benchmark). Paths in both
tables are relative to the data root. Without image_anno.csv every defect is of type "defect"; without 1cls.csv
defect-free images are split train and defective ones test."""

from __future__ import annotations

from pathlib import Path

from defectfill.data.layouts.base import DEFECT, Layout, Sample, find_mask, missing_mask, read_table, split_name, type_name
from defectfill.images import image_files

SPLIT_TABLE = Path("split_csv") / "1cls.csv"
ANNOTATIONS = "image_anno.csv"


def _key(path: str, object_class: str) -> str:
    """A path of the tables relative to the class folder ("Data/Images/Anomaly/000.JPG")."""
    parts = Path(path.replace("\\", "/")).parts
    return "/".join(parts[1:] if parts and parts[0] == object_class else parts).lower()


def _lookups(root: Path, object_class: str) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(label, mask, split) by image key, from image_anno.csv and split_csv/1cls.csv when they are there."""
    labels, masks, splits = {}, {}, {}
    annotations = root / object_class / ANNOTATIONS
    if annotations.is_file():
        for row in read_table(annotations, ("image", "label")):
            labels[_key(row["image"], object_class)] = row["label"]
            if row.get("mask"):
                masks[_key(row["image"], object_class)] = row["mask"]
    if (root / SPLIT_TABLE).is_file():
        for row in read_table(root / SPLIT_TABLE, ("object", "split", "image")):
            if row["object"] == object_class:
                splits[_key(row["image"], object_class)] = split_name(row["split"], str(root / SPLIT_TABLE))
    return labels, masks, splits


def matches(root: Path, object_class: str) -> bool:
    return (root / object_class / "Data" / "Images").is_dir()


def _mask_of(root: Path, folder: Path, image: Path, listed: str | None) -> Path:
    if listed:
        for candidate in (root / listed, folder / listed):
            if candidate.exists():
                return candidate
    mask = find_mask(folder / "Data" / "Masks" / "Anomaly", image, ("",))
    if mask is None:
        raise missing_mask(image, folder / "Data" / "Masks" / "Anomaly" / f"{image.stem}.png")
    return mask


def read(root: Path, object_class: str) -> list[Sample]:
    folder = root / object_class
    labels, masks, splits = _lookups(root, object_class)
    samples = []
    for image in image_files(folder / "Data" / "Images" / "Normal"):
        samples.append(Sample(image, None, None, splits.get(_key(f"Data/Images/Normal/{image.name}", ""), "train")))
    for image in image_files(folder / "Data" / "Images" / "Anomaly"):
        key = _key(f"Data/Images/Anomaly/{image.name}", "")
        label = labels.get(key)
        defect_type = type_name(label) if label and label.lower() != "normal" else DEFECT
        samples.append(Sample(image, _mask_of(root, folder, image, masks.get(key)), defect_type, splits.get(key, "test")))
    return samples


LAYOUT = Layout("visa", "<class>/Data/Images/{Normal,Anomaly}/*.JPG with masks <class>/Data/Masks/Anomaly/<name>.png "
                "(and <class>/image_anno.csv, split_csv/1cls.csv)", matches, read)
