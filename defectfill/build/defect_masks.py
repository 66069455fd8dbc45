"""The masks of a build: where each defect type's masks come from (the training or held-out masks of the runs'
split, or a user's folder: `MaskSource`), where on a good image a defect may go (its foreground), and the masks of
one item's defects (new ones drawn from those, or those as they are), drawn from the item's own seed and checked
the way synthesis will see them."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image

from defectfill.build.augment import draw_mask, estimate_foreground, pick_mask
from defectfill.build.plan import Item, item_rng
from defectfill.build.settings import BuildMaskSettings
from defectfill.data.mask_files import read_mask
from defectfill.data.mvtec import list_split_masks, split_layout
from defectfill.errors import BuildError, SynthesisError
from defectfill.images import IMAGE_EXTENSIONS, image_files, open_checked
from defectfill.masks import MaskSource, binarize_mask, latent_mask, resize_mask
from defectfill.painting import SynthesisSettings, prepare_job
from defectfill.runs.settings import RunPlan

if TYPE_CHECKING:
    from defectfill.build.context import BuildContext


def mask_files(masks: BuildMaskSettings, run: RunPlan, data_dir: str | None, layout: str | None = None) -> list[Path]:
    """The masks a defect type draws from: the real masks of the run's split (`mask_from` train or heldout: its
    training part or its held-out part; each a file or a folder of several, in the data folder's `layout`, else
    the split's), or the user's folder (`mask_from` dir, `mask_dir`)."""
    if masks.mask_from is not MaskSource.DIR:
        if not data_dir:
            raise BuildError(f"--mask_from {masks.mask_from} needs --data_dir (the run {run.lora} records none)")
        files = list_split_masks(data_dir, run.record.split, run.defect_type, masks.mask_from.value,
                                 split_layout(run.record.split, layout))
        if not files:
            raise BuildError(f"the split of {run.lora} holds no {masks.mask_from} mask of {run.defect_type}; "
                             "give another --mask_from or --mask_dir")
        return files
    folder = Path(masks.mask_dir)
    if not folder.is_dir():
        raise BuildError(f"--mask_dir {folder}: not a folder of masks")
    files = image_files(folder / run.defect_type) or image_files(folder)
    if not files:
        raise BuildError(f"--mask_dir {folder} holds no mask for {run.defect_type} "
                         f"(expected {folder / run.defect_type}/*.png or {folder}/*.png)")
    return files


def load_mask_files(paths: Sequence[Path]) -> list[np.ndarray]:
    """Boolean masks (`read_mask`: a file, or a folder of several unioned; any non-zero pixel is a defect); an
    empty or unreadable one is an error that names it (nothing is generated before)."""
    masks = []
    for path in paths:
        mask = read_mask(path)
        if not mask.any():
            raise BuildError(f"mask {path} is empty (no non-zero pixel); remove it or draw the defect")
        masks.append(mask)
    return masks


def visible_at_latent_size(mask: np.ndarray, settings: SynthesisSettings, vae_scale_factor: int) -> bool:
    """Whether the mask keeps a pixel at the UNet's latent size, through the same crop and resize as synthesis."""
    blank = Image.new("RGB", mask.shape[::-1])
    try:
        job = prepare_job(blank, mask, 0, settings)
    except SynthesisError:
        return False
    return bool(latent_mask(job.region_mask, vae_scale_factor).any())


def find_foreground_file(folder: Path, image_path: Path, data_dir: str | None, object_class: str) -> Path | None:
    """The object mask of a good image in --foreground_dir: same path relative to the class folder, else same stem."""
    candidates = []
    if data_dir:
        try:
            relative = image_path.relative_to(Path(data_dir) / object_class)
            candidates += [folder / relative, folder / relative.with_name(f"{relative.stem}_mask{relative.suffix}")]
        except ValueError:
            pass
    for ext in IMAGE_EXTENSIONS:
        candidates += [folder / f"{image_path.stem}{ext}", folder / f"{image_path.stem}_mask{ext}"]
    return next((c for c in candidates if c.is_file()), None)


def foreground_of(foreground_dir: str | None, image: Image.Image, image_path: Path, texture: bool, data_dir: str | None,
                  object_class: str) -> np.ndarray | None:
    """Where on the image a defect may go (the object mask in `foreground_dir`, else estimated); None for a texture
    (the whole image)."""
    if texture:
        return None
    if foreground_dir:
        path = find_foreground_file(Path(foreground_dir), image_path, data_dir, object_class)
        if path is None:
            raise BuildError(f"--foreground_dir {foreground_dir} has no object mask for {image_path} "
                             f"(looked for the same relative path or {image_path.stem}[_mask].png)")
        with open_checked(path, "object mask") as mask_image:
            return resize_mask(binarize_mask(mask_image), image.size)
    return estimate_foreground(image)


@dataclass
class Defect:
    """One defect of an item: its type, the mask used (the label), where it came from."""

    defect_type: str
    mask: np.ndarray
    source_mask: str
    augmented: bool


def draw_item_masks(item: Item, image: Image.Image, context: "BuildContext") -> tuple[list[Defect], Counter, list[str]]:
    """The masks of an item's defects, in painting order, never overlapping: (defects, mask rejections by
    reason, defect types dropped because no mask fitted). Deterministic per item."""
    masks = context.settings.masks
    rng = item_rng(context.settings.generation.seed, item.index, 2)
    augment = masks.mask_augment
    foreground = foreground_of(masks.foreground_dir, image, item.image_path, context.texture, context.data_dir,
                               context.object_class) if augment else None
    taken = np.zeros(image.size[::-1], dtype=bool)
    defects, rejected, dropped = [], Counter(), []
    for slot, defect_type in enumerate(item.defect_types):
        sources = [resize_mask(m, image.size) for m in context.masks[defect_type]]
        settings = context.synthesis[defect_type]
        checks = dict(visible_at_latent=lambda m, s=settings: visible_at_latent_size(m, s, context.vae_scale_factor),
                      avoid=taken if taken.any() else None)
        if augment:
            checks.update(foreground=foreground, min_on_object=masks.min_on_object)
            mask, source, why = draw_mask(sources, rng, masks.augment, masks.mask_attempts, **checks)
        else:
            start = item.index % context.settings.num_images if slot == 0 else int(rng.integers(len(sources)))
            mask, source, why = pick_mask(sources, start % len(sources), **checks)
        rejected.update({f"{defect_type}/{k}": v for k, v in why.items()})
        if mask is None:
            if slot == 0:  # the defect type the item is for: no image without it
                return [], rejected, [defect_type]
            dropped.append(defect_type)
            continue
        defects.append(Defect(defect_type, mask, str(context.mask_paths[defect_type][source]), augment))
        taken |= mask
    return defects, rejected, dropped
