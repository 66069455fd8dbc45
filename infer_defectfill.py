#!/usr/bin/env python
"""DefectFill synthesis: paint a learned defect into defect-free images with a trained [V*] LoRA, keep
the most defect-like of several candidates (Low-Fidelity Selection), and write a dataset.

    python infer_defectfill.py --lora runs/bottle-broken_large --image_path good.png --mask_path mask.png
    python infer_defectfill.py --lora runs/bottle-broken_large --data_dir /data/mvtec_ad --num_images 100 \
        --output_dir synthetic/bottle-broken_large

The run's `defectfill_run.json` supplies the base model, token, prompt, object class, defect type,
resolution, the scale training saw defects at, and the few-shot split (whose held-out masks are the
default masks); flags override it (`defectfill.runs.settings`). The generation is `defectfill.painting` (with the
pipeline of `defectfill.pipelines`); this script pairs files, calls it and fills the output folder
(`defectfill.runs.folder`), which loads with `datasets.load_dataset("imagefolder", ...)`.
"""

from __future__ import annotations

import argparse
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image

from defectfill.cli import (
    add_hub_arguments,
    add_layout_argument,
    add_model_arguments,
    check_minimums,
    parse_args_with_config,
    run_main,
)
from defectfill.data.mask_files import open_mask
from defectfill.data.mvtec import good_images, list_split_masks, split_layout
from defectfill.errors import SynthesisError
from defectfill.fileio import check_output_folder
from defectfill.images import IMAGE_EXTENSIONS, image_files, open_checked
from defectfill.masks import DEFAULT_CROP_CONTEXT, SPLIT_MASK_SOURCES
from defectfill.models import base_vae_scale_factor, check_resolution, default_device, precision_dtype
from defectfill.painting import Job, Scorer, mask_at_image_size, prepare_job, round_robin, synthesize
from defectfill.pipelines import check_scheduler, load_pipeline, scheduler_calls
from defectfill.runs.folder import SynthesisFolder, output_names
from defectfill.runs.hub import upload_folder_to_hub
from defectfill.runs.metadata import output_metadata_row
from defectfill.runs.records import read_run
from defectfill.runs.settings import RunOverrides, RunPlan, plan_run
from defectfill.scoring import LpipsModel

logger = logging.getLogger("defectfill")


# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="DefectFill defect synthesis with Low-Fidelity Selection.")
    p.add_argument("--lora", default=None,
                   help="A training run: the output folder of train_defectfill.py (holds defectfill_run.json and "
                        "pytorch_lora_weights.safetensors), or a Hub repo id. Required.")
    add_model_arguments(p, "Base inpainting model; default: the run's base_model.")
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
                   help="Batch mode: the dataset folder (any layout of docs/data.md); good images of --object_class and "
                        "held-out masks of the run's split. Default: the run's.")
    add_layout_argument(p, "the layout the run's split recorded, else detected")
    p.add_argument("--good_split", default="train", choices=("train", "test", "all"), help="Which MVTec good images to paint on.")
    p.add_argument("--mask_dir", default=None, help="Batch mode: a folder of masks; default: the run's split's masks (--mask_from).")
    p.add_argument("--mask_from", default="heldout", choices=SPLIT_MASK_SOURCES,
                   help="Without --mask_dir, which masks of the run's split to paint in: 'heldout' (the test set's masks; "
                        "what KID against the held-out defects compares) or 'train' (the generator's training masks: the "
                        "only ones for a set a detector trains on, which downstream_defectfill.py accepts without "
                        "--allow_test_leak).")
    p.add_argument("--pairing", default="round_robin", choices=("round_robin", "random"), help="How images and masks are paired.")
    p.add_argument("--num_images", type=int, default=None,
                   help="Outputs in batch mode (>= 1); default: all masks, one output per mask.")

    p.add_argument("--num_candidates", type=int, default=8,
                   help="Candidates per (image, mask); the highest LPIPS inside the mask is kept. 1 = no selection.")
    p.add_argument("--batch_size", type=int, default=1, help="(image, mask) pairs per pipeline call (each with all its candidates).")
    p.add_argument("--num_inference_steps", type=int, default=50, help="Denoising steps.")
    p.add_argument("--guidance_scale", type=float, default=7.5, help="Classifier-free guidance scale.")
    p.add_argument("--scheduler", default=None,
                   help="A diffusers scheduler class name (e.g. DPMSolverMultistepScheduler); default: the base model's.")
    p.add_argument("--seed", type=int, default=0, help="Seed; the same seed gives the same images.")
    p.add_argument("--composite", action=argparse.BooleanOptionalAction, default=True,
                   help="Keep every pixel outside the mask equal to the clean input (the mask stays an exact label).")
    p.add_argument("--crop_to_mask", action=argparse.BooleanOptionalAction, default=None,
                   help="Generate in a square crop around the mask at full resolution (when the image is larger than "
                        "--resolution) instead of on the whole image resized. Default: the scale the run trained at "
                        "(on when it trained with --defect_crop_probability > 0, off for the paper's whole-image training).")
    p.add_argument("--crop_context", type=float, default=None,
                   help="Context around the mask's box in the crop, as a fraction of its side; default: the run's "
                        f"(else {DEFAULT_CROP_CONTEXT}).")
    p.add_argument("--lpips_net", default="alex", choices=("alex", "vgg", "squeeze"), help="LPIPS backbone for the selection.")

    p.add_argument("--output_dir", default="defectfill-synthetic", help="Output folder (images, masks, metadata.jsonl, preview.png).")
    p.add_argument("--save_candidates", action="store_true", help="Also keep the rejected candidates (candidates/).")
    p.add_argument("--overwrite", action="store_true",
                   help="Delete the outputs of an earlier synthesis with other settings in --output_dir first (without it, "
                        "a folder made with other settings is an error; one made with the same settings is resumed).")
    add_hub_arguments(p, "--hub_dataset_id", "the output folder as a dataset repo")
    return p


