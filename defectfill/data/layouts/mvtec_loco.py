"""MVTec LOCO AD (as anomalib's parser reads it): defective images
``<class>/test/{logical_anomalies,structural_anomalies}/NNN.png``, each with a folder of masks
``<class>/ground_truth/<kind>/NNN/000.png, 001.png, ...`` whose union is the defect (their grey values are below
255: any non-zero pixel is a defect); defect-free images ``<class>/train/good`` and ``<class>/validation/good``
(split train) and ``<class>/test/good`` (split test). The defect types are the two kinds."""

from __future__ import annotations

from pathlib import Path

from defectfill.data.layouts.base import Layout, Sample, good_samples, missing_mask
from defectfill.images import image_files

KINDS = ("logical_anomalies", "structural_anomalies")


def matches(root: Path, object_class: str) -> bool:
    return any((root / object_class / "test" / kind).is_dir() for kind in KINDS)


def read(root: Path, object_class: str) -> list[Sample]:
    folder = root / object_class
    samples = (good_samples(folder / "train" / "good", "train") + good_samples(folder / "validation" / "good", "train")
               + good_samples(folder / "test" / "good", "test"))
    for kind in KINDS:
        for image in image_files(folder / "test" / kind):
            masks = folder / "ground_truth" / kind / image.stem
            if not image_files(masks):
                raise missing_mask(image, masks / "000.png")
            samples.append(Sample(image, masks, kind, "test"))
    return samples


LAYOUT = Layout("mvtec_loco", "<class>/test/{logical_anomalies,structural_anomalies}/NNN.png with masks "
                "<class>/ground_truth/<kind>/NNN/000.png, 001.png, ...", matches, read)
