#!/usr/bin/env python
"""DefectFill synthesis: paint a learned defect into defect-free images with a trained [V*] LoRA, keep
the most defect-like of several candidates (Low-Fidelity Selection), and write a dataset.

    python infer_defectfill.py --lora runs/bottle-broken_large --image_path good.png --mask_path mask.png
    python infer_defectfill.py --lora runs/bottle-broken_large --data_dir /data/mvtec_ad --num_images 100 \
        --output_dir synthetic/bottle-broken_large

The run's `defectfill_run.json` supplies the base model, token, prompt, object class, defect type,
resolution and the few-shot split (whose held-out masks are the default masks); flags override it.
The output folder loads with `datasets.load_dataset("imagefolder", data_dir=...)`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

import dataset_mvtec as dm
import defectfill_method as method
from cli_config import parse_args_with_config
from fileio import save_image_atomic, write_json_atomic, write_text_atomic
from train_defectfill import LORA_FILENAME, RUN_FILENAME

logger = logging.getLogger("defectfill")

METADATA_FILENAME = "metadata.jsonl"
SYNTHESIS_FILENAME = "synthesis.json"
PREVIEW_FILENAME = "preview.png"


class InferenceError(ValueError):
    """Bad inference input; the message names the file or flag and what was expected."""


# ----------------------------------------------------------------------------------------------------
# Arguments and the run
# ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="DefectFill defect synthesis with Low-Fidelity Selection.")
    p.add_argument("--lora", "--checkpoint", dest="lora", default=None,
                   help="A training run: local folder with pytorch_lora_weights.safetensors, or a Hub repo id. Required.")
    p.add_argument("--pretrained_model_name_or_path", default=None, help="Base inpainting model; default: the run's base_model.")
    p.add_argument("--revision", default=None, help="Base model revision on the Hub.")
    p.add_argument("--variant", default=None, help="Base model weights variant, e.g. fp16.")
    p.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"), help="Inference dtype (fp16/bf16 on a GPU).")
    p.add_argument("--device", default=None, help="torch device; default: cuda if available, else cpu.")
    p.add_argument("--token", default=None, help="[V*] token; default: the run's.")
    p.add_argument("--object_class", default=None, help="Object class (MVTec category); default: the run's.")
    p.add_argument("--defect_type", default=None, help="Defect type; default: the run's.")
    p.add_argument("--prompt", default=None, help="Prompt; default: 'A {object} with [V*]' (the object-branch prompt).")
    p.add_argument("--resolution", type=int, default=None, help="Generation resolution; default: the run's training resolution.")

    p.add_argument("--image_path", default=None, help="Single mode: one defect-free image.")
    p.add_argument("--mask_path", default=None, help="Single mode: its defect mask (white = where the defect goes).")
    p.add_argument("--image_dir", default=None, help="Batch mode: a folder of defect-free images.")
    p.add_argument("--data_dir", default=None,
                   help="Batch mode: MVTec AD root; good images of --object_class and held-out masks of the run's split. Default: the run's.")
    p.add_argument("--good_split", default="train", choices=("train", "test", "all"), help="Which MVTec good images to paint on.")
    p.add_argument("--mask_dir", default=None, help="Batch mode: a folder of masks; default: the held-out masks of the run's split.")
    p.add_argument("--pairing", default="round_robin", choices=("round_robin", "random"), help="How images and masks are paired.")
    p.add_argument("--num_images", type=int, default=None, help="Outputs in batch mode; default: one per mask.")

    p.add_argument("--num_candidates", type=int, default=8, help="Candidates per (image, mask); the highest LPIPS inside the mask is kept. 1 = no selection.")
    p.add_argument("--batch_size", type=int, default=1, help="(image, mask) pairs per pipeline call (each with all its candidates).")
    p.add_argument("--num_inference_steps", type=int, default=50, help="Denoising steps.")
    p.add_argument("--guidance_scale", type=float, default=7.5, help="Classifier-free guidance scale.")
    p.add_argument("--scheduler", default=None, help="A diffusers scheduler class name (e.g. DPMSolverMultistepScheduler); default: the base model's.")
    p.add_argument("--seed", type=int, default=0, help="Seed; the same seed gives the same images.")
    p.add_argument("--composite", action=argparse.BooleanOptionalAction, default=True,
                   help="Keep every pixel outside the mask equal to the clean input (the mask stays an exact label).")
    p.add_argument("--crop_to_mask", action=argparse.BooleanOptionalAction, default=True,
                   help="Generate in a square crop around the mask at full resolution when the image is larger than --resolution.")
    p.add_argument("--crop_context", type=float, default=0.5,
                   help="Context around the mask's box in the crop, as a fraction of its side (ours; the paper generates at 512 px).")
    p.add_argument("--lpips_net", default="alex", choices=("alex", "vgg", "squeeze"), help="LPIPS backbone for the selection.")

    p.add_argument("--output_dir", default="defectfill-synthetic", help="Output folder (images, masks, metadata.jsonl, preview.png).")
    p.add_argument("--save_candidates", action="store_true", help="Also keep the rejected candidates (candidates/).")
    p.add_argument("--push_to_hub", action="store_true", help="Upload the output folder as a Hub dataset repo.")
    p.add_argument("--hub_dataset_id", default=None, help="Dataset repo id; default: the output folder's name.")
    p.add_argument("--hub_token", default=None, help="Hub token; prefer `huggingface-cli login`.")
    return p


def parse_args(input_args: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_args_with_config(parser, input_args, required=("lora",))
    if (args.image_path is None) != (args.mask_path is None):
        parser.error("single mode needs both --image_path and --mask_path")
    if args.image_path and (args.image_dir or args.mask_dir):
        parser.error("give either --image_path/--mask_path (single) or --image_dir/--data_dir with --mask_dir (batch)")
    if args.num_candidates < 1 or args.batch_size < 1:
        parser.error("--num_candidates and --batch_size must be >= 1")
    return args


def read_run(lora: str, cache_dir: str | None = None) -> dict:
    """The run's defectfill_run.json ({} for a LoRA trained elsewhere); a local folder must hold the weights."""
    path = Path(lora)
    if path.exists():
        if not (path / LORA_FILENAME).is_file():
            raise InferenceError(f"--lora {path} has no {LORA_FILENAME}; expected the output folder of train_defectfill.py")
        run_file = path / RUN_FILENAME
        return json.loads(run_file.read_text()) if run_file.is_file() else {}
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(lora, RUN_FILENAME, cache_dir=cache_dir)).read_text())
    except LocalEntryNotFoundError as error:  # offline and not cached (a subclass of EntryNotFoundError)
        raise InferenceError(f"--lora {lora} is not a local folder, and the Hub cannot be reached to fetch it ({error})") from error
    except EntryNotFoundError:  # a LoRA repo made elsewhere, without our run file
        return {}
    except (HFValidationError, OSError) as error:  # offline, unknown repo, or not a repo id at all
        raise InferenceError(
            f"--lora {lora} is not a local folder, and its {RUN_FILENAME} could not be fetched from the Hub ({error})"
        ) from error