def parse_args(input_args: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_args_with_config(parser, input_args, required=("lora",))
    if (args.image_path is None) != (args.mask_path is None):
        parser.error("single mode needs both --image_path and --mask_path")
    if args.image_path and (args.image_dir or args.mask_dir):
        parser.error("give either --image_path/--mask_path (single) or --image_dir/--data_dir with --mask_dir (batch)")
    # counts: --num_images unset (None) means one output per mask, all of them
    check_minimums(parser, args, {"num_images": 1, "num_candidates": 1, "batch_size": 1, "num_inference_steps": 1,
                                  "resolution": 1})
    return args


def run_overrides(args: argparse.Namespace) -> RunOverrides:
    """What the flags change of the run's record (None: the run's value)."""
    return RunOverrides(pretrained_model_name_or_path=args.pretrained_model_name_or_path, token=args.token,
                        object_class=args.object_class, defect_type=args.defect_type, prompt=args.prompt,
                        resolution=args.resolution, crop_to_mask=args.crop_to_mask, crop_context=args.crop_context,
                        data_dir=args.data_dir)


def resolve_plan(args, run) -> RunPlan:
    """The run with the flags' overrides (`plan_run`): flags win over the run's record."""
    return plan_run(args.lora, run, run_overrides(args), num_candidates=args.num_candidates,
                    num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, seed=args.seed,
                    composite=args.composite)


# ----------------------------------------------------------------------------------------------------
# Pairs of files
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    index: int
    image_path: Path
    mask_path: Path


def batch_sources(args, plan: RunPlan) -> tuple[list[Path], list[Path]]:
    """(good images, masks) of batch mode: --image_dir or the class's good images; --mask_dir or the masks of
    the run's split (--mask_from)."""
    if not args.image_dir and not plan.data_dir:
        raise SynthesisError("batch mode needs --image_dir or --data_dir (or single mode: --image_path and --mask_path)")
    layout = split_layout(plan.split, args.layout)
    goods = good_images(plan.data_dir, plan.object_class, args.good_split, args.image_dir, layout)
    if args.mask_dir:
        masks = image_files(Path(args.mask_dir))
        if not masks:
            raise SynthesisError(f"--mask_dir {args.mask_dir} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    elif plan.data_dir and plan.split:
        masks = list_split_masks(plan.data_dir, plan.split, plan.defect_type, args.mask_from, layout)
        if not masks:
            raise SynthesisError(f"the run's split holds no {args.mask_from} mask of {plan.defect_type}: give --mask_dir")
    else:
        raise SynthesisError("no masks: give --mask_dir (the run has no split with held-out masks)")
    return goods, masks


def make_pairs(goods: list[Path], masks: list[Path], num_images: int, pairing: str, seed: int) -> list[Pair]:
    """`num_images` (image, mask) pairs: in order, cycling (round_robin), or drawn with a seed (random)."""
    if pairing == "random":
        rng = random.Random(seed)
        return [Pair(i, rng.choice(goods), rng.choice(masks)) for i in range(num_images)]
    return [Pair(i, image, mask) for i, (image, mask) in enumerate(round_robin(goods, masks, num_images))]


def build_pairs(args, plan: RunPlan) -> list[Pair]:
    if args.image_path:
        return [Pair(0, Path(args.image_path), Path(args.mask_path))]
    goods, masks = batch_sources(args, plan)
    return make_pairs(goods, masks, len(masks) if args.num_images is None else args.num_images, args.pairing, args.seed)


def check_inputs(pairs: list[Pair]) -> None:
    """Decode every image and mask before the first one is generated: a corrupt file or an empty mask is
    named up front, not after part of the output is written."""
    for image_path in dict.fromkeys(p.image_path for p in pairs):
        open_checked(image_path, "image").close()
    for mask_path in dict.fromkeys(p.mask_path for p in pairs):
        mask = open_mask(mask_path)  # a file or a folder of masks (unioned); any non-zero pixel is a defect
        mask_at_image_size(mask, mask.size, f"mask {mask_path}")  # the core's own empty-mask check


def prepare_pair(pair: Pair, plan: RunPlan) -> Job:
    with Image.open(pair.image_path) as image:
        return prepare_job(image, open_mask(pair.mask_path), pair.index, plan.settings, mask_name=f"mask {pair.mask_path}")


# ----------------------------------------------------------------------------------------------------
# Output folder
# ----------------------------------------------------------------------------------------------------


# The fields of synthesis.json that are part of the fingerprint.
FINGERPRINT_FIELDS = ("lora", "pretrained_model_name_or_path", "prompt", "resolution", "num_candidates",
                      "num_inference_steps", "guidance_scale", "seed", "composite", "crop_to_mask", "crop_context")


def fingerprint(args, plan: RunPlan) -> dict:
    """The settings that decide what an output image is: a folder resumes only when they match."""
    record = plan.synthesis_record().to_dict()
    return {**{name: record[name] for name in FINGERPRINT_FIELDS}, "scheduler": args.scheduler,
            "revision": args.revision, "variant": args.variant, "mixed_precision": args.mixed_precision,
            "mask_from": mask_origin(args)}


def mask_origin(args) -> str:
    """Where the masks come from, as synthesis.json and every row record it (downstream_defectfill.py reads it):
    the split's "heldout" or "train" masks, a --mask_dir ("dir") or the single --mask_path ("file")."""
    return "file" if args.mask_path else "dir" if args.mask_dir else args.mask_from


def synthesize_to_folder(pipeline, pairs: list[Pair], plan: RunPlan, scorer, folder: SynthesisFolder, batch_size: int,
                         save_candidates: bool = False, mask_from: str | None = None) -> dict[str, dict]:
    """Generate, select and save every pair not already done; returns all metadata rows (each with `mask_from`,
    where its mask came from)."""
    from tqdm.auto import tqdm

    rows = folder.rows()
    todo = [p for p in pairs if output_names(p.index)[0] not in rows]
    if len(todo) < len(pairs):
        logger.info("resuming: %d of %d outputs already exist", len(pairs) - len(todo), len(pairs))
    for start in tqdm(range(0, len(todo), batch_size), desc="pairs", unit="batch", disable=not todo):
        batch = todo[start : start + batch_size]
        jobs = [prepare_pair(p, plan) for p in batch]
        done = [folder.save_result(pair.index, result.image, result.job.mask,
                                   {**output_metadata_row(result, pair.image_path, pair.mask_path, plan.settings,
                                                          plan.object_class, plan.defect_type), "mask_from": mask_from},
                                   result.candidates if save_candidates else None)
                for pair, result in zip(batch, synthesize(pipeline, jobs, plan.settings, scorer))]
        rows = folder.add_rows(done)
    return rows


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace, scorer: Scorer | None = None) -> Path:
    """Run the synthesis; `scorer` replaces the LPIPS scorer (tests, or another similarity). With one candidate
    nothing is selected, and nothing scored."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_output_folder(args.output_dir, "--output_dir")
    run = read_run(args.lora)
    plan = resolve_plan(args, run)
    base_flag = "--pretrained_model_name_or_path" if args.pretrained_model_name_or_path else "the run's base model"
    check_resolution(plan.settings.resolution, base_vae_scale_factor(plan.base_model, args.revision, flag=base_flag))
    device = default_device(args.device)
    logger.info("scale: %s (crop_to_mask=%s, crop_context=%s)", plan.scale_source, plan.settings.crop_to_mask,
                plan.settings.crop_context)
    pairs = build_pairs(args, plan)
    folder = SynthesisFolder(args.output_dir)
    outputs = fingerprint(args, plan)
    folder.check(outputs, args.overwrite)  # before any model loads
    scheduler = check_scheduler(args.scheduler, plan.base_model, args.revision)
    check_inputs(pairs)
    if plan.settings.num_candidates == 1:
        scorer = None
    elif scorer is None:
        scorer = LpipsModel(args.lpips_net, device).masked_scores
    pipeline = load_pipeline(plan.base_model, plan.lora, run.base_model if run else None, args.revision, args.variant,
                             precision_dtype(args.mixed_precision), device, args.scheduler)
    with folder.writing():  # a second run on this folder is told it is busy
        folder.claim(outputs, args.overwrite)
        passes = plan.settings.num_candidates * scheduler_calls(pipeline, plan.settings.num_inference_steps)
        logger.info("sampler %s, %d steps, %d candidates: %d UNet passes per image", scheduler,
                    plan.settings.num_inference_steps, plan.settings.num_candidates, passes)
        # before the first image: a killed run resumes on the same terms
        folder.write_record(plan.synthesis_record(scheduler=scheduler, unet_passes_per_image=passes, mask_from=mask_origin(args),
                                                  pipeline_class=type(pipeline).__name__))
        rows = synthesize_to_folder(pipeline, pairs, plan, scorer, folder, args.batch_size, args.save_candidates,
                                    mask_origin(args))
        folder.save_preview(rows)
    logger.info("%d images in %s", len(rows), folder.path)
    if args.push_to_hub:
        try:
            repo_id = upload_folder_to_hub(folder.path, args.hub_dataset_id, args.hub_token, repo_type="dataset",
                                           commit_message="DefectFill synthetic defects")
        except Exception as error:  # offline, bad token, no write access: the images are safe on disk
            raise SynthesisError(f"the images are saved in {folder.path}, but pushing them to the Hub failed: {error}") from error
        logger.info("pushed to https://huggingface.co/datasets/%s", repo_id)
    return folder.path


if __name__ == "__main__":
    run_main(main, parse_args)
