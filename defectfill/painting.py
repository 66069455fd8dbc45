"""Painting a learned defect into a clean image with a [V*] LoRA, in memory: the synthesis core.

    pipeline = load_pipeline(base_model, lora="runs/bottle-broken_large")          # defectfill.pipelines
    settings = SynthesisSettings(prompt="A bottle with sks", resolution=512)
    job = prepare_job(clean_image, mask, index=0, settings=settings)
    [result] = synthesize(pipeline, [job], settings, scorer=LpipsModel().masked_scores)  # defectfill.scoring
    result.image   # full resolution; outside the mask every pixel is the clean input's

Steps: prepare a job (crop around the mask at full resolution, or the whole image, resized to the model's
resolution), generate all candidates of all jobs in one pipeline call (one seeded generator per candidate),
composite each candidate over the clean region, score it by LPIPS inside the mask and keep the highest (Low-Fidelity
Selection), paste the region back at full resolution. Nothing here reads or writes files: the CLI
(`infer_defectfill.py`), the dataset builder, training's validation, the app and the tests call these functions and
do their own I/O.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from defectfill import masks
from defectfill.errors import SynthesisError
from defectfill.images import to_8bit

logger = logging.getLogger("defectfill")

# (clean region, candidate regions, region mask) -> one score per candidate; higher = more defect-like.
Scorer = Callable[[Image.Image, list[Image.Image], Image.Image], list[float]]


@dataclass(frozen=True)
class SynthesisSettings:
    """How a (clean image, mask) becomes a defect image; the defaults are the paper's (8 candidates, 50 steps,
    guidance 7.5, the clean image kept outside the mask, the whole image resized as the paper trains). A run trained
    with defect crops records it, and `defectfill.runs.settings.plan_run` turns `crop_to_mask` on for it."""

    prompt: str
    resolution: int = 512
    num_candidates: int = 8
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    composite: bool = True
    crop_to_mask: bool = False
    crop_context: float = masks.DEFAULT_CROP_CONTEXT

    def __post_init__(self) -> None:
        if self.num_candidates < 1:
            raise SynthesisError(f"--num_candidates must be >= 1, got {self.num_candidates}")


def round_robin(images: Sequence, masks: Sequence, count: int) -> list[tuple]:
    """`count` (image, mask) pairs taken in order, each list cycled."""
    return [(images[i % len(images)], masks[i % len(masks)]) for i in range(count)]


# ----------------------------------------------------------------------------------------------------
# Jobs
# ----------------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One (clean image, mask) prepared for the pipeline. `image` is the clean image at full resolution (RGB;
    `mode` is the source's, which the output keeps), `mask` the exact label at full resolution, `box` the
    region generated, `region` / `region_mask` that region at model resolution (the mask resized so that
    every region pixel touching the label is masked: a thin defect never vanishes in the resize)."""

    index: int
    image: Image.Image
    mask: np.ndarray
    box: tuple[int, int, int, int]
    region: Image.Image
    region_mask: Image.Image
    mode: str = "RGB"


def mask_at_image_size(mask: Image.Image | np.ndarray, size: tuple[int, int], name: str = "mask") -> np.ndarray:
    """The boolean mask at the image's size (resized, nearest, when it differs; a warning when the aspect
    ratio differs too, since the mask is then stretched); an empty mask is an error."""
    if isinstance(mask, np.ndarray):
        mask = Image.fromarray(mask.astype(np.uint8) * 255)
    if mask.size != size:
        if abs(mask.size[0] * size[1] - mask.size[1] * size[0]) > max(size):
            logger.warning("%s is %dx%d but its image is %dx%d: the mask is stretched to the image's aspect ratio",
                           name, *mask.size, *size)
        mask = mask.convert("L").resize(size, Image.NEAREST)
    binary = masks.binarize_mask(mask)
    if not binary.any():  # also when resizing emptied a tiny mask
        raise SynthesisError(f"{name} is empty (no pixel >= {masks.MASK_THRESHOLD}); nothing to inpaint")
    return binary


def prepare_job(image: Image.Image, mask: Image.Image | np.ndarray, index: int, settings: SynthesisSettings,
                mask_name: str = "mask") -> Job:
    """Crop (with `crop_to_mask`, when the image is larger than the resolution) and resize to the model."""
    mode = "L" if image.mode in ("L", "LA", "I;16", "I;16B", "I;16L", "I", "F", "1") else "RGB"
    image = to_8bit(image).convert("RGB")
    binary = mask_at_image_size(mask, image.size, mask_name)
    box = (0, 0, *image.size)
    if settings.crop_to_mask and min(image.size) > settings.resolution:
        box = masks.mask_crop_box(binary, settings.resolution, settings.crop_context) or box
    size = (settings.resolution, settings.resolution)
    left, top, right, bottom = box
    region = image.crop(box).resize(size, Image.BICUBIC)
    return Job(index, image, binary, box, region, masks.coverage_resize(binary[top:bottom, left:right], size), mode)


# ----------------------------------------------------------------------------------------------------
# Generate, composite, select, paste back
# ----------------------------------------------------------------------------------------------------


MAX_CANDIDATE_SEEDS = 1_009  # candidate numbers 0..1008 of a pair never collide with the next pair's seeds


