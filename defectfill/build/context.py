"""A build's context (its runs, masks and settings, decided once) and its fingerprint: everything that decides
the output images, so that a folder is resumed only by the same build."""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from defectfill.build.augment import AugmentSettings, is_texture_class
from defectfill.build.defect_masks import load_mask_files, mask_origin, mask_sources
from defectfill.build.plan import Item, defect_index_table, discover_runs, parse_defects_per_image
from defectfill.painting import SynthesisSettings
from defectfill.runs.files import LORA_FILENAME
from defectfill.runs.settings import RunOverrides, RunPlan


@dataclass
class BuildContext:
    """Everything a build decided from its flags and runs, shared by its steps."""

    args: argparse.Namespace
    runs: list[RunPlan]
    index_table: dict[str, int]
    mask_paths: dict[str, list[Path]]
    masks: dict[str, list[np.ndarray]]
    augment: AugmentSettings
    texture: bool
    data_dir: str | None
    object_class: str
    base_model: str
    vae_scale_factor: int = 8  # read from the pipeline's VAE once it is loaded
    scheduler: str = "the base model's"  # the sampler's class name, once checked

    @property
    def settings(self) -> dict[str, SynthesisSettings]:
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


def make_context(args) -> BuildContext:
    """The runs (`discover_runs`, with the flags' overrides) and every mask file, read and checked before anything
    is painted."""
    overrides = RunOverrides(pretrained_model_name_or_path=args.pretrained_model_name_or_path, resolution=args.resolution,
                             crop_to_mask=args.crop_to_mask, crop_context=args.crop_context, data_dir=args.data_dir)
    runs = discover_runs(args.lora, args.defect_types, overrides, num_candidates=args.num_candidates,
                         num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, seed=args.seed)
    first = runs[0]
    base_model, data_dir, object_class = first.base_model, first.data_dir, first.object_class
    mask_paths = {r.defect_type: mask_sources(args, r, data_dir) for r in runs}
    masks = {d: load_mask_files(paths) for d, paths in mask_paths.items()}
    texture = args.object_type == "texture" or (args.object_type == "auto" and is_texture_class(object_class))
    augment = AugmentSettings(flip=args.mask_flip, max_rotation=args.mask_max_rotation, min_scale=args.mask_scale[0],
                                 max_scale=args.mask_scale[1], elastic=args.mask_elastic, jitter=args.mask_jitter)
    return BuildContext(args, runs, defect_index_table(runs), mask_paths, masks, augment, texture, data_dir, object_class,
                        base_model)




def build_fingerprint(context: BuildContext, items: Sequence[Item]) -> dict:
    """Everything that decides the output images: a folder built with another fingerprint is another build."""
    a = context.args
    return {
        "base_model": context.base_model, "revision": a.revision, "variant": a.variant, "mixed_precision": a.mixed_precision,
        "scheduler": a.scheduler, "object_class": context.object_class,
        "runs": {r.defect_type: lora_digest(r.lora) for r in context.runs},
        "settings": {d: asdict(s) for d, s in context.settings.items()},
        "mask_source": a.mask_source, "mask_from": mask_origin(a),
        "augment": asdict(context.augment) if a.mask_source == "augment" else None,
        "mask_attempts": a.mask_attempts, "foreground_dir": a.foreground_dir, "texture": context.texture,
        "min_on_object": a.min_on_object, "defects_per_image": parse_defects_per_image(a.defects_per_image),
        "min_lpips": a.min_lpips, "max_redraws": a.max_redraws, "lpips_net": a.lpips_net,
        "lpips_random_backbone": a.lpips_random_backbone, "num_images": a.num_images,
        "items": hashlib.sha256(json.dumps([[i.index, str(i.image_path), i.defect_types] for i in items]).encode()).hexdigest()[:16],
    }
