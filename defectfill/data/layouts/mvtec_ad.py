"""MVTec AD, and the DefectFill2 layout.

MVTec AD: defective images ``<class>/test/<defect>/NNN.png`` with masks ``<class>/ground_truth/<defect>/NNN_mask.png``
(``NNN.png`` is read too: anomalib's prepared VisA and other MVTec-shaped sets name masks as their images);
defect-free images ``<class>/train/good`` (split train) and ``<class>/test/good`` (split test). The defect types
are the folder names.

DefectFill2: defective images ``<class>/train/defective/<defect>/NNN.png`` with masks
``<class>/train/defective_masks/<defect>/NNN_mask.png``; defect-free images directly under ``<class>/`` (split
train) and in ``<class>/{train,test}/good``.
"""

from __future__ import annotations

from pathlib import Path

from defectfill.data.layouts.base import Layout, Sample, defect_samples, good_samples, subfolders
from defectfill.images import image_files

GOOD = "good"


def _typed_defects(images_root: Path, masks_root: Path, split: str) -> list[Sample]:
    samples = []
    for folder in subfolders(images_root):
        if folder.name != GOOD and image_files(folder):
            samples += defect_samples(folder, masks_root / folder.name, folder.name, split)
    return samples


def _goods(folder: Path) -> list[Sample]:
    return good_samples(folder / "train" / GOOD, "train") + good_samples(folder / "test" / GOOD, "test")


def matches_mvtec(root: Path, object_class: str) -> bool:
    folder = root / object_class
    return (folder / "ground_truth").is_dir() or (folder / "test").is_dir()


def read_mvtec(root: Path, object_class: str) -> list[Sample]:
    folder = root / object_class
    return _goods(folder) + _typed_defects(folder / "test", folder / "ground_truth", "test")


def matches_defectfill2(root: Path, object_class: str) -> bool:
    return (root / object_class / "train" / "defective").is_dir()


def read_defectfill2(root: Path, object_class: str) -> list[Sample]:
    folder = root / object_class
    defects = _typed_defects(folder / "train" / "defective", folder / "train" / "defective_masks", "train")
    return good_samples(folder, "train") + _goods(folder) + defects


MVTEC = Layout("mvtec", "<class>/test/<defect>/*.png with masks <class>/ground_truth/<defect>/<name>_mask.png",
               matches_mvtec, read_mvtec)
DEFECTFILL2 = Layout("defectfill2", "<class>/train/defective/<defect>/*.png with masks "
                     "<class>/train/defective_masks/<defect>/<name>_mask.png", matches_defectfill2, read_defectfill2)
