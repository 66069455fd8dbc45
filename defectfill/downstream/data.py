"""The image sets of the downstream protocol (`downstream_defectfill.py`), built from the project's own
loaders (`defectfill.data`): the real test set (held-out defects of the saved few-shot split plus every
``test/good`` image), the real training defects and good images, synthesis folders, and the copy-paste
baseline (real training defects cut out with their masks and pasted onto good images).

Every set is held in memory at one square resolution: images as uint8 (N, 3, R, R), masks as bool (N, R, R).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from defectfill.data.mvtec import GOOD, list_good_images, load_mvtec_defects, split_layout
from defectfill.data.split import select_split
from defectfill.errors import DatasetError
from defectfill.images import open_checked
from defectfill.masks import binarize_mask

# One defect of an image: its type and the centre (row, column) of its mask at the set's resolution.
Part = tuple[str, tuple[int, int]]


@dataclass
class ImageSet:
    """Images (N, 3, R, R) uint8, masks (N, R, R) bool, a defect type per image ("good" for none) and a name.
    `augment` (N,) bool: which images training augments (the few real defects; synthetic images are used as
    they are). `parts`: per image its defects, (type, mask centre) each; a `combined` image of the builder has
    several, any other one (its own type, its mask's centre)."""

    images: torch.Tensor
    masks: torch.Tensor
    defect_types: list[str]
    names: list[str] = field(default_factory=list)
    augment: torch.Tensor | None = None
    parts: list[list[Part]] | None = None

    def __post_init__(self):
        if self.augment is None:
            self.augment = torch.zeros(len(self.defect_types), dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.defect_types)

    def select(self, indices: Sequence[int]) -> "ImageSet":
        indices = list(indices)
        return ImageSet(self.images[indices], self.masks[indices], [self.defect_types[i] for i in indices],
                        [self.names[i] for i in indices] if self.names else [], self.augment[indices],
                        [self.parts[i] for i in indices] if self.parts is not None else None)

    def augmented(self, flag: bool = True) -> "ImageSet":
        """The same images, all marked to be augmented (or not) in training."""
        return ImageSet(self.images, self.masks, self.defect_types, self.names,
                        torch.full((len(self),), flag, dtype=torch.bool), self.parts)

    def defect_parts(self, index: int) -> list[Part]:
        """The defects of image `index`: its recorded parts, else one of its type at its mask's centre."""
        if self.parts is not None and self.parts[index]:
            return self.parts[index]
        return [(self.defect_types[index], mask_center(self.masks[index].numpy()))]

    @property
    def is_defective(self) -> torch.Tensor:
        return self.masks.flatten(1).any(dim=1)


def concat_sets(sets: Iterable[ImageSet]) -> ImageSet:
    sets = list(sets)
    parts = None
    if any(s.parts is not None for s in sets):
        parts = [p for s in sets for p in (s.parts if s.parts is not None else [[] for _ in range(len(s))])]
    return ImageSet(torch.cat([s.images for s in sets]), torch.cat([s.masks for s in sets]),
                    [d for s in sets for d in s.defect_types], [n for s in sets for n in s.names],
                    torch.cat([s.augment for s in sets]), parts)


def resize_pair(image: Image.Image, mask: Image.Image | None, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """An image (bicubic) and its mask (nearest, then binarized at MASK_THRESHOLD) as (R, R, 3) uint8
    and (R, R) bool arrays; no mask gives an empty one."""
    image_array = np.asarray(image.convert("RGB").resize((resolution, resolution), Image.BICUBIC))
    if mask is None:
        return image_array, np.zeros((resolution, resolution), dtype=bool)
    return image_array, square_mask(mask, resolution)


def square_mask(mask: Image.Image, resolution: int) -> np.ndarray:
    """A mask at (R, R), nearest, binarized at MASK_THRESHOLD."""
    return binarize_mask(mask.convert("L").resize((resolution, resolution), Image.NEAREST))


def stack_set(pairs: list[tuple[np.ndarray, np.ndarray]], defect_types: list[str], names: list[str]) -> ImageSet:
    if not pairs:
        return ImageSet(torch.zeros(0, 3, 1, 1, dtype=torch.uint8), torch.zeros(0, 1, 1, dtype=torch.bool), [], [])
    images = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).contiguous()
    masks = torch.from_numpy(np.stack([p[1] for p in pairs]))
    return ImageSet(images, masks, list(defect_types), list(names))


def dataset_to_set(dataset, resolution: int) -> ImageSet:
    """A `dataset_mvtec` Dataset (image, mask, defect_type, image_path) as an ImageSet."""
    pairs, types, names = [], [], []
    for index in range(len(dataset)):
        row = decoded_row(dataset, index)
        pairs.append(resize_pair(row["image"], row["mask"], resolution))
        types.append(row["defect_type"])
        names.append(row["image_path"])
    return stack_set(pairs, types, names)


def decoded_row(dataset, index: int) -> dict:
    """Row `index` of a `dataset_mvtec` Dataset, its image and mask decoded; a file that cannot be decoded is named
    (`datasets` itself raises a bare OSError)."""
    try:
        return dataset[index]
    except (OSError, SyntaxError, ValueError):
        for column, what in (("image", "image"), ("mask", "mask")):
            path = (dataset.data.column(column)[index].as_py() or {}).get("path")
            if path:
                open_checked(Path(path), what).close()  # raises, naming the file at fault
        raise


def image_name(path: str | os.PathLike, data_dir: str | os.PathLike | None) -> str:
    """An image's name in a set: relative to `data_dir` when it lies inside, else its path as given (a CSV table
    may list images anywhere)."""
    if data_dir:
        relative = os.path.relpath(os.path.abspath(path), os.path.abspath(data_dir))
        if not relative.startswith(os.pardir):
            return Path(relative).as_posix()
    return Path(path).as_posix()


def good_set(paths: Sequence[Path], resolution: int, data_dir: str | os.PathLike | None = None) -> ImageSet:
    """Defect-free images with empty masks."""
    pairs, names = [], []
    for path in paths:
        with open_checked(Path(path), "good image") as image:
            pairs.append(resize_pair(image, None, resolution))
        names.append(image_name(path, data_dir))
    return stack_set(pairs, [GOOD] * len(pairs), names)


# ----------------------------------------------------------------------------------------------------
# The real sets of the saved split
# ----------------------------------------------------------------------------------------------------


def real_defects(data_dir: str | os.PathLike, object_class: str, split: dict, part: str, resolution: int,
                 layout: str | None = None) -> ImageSet:
    """The real defect images of the split's `part` ("train" or "heldout") of every defect type it holds, read in
    the data folder's layout (`layout`, else the split's, else detected)."""
    rows = load_mvtec_defects(data_dir, object_class, sorted(split["defect_types"]), split_layout(split, layout))
    chosen = select_split(rows, split, part)
    wanted = sum(len(entry[part]) for entry in split["defect_types"].values())
    if len(chosen) != wanted:
        raise DatasetError(f"the split names {wanted} {part} images of {object_class} but {len(chosen)} are in "
                              f"{data_dir}: is --data_dir the folder the split was made from?")
    return dataset_to_set(chosen, resolution)


def real_test_set(data_dir: str | os.PathLike, object_class: str, split: dict, resolution: int,
                  layout: str | None = None) -> ImageSet:
    """The protocol's test set: the held-out real defects of the split plus every good image of the dataset's
    test set (MVTec's ``test/good``; the layout's test good images, `defectfill.data.layouts`)."""
    layout = split_layout(split, layout)
    heldout = real_defects(data_dir, object_class, split, "heldout", resolution, layout)
    goods = good_set(list_good_images(data_dir, object_class, ("test",), layout), resolution, data_dir)
    if len(goods) == 0:
        raise DatasetError(f"no good image of {object_class}'s test set under {data_dir} ({layout or 'detected'} layout): "
                           "image AUROC needs them")
    return concat_sets([heldout, goods])


def train_good_set(data_dir: str | os.PathLike, object_class: str, resolution: int, layout: str | None = None) -> ImageSet:
    """The good images of the dataset's training set (MVTec's ``train/good``), in `layout` (None: detected)."""
    paths = list_good_images(data_dir, object_class, ("train",), layout)
    if not paths:
        raise DatasetError(f"no good image of {object_class}'s training set under {data_dir} ({layout or 'detected'} layout)")
    return good_set(paths, resolution, data_dir)


# ----------------------------------------------------------------------------------------------------
# Copy-paste baseline
# ----------------------------------------------------------------------------------------------------


def mask_center(mask: np.ndarray) -> tuple[int, int]:
    """(row, column) of the centre of the mask's bounding box."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("the mask is empty")
    return (int(rows.min()) + int(rows.max())) // 2, (int(cols.min()) + int(cols.max())) // 2


def copy_paste(good: np.ndarray, defect: np.ndarray, defect_mask: np.ndarray,
               target_center: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cut the masked pixels of `defect` (H, W, 3) out and paste them onto `good` (H, W, 3), the mask's
    bounding-box centre moved to `target_center` (row, column; None keeps it where it was) and the shift
    clipped so the whole defect stays inside the image. Returns (image, mask): every pixel outside the
    moved mask is exactly `good`'s."""
    if good.shape != defect.shape or defect.shape[:2] != defect_mask.shape:
        raise ValueError(f"good {good.shape}, defect {defect.shape} and mask {defect_mask.shape} must be the same size")
    rows, cols = np.nonzero(defect_mask)
    if rows.size == 0:
        raise ValueError("the defect mask is empty")
    height, width = defect_mask.shape
    source_center = mask_center(defect_mask)
    target_center = target_center or source_center
    shift_y = int(np.clip(target_center[0] - source_center[0], -rows.min(), height - 1 - rows.max()))
    shift_x = int(np.clip(target_center[1] - source_center[1], -cols.min(), width - 1 - cols.max()))
    image, mask = good.copy(), np.zeros_like(defect_mask, dtype=bool)
    image[rows + shift_y, cols + shift_x] = defect[rows, cols]
    mask[rows + shift_y, cols + shift_x] = True
    return image, mask


def copy_paste_set(real: ImageSet, goods: ImageSet, targets: ImageSet | None, count: int, seed: int) -> ImageSet:
    """The copy-paste baseline: `count` images, each real training defects pasted onto a good image.
    With `targets` (a synthetic set), image i copies target i (cycled): its defect type and, defect by defect
    (several for a builder's `combined` image), the type and mask position, so both sets put the same defects
    at the same places; without, each image is one defect at its own position, the types in turn. Which real
    defect (of each type) and which good image are drawn with `seed`."""
    rng = np.random.default_rng(seed)
    by_type: dict[str, list[int]] = {}
    for index, defect in enumerate(real.defect_types):
        by_type.setdefault(defect, []).append(index)
    if not by_type:
        raise DatasetError("copy-paste needs at least one real training defect")
    pairs, types, names, all_parts = [], [], [], []
    for i in range(count):
        if targets is not None and len(targets):
            target = i % len(targets)
            defect_type = targets.defect_types[target]
            parts = targets.defect_parts(target) if targets.masks[target].any() else [(defect_type, None)]
        else:
            defect_type = sorted(by_type)[i % len(by_type)]
            parts = [(defect_type, None)]
        for part_type, _ in parts:
            if part_type not in by_type:
                raise DatasetError(f"the synthetic set has defect type {part_type!r} but the split has no real "
                                   f"training defect of it (types: {', '.join(sorted(by_type))})")
        good = int(rng.integers(len(goods)))
        image = goods.images[good].permute(1, 2, 0).numpy()
        mask = np.zeros(image.shape[:2], dtype=bool)
        sources, pasted_parts = [], []
        for part_type, center in parts:
            source = int(rng.choice(by_type[part_type]))
            image, part_mask = copy_paste(image, real.images[source].permute(1, 2, 0).numpy(), real.masks[source].numpy(),
                                          center)
            mask |= part_mask
            sources.append(real.names[source])
            pasted_parts.append((part_type, mask_center(part_mask)))
        pairs.append((image, mask))
        types.append(defect_type)
        names.append(f"copy_paste/{i:05d} ({' + '.join(sources)} on {goods.names[good]})")
        all_parts.append(pasted_parts)
    pasted = stack_set(pairs, types, names)
    pasted.parts = all_parts
    return pasted


# ----------------------------------------------------------------------------------------------------
# Augmentation of the real-only baseline
# ----------------------------------------------------------------------------------------------------


def augment_batch(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random flip / 90-degree rotation for each image and its mask, and a brightness and contrast
    jitter of +-10 % on the image; images float (B, 3, R, R) in [0, 1], masks (B, R, R)."""
    out_images, out_masks = [], []
    for image, mask in zip(images, masks):
        flips, turns = torch.randint(0, 2, (2,), generator=generator), int(torch.randint(0, 4, (1,), generator=generator))
        dims = [d for d, flip in zip((1, 2), flips.tolist()) if flip]
        if dims:
            image, mask = image.flip([d for d in dims]), mask.flip([d - 1 for d in dims])
        image, mask = torch.rot90(image, turns, (1, 2)), torch.rot90(mask, turns, (0, 1))
        brightness, contrast = 1 + (torch.rand(2, generator=generator) - 0.5) * 0.2
        mean = image.mean()
        image = ((image - mean) * contrast + mean * brightness).clamp(0, 1)
        out_images.append(image)
        out_masks.append(mask)
    return torch.stack(out_images), torch.stack(out_masks)