def candidate_generators(seed: int, pair_index: int, count: int, device, first: int = 0) -> list[torch.Generator]:
    """One generator per candidate, seeded by (seed, pair, candidate number): the same pair gives the same
    candidates whatever the batch size or the pairs around it. Candidate numbers `first` .. `first + count - 1`:
    a redraw (the dataset builder's `--min_lpips`) takes the next numbers of the same scheme."""
    if first + count > MAX_CANDIDATE_SEEDS:
        raise SynthesisError(f"candidate {first + count - 1} of a pair would reuse the next pair's seeds (at most {MAX_CANDIDATE_SEEDS})")
    return [torch.Generator(device=device).manual_seed(seed * 1_000_003 + pair_index * 1_009 + c) for c in range(first, first + count)]


def family_arguments(pipeline) -> dict:
    """What the pipeline's family needs besides the arguments both take. SDXL inpainting: `strength=1.0` (its default,
    0.9999, starts from the noised clean region one step late, so it drops a denoising step; 1.0 is SD's default and
    the paper's: pure noise inside the mask, every step). The size conditioning (original = target = the region's
    size, crop (0, 0)) is the pipeline's default from height and width."""
    return {"strength": 1.0} if getattr(pipeline, "text_encoder_2", None) is not None else {}


def generate_candidates(pipeline, jobs: list[Job], settings: SynthesisSettings, first_candidate: int = 0) -> list[list[Image.Image]]:
    """All candidates of all jobs in one pipeline call, each with its own seeded generator (candidate numbers
    `first_candidate` onwards). Returns each job's candidates, the raw pipeline output at model resolution."""
    n = settings.num_candidates
    generators = [g for job in jobs for g in candidate_generators(settings.seed, job.index, n, pipeline.device, first_candidate)]
    images = pipeline(
        prompt=[settings.prompt] * (len(jobs) * n), image=[job.region for job in jobs for _ in range(n)],
        mask_image=[masks.model_mask(job.region_mask, pipeline.vae_scale_factor) for job in jobs for _ in range(n)],
        height=settings.resolution, width=settings.resolution,
        num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale, generator=generators,
        **family_arguments(pipeline),
    ).images
    return [images[j * n : (j + 1) * n] for j in range(len(jobs))]


def composite(clean: Image.Image, generated: Image.Image, mask: Image.Image | np.ndarray) -> Image.Image:
    """M * generated + (1 - M) * clean, so outside the mask the output is the clean input exactly."""
    mask = np.asarray(mask) > 0 if not isinstance(mask, np.ndarray) else mask
    out = np.where(mask[..., None], np.asarray(generated.convert("RGB")), np.asarray(clean.convert("RGB")))
    return Image.fromarray(out)


def paste_back(job: Job, generated_region: Image.Image, use_composite: bool) -> Image.Image:
    """The generated region back at full resolution, inside the clean image, in the source's mode (a grayscale
    class stays grayscale; outside the label the pixels are the source's exactly)."""
    left, top, right, bottom = job.box
    full = job.image.copy()
    full.paste(generated_region.resize((right - left, bottom - top), Image.BICUBIC), (left, top))
    full = composite(job.image, full, job.mask) if use_composite else full
    return full.convert(job.mode)


def select_candidate(scores: Sequence[float]) -> int:
    """Low-Fidelity Selection: the candidate whose masked region departs most from the clean object."""
    return int(np.argmax(np.asarray(scores, dtype=np.float64)))


@dataclass(frozen=True)
class SynthesisResult:
    """A job's outcome. `image`: the chosen candidate pasted back at full resolution. `candidates`: every candidate
    of the call, finished, at model resolution (composited over the clean region with `composite`), in candidate
    order; `scores`: their LPIPS inside the mask (all 0 without a scorer); `chosen`: the index of the kept one in
    `candidates` (its candidate number is the call's `first_candidate` + `chosen`); `unet_passes`: the UNet passes
    the job took (candidates x the scheduler's denoising calls, a guided pair counted once)."""

    job: Job
    image: Image.Image
    candidates: list[Image.Image]
    scores: list[float]
    chosen: int
    unet_passes: int = 0

    @property
    def region(self) -> Image.Image:
        """The chosen candidate at model resolution (what is pasted back)."""
        return self.candidates[self.chosen]

    @property
    def final_score(self) -> float:
        """The chosen candidate's score."""
        return self.scores[self.chosen]


def synthesize(pipeline, jobs: list[Job], settings: SynthesisSettings, scorer: Scorer | None = None, *,
               first_candidate: int = 0) -> list[SynthesisResult]:
    """Generate (one pipeline call for all jobs), composite, score, select and paste back every job. With a scorer
    every candidate is scored and the highest kept; without one the first is kept (scores all 0). A caller that
    wants more candidates of the same jobs (the builder's redraws) calls again with `first_candidate` past the
    numbers already drawn: the next seeds of the same scheme."""
    drawn = generate_candidates(pipeline, jobs, settings, first_candidate)
    passes = settings.num_candidates * len(pipeline.scheduler.timesteps)  # the calls the pipeline's loop just made
    results = []
    for job, images in zip(jobs, drawn):
        candidates = [composite(job.region, image, job.region_mask) if settings.composite else image for image in images]
        scores = [float(x) for x in scorer(job.region, candidates, job.region_mask)] if scorer else [0.0] * len(candidates)
        chosen = select_candidate(scores)
        image = paste_back(job, candidates[chosen], settings.composite)
        results.append(SynthesisResult(job, image, candidates, scores, chosen, passes))
    return results
