"""The synthesis core: paint a learned defect into a clean image with a [V*] LoRA, in memory.

    pipeline = load_pipeline(base_model, lora="runs/bottle-broken_large")
    settings = SynthesisSettings(prompt="A bottle with sks", resolution=512)
    job = prepare_job(clean_image, mask, index=0, settings=settings)
    [result] = synthesize(pipeline, [job], settings, scorer=LpipsModel().masked_scores)  # defectfill.scoring
    result.image   # full resolution; outside the mask every pixel is the clean input's

Steps: prepare a job (crop around the mask at full resolution, or the whole image,
resized to the model's resolution), generate all candidates of all jobs in one pipeline call (one
seeded generator per candidate), composite each candidate over the clean region, score it by LPIPS
inside the mask and keep the highest (Low-Fidelity Selection), paste the region back at full
resolution. Nothing here reads or writes files: the CLI (`infer_defectfill.py`), training's validation,
the evaluation and the tests call these functions and do their own I/O.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from defectfill import denoising, masks
from defectfill.attention import StepAveragingStore, install_vstar_capture, remove_vstar_capture, token_piece_ids, token_weights
from defectfill.errors import InpaintingModelError, SynthesisError
from defectfill.images import to_8bit
from defectfill.models import check_inpainting_unet, default_device

logger = logging.getLogger("defectfill")

# (clean region, candidate regions, region mask) -> one score per candidate; higher = more defect-like.
Scorer = Callable[[Image.Image, list[Image.Image], Image.Image], list[float]]


@dataclass(frozen=True)
class SynthesisSettings:
    """How a (clean image, mask) becomes a defect image; the defaults are the paper's (8 candidates, 50 steps,
    guidance 7.5, the clean image kept outside the mask, the candidates scored when finished).

    `select_at` < 1 is early Low-Fidelity Selection: every candidate denoises for that fraction of the UNet calls,
    is scored on the clean image its step predicts, and only the best `keep` go on to the last step; among those,
    the one whose finished image scores highest is the result."""

    prompt: str
    resolution: int = 512
    num_candidates: int = 8
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    composite: bool = True
    crop_to_mask: bool = True
    crop_context: float = 0.5
    select_at: float = 1.0
    keep: int = 1

    def __post_init__(self) -> None:
        check_selection(self.num_candidates, self.select_at, self.keep)


def check_selection(num_candidates: int, select_at: float, keep: int) -> None:
    """The selection flags, before anything loads: candidates >= 1, `--select_at` in (0, 1], `--keep` between 1 and
    the candidates."""
    if num_candidates < 1:
        raise SynthesisError(f"--num_candidates must be >= 1, got {num_candidates}")
    if not 0 < select_at <= 1:
        raise SynthesisError(f"--select_at must be in (0, 1] (the fraction of the denoising steps after which the "
                             f"candidates are scored; 1 = when finished), got {select_at}")
    if not 1 <= keep <= num_candidates:
        raise SynthesisError(f"--keep must be between 1 and --num_candidates ({num_candidates}), got {keep}")


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
# Generate, composite, select
# ----------------------------------------------------------------------------------------------------


MAX_CANDIDATE_SEEDS = 1_009  # candidate numbers 0..1008 of a pair never collide with the next pair's seeds


def candidate_generators(seed: int, pair_index: int, count: int, device, first: int = 0) -> list[torch.Generator]:
    """One generator per candidate, seeded by (seed, pair, candidate): the same pair gives the same
    candidates whatever the batch size or the pairs around it. Candidates `first` .. `first + count - 1`:
    a redraw (the dataset builder's `--min_lpips`) takes the next seeds of the same scheme."""
    if first + count > MAX_CANDIDATE_SEEDS:
        raise SynthesisError(f"candidate {first + count - 1} of a pair would reuse the next pair's seeds (at most {MAX_CANDIDATE_SEEDS})")
    return [torch.Generator(device=device).manual_seed(seed * 1_000_003 + pair_index * 1_009 + c) for c in range(first, first + count)]


@dataclass
class CandidateSet:
    """One job's part of a pipeline call: the finished candidates (raw pipeline output at model resolution) by
    candidate number, every candidate when they all finished, the kept ones after an early selection; then also the
    previews every candidate was scored on (the clean image predicted after `selected_after` UNet calls, composited)
    and their scores. `unet_passes`: the job's UNet passes (a guided pair counted once)."""

    finished: dict[int, Image.Image]
    previews: list[Image.Image] | None = None
    scores: list[float] | None = None
    selected_after: int | None = None
    unet_passes: float = 0.0


@dataclass
class EarlySelection:
    """Low-Fidelity Selection part of the way through the denoising: after `after_calls` UNet calls, each job's
    candidates are scored on the clean image their step predicts (composited over the clean region, as finished ones
    are) and its best `keep` go on. `previews`, `scores` and `kept` (candidate numbers) are filled per job then."""

    jobs: list[Job]
    settings: SynthesisSettings
    scorer: Scorer
    after_calls: int
    on_drop: Callable[[torch.Tensor], None] | None = None
    previews: list[list[Image.Image]] = field(default_factory=list)
    scores: list[list[float]] = field(default_factory=list)
    kept: list[list[int]] = field(default_factory=list)

    def choose(self, previews: list[Image.Image]) -> list[int]:
        """The rows (in the call's batch) of every job's best `keep` candidates, in order."""
        n, rows = self.settings.num_candidates, []
        for j, job in enumerate(self.jobs):
            mine = previews[j * n : (j + 1) * n]
            if self.settings.composite:
                mine = [composite(job.region, p, job.region_mask) for p in mine]
            scores = [float(x) for x in self.scorer(job.region, mine, job.region_mask)]
            best = sorted(np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[: self.settings.keep].tolist())
            self.previews.append(mine)
            self.scores.append(scores)
            self.kept.append(best)
            rows += [j * n + c for c in best]
        return rows


def early_selection_for(pipeline, jobs: list[Job], settings: SynthesisSettings, scorer: Scorer | None,
                        on_drop: Callable[[torch.Tensor], None] | None = None) -> EarlySelection | None:
    """The early selection `settings` ask for, or None (the candidates finish and are scored finished: `select_at` 1,
    no more candidates than `keep`, no scorer, or a selection call that would be the last one)."""
    if settings.select_at >= 1 or settings.num_candidates <= settings.keep or scorer is None:
        return None
    pipeline.scheduler.set_timesteps(settings.num_inference_steps, device=pipeline.device)
    after = denoising.selection_call(len(pipeline.scheduler.timesteps), settings.select_at)
    if after is None:
        return None
    if not denoising.can_predict_clean(pipeline.scheduler):
        raise SynthesisError(f"--select_at {settings.select_at}: the scheduler {type(pipeline.scheduler).__name__} gives no "
                             "clean-image prediction to score early; use --select_at 1 or another --scheduler")
    return EarlySelection(jobs, settings, scorer, after, on_drop)


def generate_candidates(pipeline, jobs: list[Job], settings: SynthesisSettings, first_candidate: int = 0,
                        selection: EarlySelection | None = None) -> list[CandidateSet]:
    """All candidates of all jobs in one pipeline call, each with its own seeded generator; with `selection`, the
    candidates it does not keep stop after its UNet call. Returns each job's part."""
    n = settings.num_candidates
    generators = [g for job in jobs for g in candidate_generators(settings.seed, job.index, n, pipeline.device, first_candidate)]
    guided = settings.guidance_scale > 1 and pipeline.unet.config.time_cond_proj_dim is None
    with denoising.watch_unet(pipeline.unet, guided) as calls:
        extra = {}
        if selection is not None:
            callback = denoising.selection_callback(selection.after_calls, selection.choose, calls, settings.guidance_scale,
                                                    generators, selection.on_drop)
            extra = dict(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=list(denoising.LOOP_TENSORS))
        images = pipeline(
            prompt=[settings.prompt] * (len(jobs) * n), image=[job.region for job in jobs for _ in range(n)],
            mask_image=[masks.model_mask(job.region_mask, pipeline.vae_scale_factor) for job in jobs for _ in range(n)],
            height=settings.resolution, width=settings.resolution,
            num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale, generator=generators,
            **extra,
        ).images
    passes = calls.passes / len(jobs)
    if selection is None:
        return [CandidateSet(dict(enumerate(images[j * n : (j + 1) * n])), unet_passes=passes) for j in range(len(jobs))]
    keep = settings.keep
    return [CandidateSet(dict(zip(selection.kept[j], images[j * keep : (j + 1) * keep])), selection.previews[j],
                         selection.scores[j], selection.after_calls, passes) for j in range(len(jobs))]


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


@dataclass
class SynthesisResult:
    """A job's outcome: `image` at full resolution. `candidates` are what the candidates were scored on, composited
    regions at model resolution: the finished candidates, or with early selection the clean images their step
    predicted; `scores` their LPIPS inside the mask; `chosen` the candidate kept (its number), `region` its finished
    region and `final_score` that region's score. `kept`: the candidates that finished; `selected_after`: the UNet
    calls before an early selection (None: scored finished); `unet_passes`: the job's passes."""

    job: Job
    image: Image.Image
    candidates: list[Image.Image]
    scores: list[float]
    chosen: int
    region: Image.Image
    final_score: float
    kept: list[int]
    selected_after: int | None = None
    unet_passes: float = 0.0


def synthesize(pipeline, jobs: list[Job], settings: SynthesisSettings, scorer: Scorer | None = None, first_candidate: int = 0,
               score_single: bool = False, on_drop: Callable[[torch.Tensor], None] | None = None) -> list[SynthesisResult]:
    """Generate, composite, select and paste back every job (one pipeline call for all of them), with
    candidates `first_candidate` onwards. Without a scorer, or with one candidate (unless `score_single`:
    the builder's `--min_lpips` needs a lone candidate's score), the first is kept (scores all 0). With
    `settings.select_at` < 1 the selection happens early (`early_selection_for`); `on_drop` hears the rows kept."""
    selection = early_selection_for(pipeline, jobs, settings, scorer, on_drop)
    results = []
    for job, part in zip(jobs, generate_candidates(pipeline, jobs, settings, first_candidate, selection)):
        finished = {c: composite(job.region, image, job.region_mask) if settings.composite else image
                    for c, image in part.finished.items()}
        kept = sorted(finished)
        if part.scores is None:  # scored finished, as the paper does
            candidates = [finished[c] for c in kept]
            scored = scorer is not None and (len(candidates) > 1 or score_single)
            scores = scorer(job.region, candidates, job.region_mask) if scored else [0.0] * len(candidates)
            scores = [float(x) for x in scores]
            chosen = select_candidate(scores)
            final_score = scores[chosen]
        else:  # scored early; the best finished one of those kept
            candidates, scores = part.previews, part.scores
            final_scores = [float(x) for x in scorer(job.region, [finished[c] for c in kept], job.region_mask)]
            chosen = kept[select_candidate(final_scores)]
            final_score = max(final_scores)
        results.append(SynthesisResult(job, paste_back(job, finished[chosen], settings.composite), candidates, scores, chosen,
                                       finished[chosen], final_score, kept, part.selected_after, part.unet_passes))
    return results


# ----------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------


def check_lora_fits(pipeline, lora: str, trained_on: str | None, base: str) -> None:
    """Name the mismatch when a LoRA was trained on another architecture (load_lora_weights' own error
    is a bare shape mismatch)."""
    from diffusers import StableDiffusionInpaintPipeline

    state_dict, _ = StableDiffusionInpaintPipeline.lora_state_dict(lora)
    modules = dict(pipeline.unet.named_modules())
    for key, tensor in state_dict.items():
        if not key.startswith("unet.") or "lora_A" not in key and "lora.down" not in key:
            continue
        name = key[len("unet."):].split(".lora")[0]
        module = modules.get(name)
        expected = getattr(module, "in_features", None)
        if module is None or expected != tensor.shape[1]:
            trained_on = trained_on or "another model"
            found = "no such layer" if module is None else f"in_features {expected}"
            raise SynthesisError(
                f"the LoRA in {lora} was trained on {trained_on}, not on {base}: its layer {name} "
                f"expects input size {tensor.shape[1]}, the base model has {found}. Use --pretrained_model_name_or_path {trained_on}"
            )


def scheduler_class(name: str):
    """The diffusers scheduler class `--scheduler` names."""
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not isinstance(cls, type) or not hasattr(cls, "from_config") or not name.endswith("Scheduler"):
        raise SynthesisError(f"--scheduler {name} is not a diffusers scheduler class (e.g. DPMSolverMultistepScheduler, "
                             "UniPCMultistepScheduler)")
    return cls


def check_scheduler(name: str | None, base_model: str, settings: SynthesisSettings, revision: str | None = None) -> str:
    """Before any model loads: the scheduler `--scheduler` names (default: the base model's) exists and, for an early
    selection, can predict the clean image at a step. Reads only the base model's scheduler config. Returns its name."""
    from diffusers import DDPMScheduler

    try:  # any scheduler class reads scheduler_config.json
        config = DDPMScheduler.load_config(base_model, subfolder="scheduler", revision=revision)
    except Exception as error:  # a path or Hub id without a scheduler config: the pipeline load will say more
        if name is None and settings.select_at >= 1:
            return "the base model's"
        raise SynthesisError(f"cannot read the scheduler config of {base_model} ({error})") from error
    cls = scheduler_class(name or config["_class_name"])
    if settings.select_at < 1 and settings.num_candidates > settings.keep:
        if not denoising.can_predict_clean(cls.from_config(config)):
            raise SynthesisError(f"--select_at {settings.select_at}: the scheduler {cls.__name__} gives no clean-image "
                                 "prediction to score early (it needs alphas_cumprod and an epsilon, v or sample prediction); "
                                 "use --select_at 1 or another --scheduler")
    return cls.__name__


def planned_unet_passes(settings: SynthesisSettings, total_calls: int) -> int:
    """UNet passes per (image, mask) the settings make (a guided pair counted once): every candidate for the calls
    before an early selection, the kept ones for the rest; every candidate for every call without one."""
    n, keep = settings.num_candidates, settings.keep
    after = denoising.selection_call(total_calls, settings.select_at) if n > keep else None
    return n * total_calls if after is None else n * after + keep * (total_calls - after)


def scheduler_calls(pipeline, num_inference_steps: int) -> int:
    """How many UNet calls the pipeline's scheduler makes for `num_inference_steps` (PNDM makes one more)."""
    pipeline.scheduler.set_timesteps(num_inference_steps, device=pipeline.device)
    return len(pipeline.scheduler.timesteps)


def load_pipeline(base_model: str, lora: str | None = None, trained_on: str | None = None, revision: str | None = None,
                  variant: str | None = None, dtype: torch.dtype = torch.float32, device: str | None = None,
                  scheduler: str | None = None):
    """The base inpainting pipeline with the LoRA loaded (`load_lora_weights`, as users load it), and the scheduler
    `scheduler` names (a diffusers scheduler class, made from the base model's scheduler config) in place of its own."""
    from diffusers import StableDiffusionInpaintPipeline

    pipeline = StableDiffusionInpaintPipeline.from_pretrained(
        base_model, revision=revision, variant=variant, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False,
    )
    try:
        check_inpainting_unet(pipeline.unet, base_model)
    except InpaintingModelError as error:
        raise SynthesisError(str(error)) from error
    if scheduler:
        pipeline.scheduler = scheduler_class(scheduler).from_config(pipeline.scheduler.config)
    if lora is not None:
        check_lora_fits(pipeline, lora, trained_on, base_model)
        pipeline.load_lora_weights(lora)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(default_device(device))


# ----------------------------------------------------------------------------------------------------
# What the [V*] token looks at during synthesis; the metadata row of one output (the app)
# ----------------------------------------------------------------------------------------------------


def vstar_prompt_weights(tokenizer, prompt: str, token: str, rows: int) -> torch.Tensor:
    """(rows, K) `token_weights` of `prompt` tokenized as the pipeline encodes it (padded to the
    tokenizer's length); a prompt without the token is an error."""
    input_ids = tokenizer([prompt] * rows, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").input_ids
    try:
        return token_weights(input_ids, token_piece_ids(tokenizer, token))
    except ValueError as error:
        raise SynthesisError(f"the prompt {prompt!r} does not contain the [V*] token {token!r}: "
                             "there is no attention map to show") from error


def synthesize_with_attention(pipeline, jobs: list[Job], settings: SynthesisSettings, token: str,
                              scorer: Scorer | None = None, on_step: Callable[[int, int], None] | None = None,
                              ) -> tuple[list[SynthesisResult], list[torch.Tensor]]:
    """`synthesize`, recording the [V*] token's decoder cross-attention (`attention_processor`) during the
    denoising: per job, the map of its chosen candidate, (h, w) at the latent size of the job's region,
    averaged over the steps and the decoder layers. With classifier-free guidance the UNet sees the batch
    twice, unconditional rows first (diffusers' order); only the conditional rows, whose prompt holds the
    token, are recorded. The images are those `synthesize` gives (recording computes the same attention).
    `on_step(done, total)` is called after each UNet call (one per denoising step; some schedulers, such as
    PNDM, take one more call than `num_inference_steps`: `total` is the scheduler's count)."""
    batch = len(jobs) * settings.num_candidates
    weights = vstar_prompt_weights(pipeline.tokenizer, settings.prompt, token, batch)
    guided = settings.guidance_scale > 1 and pipeline.unet.config.time_cond_proj_dim is None
    rows = slice(batch, 2 * batch) if guided else slice(0, batch)
    latent = settings.resolution // pipeline.vae_scale_factor
    store = StepAveragingStore()
    calls = [0]

    def count_call(module, inputs, output):
        calls[0] += 1
        if on_step is not None:
            on_step(calls[0], max(calls[0], len(pipeline.scheduler.timesteps)))

    install_vstar_capture(pipeline.unet, store)
    hook = pipeline.unet.register_forward_hook(count_call)
    try:
        with store.recording(weights, (latent, latent), rows):
            results = synthesize(pipeline, jobs, settings, scorer, on_drop=lambda kept: store.keep_rows(kept, guided))
            maps = store.aggregate()[:, 0].cpu()
    finally:
        hook.remove()
        remove_vstar_capture(pipeline.unet)
    # The store's rows are the candidates that finished (all, or those an early selection kept), job after job.
    offsets = np.cumsum([0] + [len(result.kept) for result in results])
    return results, [maps[offsets[i] + result.kept.index(result.chosen)] for i, result in enumerate(results)]


def attention_in_mask(attention: torch.Tensor, region_mask: Image.Image | np.ndarray) -> float:
    """The share of the [V*] map's mass inside the mask (the map resized, bilinear, to the mask's size):
    1 when the token looks only where the defect goes."""
    mask = torch.from_numpy(np.asarray(region_mask) > 0).float()
    resized = torch.nn.functional.interpolate(attention[None, None].float(), size=tuple(mask.shape), mode="bilinear",
                                              align_corners=False)[0, 0].clamp_min(0)
    return float((resized * mask).sum() / resized.sum().clamp_min(1e-12))


def attention_overlay(result: SynthesisResult, attention: torch.Tensor, opacity: float = 0.6) -> Image.Image:
    """The [V*] map over the full-resolution result: normalised by its maximum, resized (bilinear) to the
    job's region box, coloured black-red-yellow-white ("hot") and blended over the image; outside the region
    (the whole image unless the job was cropped) the map is 0."""
    left, top, right, bottom = result.job.box
    values = attention.float().clamp_min(0)
    values = values / values.max().clamp_min(1e-12)
    resized = torch.nn.functional.interpolate(values[None, None], size=(bottom - top, right - left), mode="bilinear",
                                              align_corners=False)[0, 0].clamp(0, 1).numpy()
    heat = np.zeros((result.image.height, result.image.width), dtype=np.float32)
    heat[top:bottom, left:right] = resized
    colour = np.stack([np.clip(3 * heat, 0, 1), np.clip(3 * heat - 1, 0, 1), np.clip(3 * heat - 2, 0, 1)], axis=-1)
    image = np.asarray(result.image.convert("RGB"), dtype=np.float32) / 255
    return Image.fromarray(np.round(255 * ((1 - opacity) * image + opacity * colour)).astype(np.uint8))


def output_metadata_row(result: SynthesisResult, source_image: str, source_mask: str, settings: SynthesisSettings,
                        object_class: str | None, defect_type: str | None) -> dict:
    """The metadata row of one output, the fields `infer_defectfill.py` writes (file names are added by
    `defectfill.runs.folder.SynthesisFolder.save_result`)."""
    return {
        "source_image": str(source_image), "source_mask": str(source_mask), "seed": settings.seed,
        "candidate": result.chosen, "lpips": result.final_score, "candidate_scores": list(result.scores),
        "unet_passes": result.unet_passes,
        "prompt": settings.prompt, "object_class": object_class, "defect_type": defect_type, "crop_box": list(result.job.box),
    }

# Several LoRAs in one pipeline, and redraws with the next seeds (the dataset builder)
# ----------------------------------------------------------------------------------------------------

def load_named_adapters(pipeline, loras: dict[str, str], trained_on: str | None = None, base: str = "the base model") -> None:
    """Load each LoRA once as a named adapter (`load_lora_weights(path, adapter_name=name)`); `use_adapter`
    switches between them without reloading anything."""
    import warnings

    for name, lora in loras.items():
        check_lora_fits(pipeline, lora, trained_on, base)
        with warnings.catch_warnings():  # peft warns at the second adapter of a model: several are the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            pipeline.load_lora_weights(lora, adapter_name=name)


def use_adapter(pipeline, name: str) -> None:
    """Make the named adapter the only active one (UNet and text encoder)."""
    pipeline.set_adapters([name])