def resolve_settings(args, run: dict) -> argparse.Namespace:
    """Flags win over the run's JSON; the result has every setting inference uses."""
    settings = argparse.Namespace(**vars(args))
    for key, run_key in (("pretrained_model_name_or_path", "base_model"), ("token", "token"), ("object_class", "object_class"),
                         ("defect_type", "defect_type"), ("resolution", "resolution"), ("data_dir", "data_dir")):
        if getattr(settings, key) is None:
            setattr(settings, key, run.get(run_key))
    settings.token = settings.token or method.DEFAULT_TOKEN
    settings.resolution = settings.resolution or 512
    if settings.pretrained_model_name_or_path is None:
        raise InferenceError("--pretrained_model_name_or_path is needed: the run has no defectfill_run.json naming its base model")
    if settings.prompt is None:
        if settings.object_class is None:
            raise InferenceError("--object_class (or --prompt) is needed: the run has no defectfill_run.json")
        settings.prompt = method.object_prompt(settings.object_class, settings.token)
    settings.split = run.get("split")
    return settings


# ----------------------------------------------------------------------------------------------------
# Pairs
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    index: int
    image_path: Path
    mask_path: Path


def list_images(folder: str | os.PathLike, flag: str) -> list[Path]:
    files = dm.image_files(Path(folder))
    if not files:
        raise InferenceError(f"{flag} {folder} holds no image files ({', '.join(dm.IMAGE_EXTENSIONS)})")
    return files


