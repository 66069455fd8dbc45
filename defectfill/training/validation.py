"""Validation during training: held-out good images inpainted with held-out masks through the synthesis core
(as `infer_defectfill.py` paints with the run, one candidate each), and the [V*] attention map of the object
branch next to its mask, logged to the trackers. Validation never changes what training draws next."""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from defectfill.data.mask_files import open_mask
from defectfill.data.mvtec import list_good_images, list_heldout_masks, split_layout
from defectfill.data.transform import PairTransform
from defectfill.models import Models
from defectfill.painting import SynthesisSettings, prepare_job, round_robin, synthesize
from defectfill.runs.records import RunRecord
from defectfill.runs.settings import plan_run
from defectfill.settings import BaseModelSettings
from defectfill.step import DefectFillStep
from defectfill.training.settings import TrainingSettings

logger = logging.getLogger("defectfill")


@dataclass
class Validation:
    """The (good image, held-out mask) pairs validated (empty: validation off) and how they are painted."""

    settings: SynthesisSettings
    pairs: list[tuple[Path, Path]] = field(default_factory=list)


def validation_setup(settings: TrainingSettings, record: RunRecord, output_dir: Path) -> Validation:
    """Held-out good images (`test/good`, else any good image) with the run's held-out masks, round-robin, painted
    with the run's synthesis settings (`plan_run`: its prompt, resolution and training scale) and one candidate
    per pair (no LPIPS model inside the training loop). No pairs when the data is not a local folder."""
    monitoring, data = settings.monitoring, settings.data
    painting = plan_run(str(output_dir), record, num_candidates=1, num_inference_steps=monitoring.num_inference_steps,
                        guidance_scale=monitoring.guidance_scale, seed=settings.seed).settings
    if data.data_dir is None or monitoring.validation_steps <= 0 or monitoring.num_validation_images <= 0:
        return Validation(painting)
    layout = split_layout(record.split, data.layout)
    goods = (list_good_images(data.data_dir, data.object_class, ("test",), layout)
             or list_good_images(data.data_dir, data.object_class, layout=layout))
    masks = list_heldout_masks(data.data_dir, record.split, record.defect_type, layout, data.object_class)
    if not goods or not masks:
        return Validation(painting)
    return Validation(painting, round_robin(goods, masks, monitoring.num_validation_images))


def log_validation(accelerator, models: Models, settings: TrainingSettings, validation: Validation, step: int,
                   defectfill_step: DefectFillStep | None) -> list:
    """Inpaint the validation pairs with the current LoRA through the synthesis core and log the generated
    regions (what synthesis pastes back) and the [V*] map. Runs on a fork of the random state: validating
    never changes what training draws next, so a resumed run matches an uninterrupted one."""
    if not validation.pairs:
        return []
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    python_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(settings.seed)
            images = validation_images(accelerator, models, settings.model, validation)
            log_images(accelerator, "validation", images, step)
            if defectfill_step is not None and defectfill_step.records_attention:
                resolution = settings.augmentation.resolution
                log_attention_preview(accelerator, resolution, validation.pairs[0], step, defectfill_step)
            return images
    finally:
        random.setstate(python_state)


def validation_images(accelerator, models: Models, model: BaseModelSettings, validation: Validation) -> list:
    from PIL import Image

    pipeline = training_pipeline(accelerator, models, model)
    pipeline.set_progress_bar_config(disable=True)
    settings = validation.settings
    jobs = []
    for index, (image_path, mask_path) in enumerate(validation.pairs):
        with Image.open(image_path) as image:  # a dataset's mask: a file or a folder, any non-zero pixel a defect
            jobs.append(prepare_job(image, open_mask(mask_path), index, settings, mask_name=f"mask {mask_path}"))
    with torch.autocast(accelerator.device.type, enabled=accelerator.mixed_precision != "no"):
        results = synthesize(pipeline, jobs, settings)
    del pipeline
    return [result.region for result in results]


def training_pipeline(accelerator, models: Models, model: BaseModelSettings):
    """The base's own inpainting pipeline (its family's class, `defectfill.bases`) around the models being trained."""
    from defectfill.bases import detect_base_family, pipeline_class_of

    base = models.base or detect_base_family(model.pretrained_model_name_or_path, model.revision, model.cache_dir)
    components = dict(unet=accelerator.unwrap_model(models.unet), text_encoder=accelerator.unwrap_model(models.text_encoder),
                      vae=models.vae, tokenizer=models.tokenizer)
    if models.text_encoder_2 is not None:
        components.update(text_encoder_2=accelerator.unwrap_model(models.text_encoder_2), tokenizer_2=models.tokenizer_2)
    else:  # SD 1.x / 2.x pipelines carry a safety checker; SDXL's have none
        components.update(safety_checker=None, requires_safety_checker=False)
    return pipeline_class_of(base).from_pretrained(
        model.pretrained_model_name_or_path, revision=model.revision, variant=model.variant, torch_dtype=models.vae.dtype,
        cache_dir=model.cache_dir, **components)


def final_validation(accelerator, models: Models, settings: TrainingSettings, validation: Validation, step: int,
                     defectfill_step: DefectFillStep) -> list:
    """The last validation, after the run is saved: a failure is logged, and the run stays whole."""
    if not validation.pairs:
        return []
    try:
        return log_validation(accelerator, models, settings, validation, step, defectfill_step)
    except Exception as error:  # the LoRA and run file are already on disk; validation is a view of them
        logger.error("the final validation failed (the trained LoRA is saved): %s: %s", type(error).__name__, error)
        return []


def log_images(accelerator, name: str, images: list, step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(name, np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: [wandb.Image(i) for i in images]}, step=step)


def log_attention_preview(accelerator, resolution: int, pair, step: int, defectfill_step: DefectFillStep) -> None:
    """The [V*] map of the object branch on a validation pair (a seeded random timestep), next to its mask."""
    from PIL import Image

    image, mask = PairTransform(resolution)(Image.open(pair[0]), open_mask(pair[1]))
    dtype = defectfill_step.vae.dtype
    batch = {"pixel_values": image[None].to(accelerator.device, dtype), "masks": mask[None].to(accelerator.device, dtype)}
    text_encoder_2 = defectfill_step.text_encoder_2
    preview = dataclasses.replace(defectfill_step, unet=accelerator.unwrap_model(defectfill_step.unet),
                                  text_encoder=accelerator.unwrap_model(defectfill_step.text_encoder), latent_cache=None,
                                  text_encoder_2=accelerator.unwrap_model(text_encoder_2) if text_encoder_2 is not None else None)
    with torch.no_grad(), preview(batch) as output:
        attention = F.interpolate(output.attention_map.float(), size=mask.shape[-2:], mode="bilinear")[0, 0]
    attention = (attention / attention.max().clamp_min(1e-8)).cpu().numpy()
    panel = np.concatenate([mask[0].numpy(), attention], axis=1)
    log_images(accelerator, "vstar_attention", [Image.fromarray((panel * 255).astype(np.uint8)).convert("RGB")], step)
