"""Your own images in a plain folder (anomalib's `Folder` shape)::

    <data_dir>/<class>/good/*.png              defect-free images (split train)
    <data_dir>/<class>/good_test/*.png         optional: defect-free images of the test set (split test)
    <data_dir>/<class>/defect/*.png            defective images, one defect type: "defect"
    <data_dir>/<class>/defect/<type>/*.png     ... or one subfolder per defect type
    <data_dir>/<class>/masks/[<type>/]<name>.png   their masks, matched by file stem (<name>_mask.png too);
                                               a folder masks/[<type>/]<name>/ of several masks is their union

Any image extension; a mask is a defect wherever it is non-zero (0/1, 0/255, grey, palette, RGB).
"""

from __future__ import annotations

from pathlib import Path

from defectfill.data.layouts.base import DEFECT, Layout, Sample, defect_samples, good_samples, subfolders
from defectfill.images import image_files

GOOD, GOOD_TEST, DEFECTS, MASKS = "good", "good_test", "defect", "masks"


def matches(root: Path, object_class: str) -> bool:
    folder = root / object_class
    return (folder / DEFECTS).is_dir() or (folder / GOOD).is_dir()


def read(root: Path, object_class: str) -> list[Sample]:
    folder = root / object_class
    samples = good_samples(folder / GOOD, "train") + good_samples(folder / GOOD_TEST, "test")
    defects, masks = folder / DEFECTS, folder / MASKS
    if image_files(defects):
        samples += defect_samples(defects, masks, DEFECT, "test", ("", "_mask"))
    for typed in subfolders(defects):
        samples += defect_samples(typed, masks / typed.name, typed.name, "test", ("", "_mask"))
    return samples


LAYOUT = Layout("folder", "<class>/good/*.png and <class>/defect/[<type>/]*.png with masks <class>/masks/[<type>/]<name>.png",
                matches, read)