def batch_sources(settings) -> tuple[list[Path], list[Path]]:
    """(good images, masks) of batch mode."""
    if settings.image_dir:
        goods = list_images(settings.image_dir, "--image_dir")
    elif settings.data_dir:
        splits = ("train", "test") if settings.good_split == "all" else (settings.good_split,)
        goods = dm.list_good_images(settings.data_dir, settings.object_class, splits)
        if not goods:
            raise InferenceError(f"no good images of {settings.object_class} in {settings.data_dir} ({settings.good_split})")
    else:
        raise InferenceError("batch mode needs --image_dir or --data_dir (or single mode: --image_path and --mask_path)")
    if settings.mask_dir:
        masks = list_images(settings.mask_dir, "--mask_dir")
    elif settings.data_dir and settings.split:
        masks = dm.list_heldout_masks(settings.data_dir, settings.split, settings.defect_type)
        if not masks:
            raise InferenceError(f"the run's split holds no held-out mask of {settings.defect_type}: give --mask_dir")
    else:
        raise InferenceError("no masks: give --mask_dir (the run has no split with held-out masks)")
    return goods, masks


def make_pairs(goods: list[Path], masks: list[Path], num_images: int, pairing: str, seed: int) -> list[Pair]:
    """`num_images` (image, mask) pairs: in order, cycling (round_robin), or drawn with a seed (random)."""
    if pairing == "random":
        rng = random.Random(seed)
        return [Pair(i, rng.choice(goods), rng.choice(masks)) for i in range(num_images)]
    return [Pair(i, goods[i % len(goods)], masks[i % len(masks)]) for i in range(num_images)]


def require_nonempty(mask: np.ndarray, mask_path: Path) -> np.ndarray:
    if not mask.any():
        raise InferenceError(f"mask {mask_path} is empty (no pixel >= {dm.MASK_THRESHOLD}); nothing to inpaint")
    return mask


def check_mask(mask_path: Path) -> None:
    with Image.open(mask_path) as mask:
        require_nonempty(dm.binarize_mask(mask), mask_path)


def load_pair(pair: Pair) -> tuple[Image.Image, np.ndarray]:
    """The clean RGB image and its boolean mask at the image's size (masks are resized, nearest)."""
    image = Image.open(pair.image_path).convert("RGB")
    mask_image = Image.open(pair.mask_path)
    if mask_image.size != image.size:
        mask_image = mask_image.convert("L").resize(image.size, Image.NEAREST)
    return image, require_nonempty(dm.binarize_mask(mask_image), pair.mask_path)  # resizing can empty a tiny mask


# ----------------------------------------------------------------------------------------------------
# Crop, generate, select, composite
# ----------------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One (image, mask) pair prepared for the pipeline: the region to generate, at model resolution."""

    pair: Pair
    image: Image.Image
    mask: np.ndarray
    box: tuple[int, int, int, int]
    region: Image.Image
    region_mask: Image.Image


def prepare_job(pair: Pair, resolution: int, crop_to_mask: bool, context: float) -> Job:
    image, mask = load_pair(pair)
    box = (0, 0, *image.size)
    if crop_to_mask and min(image.size) > resolution:
        box = dm.mask_crop_box(mask, resolution, context) or box
    mask_image = Image.fromarray(mask.astype(np.uint8) * 255)
    region = image.crop(box).resize((resolution, resolution), Image.BICUBIC)
    region_mask = mask_image.crop(box).resize((resolution, resolution), Image.NEAREST)
    return Job(pair, image, mask, box, region, region_mask)


