"""A build's context (its runs, masks and settings, decided once, before anything is painted) and its fingerprint:
everything that decides the output images, so that a folder is resumed only by the same build."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from defectfill.build.augment import is_texture_class
from defectfill.build.defect_masks import load_mask_files, mask_files
from defectfill.build.plan import Item, defect_index_table, discover_runs, parse_defects_per_image
from defectfill.build.settings import BuildSettings
from defectfill.data.mvtec import split_layout
from defectfill.models import base_vae_scale_factor, check_resolution
from defectfill.painting import SynthesisSettings
from defectfill.pipelines import check_scheduler
from defectfill.runs.files import LORA_FILENAME
from defectfill.runs.settings import RunOverrides, RunPlan


@dataclass(frozen=True)
class BuildContext:
    """Everything a build decided from its settings and runs, before anything is painted; shared by its steps."""

    settings: BuildSettings
    runs: tuple[RunPlan, ...]
    index_table: dict[str, int]
    mask_paths: dict[str, list[Path]]
    masks: dict[str, list[np.ndarray]]
    texture: bool
    data_dir: str | None
    object_class: str
    base_model: str
    vae_scale_factor: int  # pixels per latent pixel, from the base model's VAE config
    scheduler: str  # the sampler's class name

    @property
    def layout(self) -> str | None:
        """The layout of the data folder: --layout, else the one the runs' split recorded (None: detected)."""
        return split_layout(self.runs[0].split, self.settings.data.layout)

    @property
    def synthesis(self) -> dict[str, SynthesisSettings]:
        """Each defect type's synthesis settings (its run's, with the flags' overrides)."""
        return {run.defect_type: run.settings for run in self.runs}


def lora_digest(lora: str) -> str:
    """sha256 (first 16 hex digits) of a run's LoRA weights; the Hub id itself for a remote run."""
    path = Path(lora) / LORA_FILENAME
    if not path.is_file():
        return lora
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def run_overrides(settings: BuildSettings) -> RunOverrides:
    """What the build's settings change of every run's record."""
    generation = settings.generation
    return RunOverrides(pretrained_model_name_or_path=settings.model.pretrained_model_name_or_path,
                        object_class=settings.data.object_class, resolution=generation.resolution,
                        crop_to_mask=generation.crop_to_mask, crop_context=generation.crop_context,
                        data_dir=settings.data.data_dir)


def make_context(settings: BuildSettings) -> BuildContext:
    """The runs (`discover_runs`, with the settings' overrides), every mask file read and checked, the sampler
    checked and the VAE's scale read from the base model's configs: all before anything is painted."""
    g = settings.generation
    runs = discover_runs(settings.lora, settings.defect_types, run_overrides(settings), num_candidates=g.num_candidates,
                         num_inference_steps=g.num_inference_steps, guidance_scale=g.guidance_scale, seed=g.seed)
    first = runs[0]
    base_model, data_dir, object_class = first.base_model, first.data_dir, first.object_class
    mask_paths = {r.defect_type: mask_files(settings.masks, r, data_dir, settings.data.layout) for r in runs}
    object_type = settings.masks.object_type
    scale = base_vae_scale_factor(base_model, settings.model.revision, flag="--pretrained_model_name_or_path"
                                  if settings.model.pretrained_model_name_or_path else "the runs' base model")
    for run in runs:
        check_resolution(run.settings.resolution, scale)
    return BuildContext(
        settings=settings, runs=tuple(runs), index_table=defect_index_table(runs), mask_paths=mask_paths,
        masks={d: load_mask_files(paths) for d, paths in mask_paths.items()},
        texture=object_type == "texture" or (object_type == "auto" and is_texture_class(object_class)),
        data_dir=data_dir, object_class=object_class, base_model=base_model,
        vae_scale_factor=scale,
        scheduler=check_scheduler(g.scheduler, base_model, settings.model.revision),
    )


def build_fingerprint(context: BuildContext, items: Sequence[Item]) -> dict:
    """Everything that decides the output images: a folder built with another fingerprint is another build."""
    s, masks, g = context.settings, context.settings.masks, context.settings.generation
    return {
        "base_model": context.base_model, "revision": s.model.revision, "variant": s.model.variant,
        "mixed_precision": s.mixed_precision, "scheduler": g.scheduler, "object_class": context.object_class,
        "runs": {r.defect_type: lora_digest(r.lora) for r in context.runs},
        "settings": {d: asdict(settings) for d, settings in context.synthesis.items()},
        "mask_from": masks.mask_from.value, "mask_dir": masks.mask_dir, "mask_augment": masks.mask_augment,
        "augment": asdict(masks.augment) if masks.mask_augment else None,
        "mask_attempts": masks.mask_attempts, "foreground_dir": masks.foreground_dir, "texture": context.texture,
        "min_on_object": masks.min_on_object, "defects_per_image": parse_defects_per_image(masks.defects_per_image),
        "min_lpips": g.min_lpips, "max_redraws": g.max_redraws, "lpips_net": g.lpips_net, "num_images": s.num_images,
        "items": hashlib.sha256(json.dumps([[i.index, str(i.image_path), i.defect_types] for i in items]).encode()).hexdigest()[:16],
    }
