"""MVTec AD 2 (as anomalib's parser reads it): defect-free images ``<class>/train/good`` and
``<class>/validation/good`` (split train) and ``<class>/test_public/good`` (split test); defective images
``<class>/test_public/bad/NNN.png`` with masks ``<class>/test_public/ground_truth/bad/NNN_mask.png``. The dataset
does not name its defects: one type, "defect". The private test sets (``test_private``, ``test_private_mixed``)
have no masks and no labels: they are not read."""

from __future__ import annotations

from pathlib import Path

from defectfill.data.layouts.base import DEFECT, Layout, Sample, defect_samples, good_samples


def matches(root: Path, object_class: str) -> bool:
    folder = root / object_class
    return any((folder / name).is_dir() for name in ("test_public", "test_private", "test_private_mixed"))


def read(root: Path, object_class: str) -> list[Sample]:
    folder = root / object_class
    goods = (good_samples(folder / "train" / "good", "train") + good_samples(folder / "validation" / "good", "train")
             + good_samples(folder / "test_public" / "good", "test"))
    test = folder / "test_public"
    return goods + defect_samples(test / "bad", test / "ground_truth" / "bad", DEFECT, "test")


LAYOUT = Layout("mvtec_ad2", "<class>/test_public/bad/*.png with masks <class>/test_public/ground_truth/bad/<name>_mask.png, "
                "good images in <class>/{train,validation,test_public}/good", matches, read)