def candidate_generators(seed: int, pair_index: int, count: int, device) -> list[torch.Generator]:
    """One generator per candidate, seeded by (seed, pair, candidate): the same pair gives the same
    candidates whatever the batch size or the pairs around it."""
    return [torch.Generator(device=device).manual_seed(seed * 1_000_003 + pair_index * 1_009 + c) for c in range(count)]


def generate_candidates(pipeline, jobs: list[Job], settings) -> list[list[Image.Image]]:
    """All candidates of all jobs in one pipeline call; returns them per job."""
    n = settings.num_candidates
    generators = [g for job in jobs for g in candidate_generators(settings.seed, job.pair.index, n, pipeline.device)]
    result = pipeline(
        prompt=[settings.prompt] * (len(jobs) * n), image=[job.region for job in jobs for _ in range(n)],
        mask_image=[job.region_mask for job in jobs for _ in range(n)], height=settings.resolution, width=settings.resolution,
        num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale, generator=generators,
    ).images
    return [result[i * n : (i + 1) * n] for i in range(len(jobs))]


def composite(clean: Image.Image, generated: Image.Image, mask: Image.Image | np.ndarray) -> Image.Image:
    """M * generated + (1 - M) * clean, so outside the mask the output is the clean input exactly."""
    mask = np.asarray(mask) > 0 if not isinstance(mask, np.ndarray) else mask
    out = np.where(mask[..., None], np.asarray(generated.convert("RGB")), np.asarray(clean.convert("RGB")))
    return Image.fromarray(out)


def paste_back(job: Job, generated_region: Image.Image, use_composite: bool) -> Image.Image:
    """The generated region back at full resolution, inside the clean image."""
    left, top, right, bottom = job.box
    full = job.image.copy()
    full.paste(generated_region.resize((right - left, bottom - top), Image.BICUBIC), (left, top))
    return composite(job.image, full, job.mask) if use_composite else full


def select_candidate(scores: Sequence[float]) -> int:
    """Low-Fidelity Selection: the candidate whose masked region departs most from the clean object."""
    return int(np.argmax(np.asarray(scores, dtype=np.float64)))


class LpipsScorer:
    """LPIPS between each candidate and the clean image, averaged over the mask's pixels (the spatial
    LPIPS map of the `lpips` package, so the score only sees the inpainted region). "LPIPS inside the
    mask" is the paper's phrase; the spatial map averaged over the mask is our reading of it."""

    def __init__(self, net: str = "alex", device: str | torch.device = "cpu", pretrained_backbone: bool = True):
        import lpips

        try:
            self.model = lpips.LPIPS(net=net, spatial=True, pnet_rand=not pretrained_backbone, verbose=False).to(device).eval()
        except Exception as error:  # the torchvision backbone download failed
            raise InferenceError(
                f"LPIPS needs the torchvision '{net}' backbone weights, which could not be loaded ({error}). Put the "
                f"checkpoint file in $TORCH_HOME/hub/checkpoints (run once with network access), or use --num_candidates 1"
            ) from error
        self.device = device

    @torch.no_grad()
    def __call__(self, clean: Image.Image, candidates: list[Image.Image], mask: Image.Image) -> list[float]:
        def to_tensor(image):
            return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)

        batch = torch.stack([to_tensor(c) for c in candidates]).to(self.device)
        reference = to_tensor(clean)[None].expand_as(batch).to(self.device)
        distance = self.model(batch, reference)  # (N, 1, H, W)
        weights = torch.from_numpy(np.asarray(mask) > 0).float().to(self.device)
        return ((distance[:, 0] * weights).sum(dim=(1, 2)) / weights.sum().clamp_min(1)).tolist()


# ----------------------------------------------------------------------------------------------------
# Output folder
# ----------------------------------------------------------------------------------------------------


def read_metadata(output_dir: Path) -> dict[str, dict]:
    """Existing rows keyed by file name, kept only where the image and mask files exist (resume)."""
    path = output_dir / METADATA_FILENAME
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["file_name"]: r for r in rows if (output_dir / r["file_name"]).is_file() and (output_dir / r["mask_file_name"]).is_file()}


