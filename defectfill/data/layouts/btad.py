"""BTAD (as anomalib's BTech parser reads it): defect-free images ``<class>/train/ok`` (split train) and
``<class>/test/ok`` (split test), defective images ``<class>/test/ko``, .bmp and .png mixed, each with its mask
``<class>/ground_truth/ko/<stem>.<ext>`` (the image's stem, any image extension: product 01's .bmp images have
.png masks). The dataset does not name its defects: one type, "defect"."""

from __future__ import annotations

from pathlib import Path

from defectfill.data.layouts.base import DEFECT, Layout, Sample, defect_samples, good_samples


def matches(root: Path, object_class: str) -> bool:
    folder = root / object_class
    return (folder / "test" / "ko").is_dir() or (folder / "train" / "ok").is_dir()


def read(root: Path, object_class: str) -> list[Sample]:
    folder = root / object_class
    goods = good_samples(folder / "train" / "ok", "train") + good_samples(folder / "test" / "ok", "test")
    return goods + defect_samples(folder / "test" / "ko", folder / "ground_truth" / "ko", DEFECT, "test", ("",))


LAYOUT = Layout("btad", "<class>/{train/ok, test/ok, test/ko}/*.bmp|png with masks <class>/ground_truth/ko/<stem>.png|bmp",
                matches, read)
