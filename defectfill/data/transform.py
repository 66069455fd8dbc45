"""The paired image / mask transform of training: both to the training resolution with the same random
augmentation, and, with `defect_crop_probability`, a crop around the defect first (the scale synthesis
generates at: `defectfill.masks.mask_crop_box`)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from defectfill.images import to_signed_tensor
from defectfill.masks import DEFAULT_CROP_CONTEXT, binarize_mask, mask_crop_box


@dataclass
class PairTransform:
    """Image and mask to `resolution` together, with the same random augmentation.

    Augmentation (the paper's): a random resize by a factor in `scale_range` then a random crop back to
    `resolution`, and an optional horizontal flip (off by default: some defects are orientation-specific).
    With `defect_crop_probability`, a square crop around the defect (`mask_crop_box`) is taken first, so
    training sees defects at the scale inference generates them (ours, not the paper's; off by default).
    Output: image (3, R, R) in [-1, 1]; mask (1, R, R) in {0, 1}.
    """

    resolution: int
    scale_range: tuple[float, float] = (1.0, 1.0)
    hflip: bool = False
    defect_crop_probability: float = 0.0
    defect_crop_context: float = DEFAULT_CROP_CONTEXT

    def __call__(self, image: Image.Image, mask: Image.Image, rng: random.Random | None = None):
        rng = rng or random
        if self.defect_crop_probability > 0 and rng.random() < self.defect_crop_probability:
            # The defect at full resolution, as inference generates it with --crop_to_mask.
            box = mask_crop_box(binarize_mask(mask), self.resolution, self.defect_crop_context)
            if box is not None:
                image, mask = image.crop(box), mask.crop(box)
        size = round(self.resolution * rng.uniform(*self.scale_range))
        size = max(size, self.resolution)
        image = image.convert("RGB").resize((size, size), Image.BICUBIC)
        mask = mask.convert("L").resize((size, size), Image.NEAREST)
        left, top = rng.randint(0, size - self.resolution), rng.randint(0, size - self.resolution)
        box = (left, top, left + self.resolution, top + self.resolution)
        image, mask = image.crop(box), mask.crop(box)
        if self.hflip and rng.random() < 0.5:
            image, mask = image.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
        image_tensor = to_signed_tensor(image)
        mask_tensor = torch.from_numpy(binarize_mask(mask).astype(np.float32))[None]
        return image_tensor.contiguous(), mask_tensor