def write_metadata(output_dir: Path, rows: dict[str, dict]) -> None:
    write_text_atomic(output_dir / METADATA_FILENAME, "".join(json.dumps(rows[name]) + "\n" for name in sorted(rows)))


def output_names(pair: Pair) -> tuple[str, str]:
    return f"images/{pair.index:05d}.png", f"masks/{pair.index:05d}_mask.png"


def save_result(output_dir: Path, job: Job, image: Image.Image, scores: list[float], chosen: int, settings,
                candidates: list[Image.Image]) -> dict:
    image_name, mask_name = output_names(job.pair)
    save_image_atomic(Image.fromarray(job.mask.astype(np.uint8) * 255), output_dir / mask_name)
    if settings.save_candidates:
        for c, candidate in enumerate(candidates):
            save_image_atomic(candidate, output_dir / "candidates" / f"{job.pair.index:05d}_{c}.png")
    save_image_atomic(image, output_dir / image_name)  # last: its presence marks the pair done
    return {
        "file_name": image_name, "mask_file_name": mask_name, "source_image": str(job.pair.image_path),
        "source_mask": str(job.pair.mask_path), "seed": settings.seed, "candidate": chosen, "lpips": scores[chosen],
        "candidate_scores": scores, "prompt": settings.prompt, "object_class": settings.object_class,
        "defect_type": settings.defect_type, "crop_box": list(job.box),
    }


def save_preview(output_dir: Path, rows: dict[str, dict], max_rows: int = 8) -> Path | None:
    """A grid, one row per output: clean | mask | generated."""
    chosen = [rows[name] for name in sorted(rows)[:max_rows]]
    if not chosen:
        return None
    tile = 192
    grid = Image.new("RGB", (3 * tile, tile * len(chosen)), (255, 255, 255))
    for row_index, row in enumerate(chosen):
        panels = [Image.open(row["source_image"]), Image.open(output_dir / row["mask_file_name"]), Image.open(output_dir / row["file_name"])]
        for column, panel in enumerate(panels):
            grid.paste(panel.convert("RGB").resize((tile, tile), Image.BICUBIC), (column * tile, row_index * tile))
    path = output_dir / PREVIEW_FILENAME
    save_image_atomic(grid, path)
    return path


# ----------------------------------------------------------------------------------------------------
# Pipeline
# ----------------------------------------------------------------------------------------------------


def check_lora_fits(pipeline, lora: str, run: dict, base: str) -> None:
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
            trained_on = run.get("base_model", "another model")
            found = "no such layer" if module is None else f"in_features {expected}"
            raise InferenceError(
                f"the LoRA in {lora} was trained on {trained_on}, not on {base}: its layer {name} "
                f"expects input size {tensor.shape[1]}, the base model has {found}. Use --pretrained_model_name_or_path {trained_on}"
            )


def load_pipeline(settings):
    import diffusers
    from diffusers import StableDiffusionInpaintPipeline

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(settings.mixed_precision, torch.float32)
    pipeline = StableDiffusionInpaintPipeline.from_pretrained(
        settings.pretrained_model_name_or_path, revision=settings.revision, variant=settings.variant, torch_dtype=dtype,
        safety_checker=None, requires_safety_checker=False,
    )
    if pipeline.unet.config.in_channels != 9:
        raise InferenceError(f"{settings.pretrained_model_name_or_path} is not an inpainting model (UNet has "
                             f"{pipeline.unet.config.in_channels} input channels, expected 9)")
    if settings.scheduler:
        scheduler_class = getattr(diffusers, settings.scheduler, None)
        if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
            raise InferenceError(f"--scheduler {settings.scheduler} is not a diffusers scheduler class")
        pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config)
    check_lora_fits(pipeline, settings.lora, settings.run, settings.pretrained_model_name_or_path)
    pipeline.load_lora_weights(settings.lora)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(settings.device)


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------


def build_pairs(settings) -> list[Pair]:
    if settings.image_path:
        return [Pair(0, Path(settings.image_path), Path(settings.mask_path))]
    goods, masks = batch_sources(settings)
    return make_pairs(goods, masks, settings.num_images or len(masks), settings.pairing, settings.seed)


def synthesize(pipeline, pairs: list[Pair], settings, scorer: Callable | None, output_dir: Path) -> dict[str, dict]:
    """Generate, select and save every pair not already done; returns all metadata rows."""
    from tqdm.auto import tqdm

    rows = read_metadata(output_dir)
    todo = [p for p in pairs if output_names(p)[0] not in rows]
    if len(todo) < len(pairs):
        logger.info("resuming: %d of %d outputs already exist", len(pairs) - len(todo), len(pairs))
    for pair in {p.mask_path: p for p in todo}.values():  # every mask checked before the first image is generated
        check_mask(pair.mask_path)
    for start in tqdm(range(0, len(todo), settings.batch_size), desc="pairs", unit="batch", disable=not todo):
        batch = [prepare_job(p, settings.resolution, settings.crop_to_mask, settings.crop_context)
                 for p in todo[start : start + settings.batch_size]]
        for job, candidates in zip(batch, generate_candidates(pipeline, batch, settings)):
            candidates = [composite(job.region, c, job.region_mask) for c in candidates] if settings.composite else candidates
            scores = scorer(job.region, candidates, job.region_mask) if scorer and len(candidates) > 1 else [0.0] * len(candidates)
            chosen = select_candidate(scores)
            image = paste_back(job, candidates[chosen], settings.composite)
            row = save_result(output_dir, job, image, scores, chosen, settings, candidates)
            rows[row["file_name"]] = row
        write_metadata(output_dir, rows)
    return rows


def write_synthesis_record(output_dir: Path, settings) -> None:
    record = {k: getattr(settings, k) for k in ("lora", "pretrained_model_name_or_path", "token", "prompt", "object_class",
                                               "defect_type", "resolution", "num_candidates", "num_inference_steps",
                                               "guidance_scale", "seed", "composite", "crop_to_mask", "data_dir")}
    record["data_dir"] = str(record["data_dir"]) if record["data_dir"] else None
    record["split"] = settings.split
    write_json_atomic(output_dir / SYNTHESIS_FILENAME, record)


def push_dataset(output_dir: Path, settings) -> str:
    from huggingface_hub import create_repo, upload_folder

    try:
        repo_id = create_repo(settings.hub_dataset_id or output_dir.name, repo_type="dataset", exist_ok=True,
                              token=settings.hub_token).repo_id
        upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=str(output_dir), token=settings.hub_token,
                      commit_message="DefectFill synthetic defects", ignore_patterns=["*.tmp", ".*"])
    except Exception as error:  # offline, bad token, no write access: the images are safe on disk
        raise InferenceError(f"the images are saved in {output_dir}, but pushing them to the Hub failed: {error}") from error
    return repo_id


def main(args: argparse.Namespace, scorer: Callable | None = None) -> Path:
    """Run the synthesis; `scorer` replaces the LPIPS scorer (tests, or another similarity)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    run = read_run(args.lora)
    settings = resolve_settings(args, run)
    settings.run = run
    settings.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pairs = build_pairs(settings)
    output_dir = Path(settings.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if scorer is None and settings.num_candidates > 1:
        scorer = LpipsScorer(settings.lpips_net, settings.device)
    pipeline = load_pipeline(settings)
    rows = synthesize(pipeline, pairs, settings, scorer, output_dir)
    write_synthesis_record(output_dir, settings)
    save_preview(output_dir, rows)
    logger.info("%d images in %s", len(rows), output_dir)
    if settings.push_to_hub:
        logger.info("pushed to https://huggingface.co/datasets/%s", push_dataset(output_dir, settings))
    return output_dir


if __name__ == "__main__":
    try:
        main(parse_args())
    except (InferenceError, dm.DatasetError) as error:
        raise SystemExit(f"error: {error}") from None
