#!/usr/bin/env python
"""DefectFill synthesis: paint a learned defect into defect-free images with a trained [V*] LoRA, keep
the most defect-like of several candidates (Low-Fidelity Selection), and write a dataset.

    python infer_defectfill.py --lora runs/bottle-broken_large --image_path good.png --mask_path mask.png
    python infer_defectfill.py --lora runs/bottle-broken_large --data_dir /data/mvtec_ad --num_images 100 \
        --output_dir synthetic/bottle-broken_large

The run's `defectfill_run.json` supplies the base model, token, prompt, object class, defect type,
resolution, the scale training saw defects at, and the few-shot split (whose held-out masks are the
default masks); flags override it. The generation itself is `synthesis.py`; this script pairs files,
calls it and writes the output folder, which loads with `datasets.load_dataset("imagefolder", ...)`.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image

import dataset_mvtec as dm
import defectfill_method as method
import run_files as rf
import synthesis
from cli_config import add_hub_arguments, add_model_arguments, parse_args_with_config
from synthesis import SynthesisError, SynthesisSettings

logger = logging.getLogger("defectfill")


# ----------------------------------------------------------------------------------------------------
# Arguments and the plan
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
    p.add_argument("--crop_to_mask", action=argparse.BooleanOptionalAction, default=None,
                   help="Generate in a square crop around the mask at full resolution (when the image is larger than "
                        "--resolution) instead of on the whole image resized. Default: the scale the run trained at "
                        "(on when it trained with --defect_crop_probability > 0, off for the paper's whole-image training).")
    p.add_argument("--crop_context", type=float, default=None,
                   help="Context around the mask's box in the crop, as a fraction of its side; default: the run's (0.5).")
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
    if args.num_candidates < 1 or args.batch_size < 1:
        parser.error("--num_candidates and --batch_size must be >= 1")
    return args


@dataclass(frozen=True)
class Plan:
    """Everything this run of the CLI uses, resolved once from the flags and the training run."""

    lora: str
    run: rf.RunRecord | None
    base_model: str
    token: str
    object_class: str | None
    defect_type: str | None
    data_dir: str | None
    split: dict | None
    device: str
    synthesis: SynthesisSettings
    scale_source: str


def training_scale(args, run: rf.RunRecord | None) -> tuple[bool, float, str]:
    """(crop_to_mask, crop_context, where they came from): flags win, then the scale the run trained at;
    a run that records none (trained elsewhere, or before it was recorded) gets the paper's whole image."""
    if run is not None and run.defect_crop_probability is not None:
        crop, context = synthesis.crop_at_training_scale(run.defect_crop_probability, run.crop_context or 0.5)
        source = "the run's training scale"
    else:
        crop, context, source = False, 0.5, "default (the run records no training scale: whole image, as the paper trains)"
    if args.crop_to_mask is not None or args.crop_context is not None:
        source = "flags"
    return (crop if args.crop_to_mask is None else args.crop_to_mask,
            context if args.crop_context is None else args.crop_context, source)


def resolve_plan(args, run: rf.RunRecord | None) -> Plan:
    """Flags win over the run's record."""
    def pick(flag, field):
        return flag if flag is not None else (getattr(run, field) if run is not None else None)

    base = pick(args.pretrained_model_name_or_path, "base_model")
    if base is None:
        raise SynthesisError("--pretrained_model_name_or_path is needed: the run has no defectfill_run.json naming its base model")
    token = pick(args.token, "token") or method.DEFAULT_TOKEN
    object_class = pick(args.object_class, "object_class")
    prompt = args.prompt
    if prompt is None:
        if object_class is None:
            raise SynthesisError("--object_class (or --prompt) is needed: the run has no defectfill_run.json")
        prompt = method.object_prompt(object_class, token)
    crop, context, source = training_scale(args, run)
    settings = SynthesisSettings(
        prompt=prompt, resolution=pick(args.resolution, "resolution") or 512, num_candidates=args.num_candidates,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, seed=args.seed,
        composite=args.composite, crop_to_mask=crop, crop_context=context,
    )
    data_dir = pick(args.data_dir, "data_dir")
    return Plan(args.lora, run, base, token, object_class, pick(args.defect_type, "defect_type"),
                str(data_dir) if data_dir else None, run.split if run else None, synthesis.default_device(args.device),
                settings, source)


# ----------------------------------------------------------------------------------------------------
# Pairs of files
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    index: int
    image_path: Path
    mask_path: Path


def list_images(folder: str | os.PathLike, flag: str) -> list[Path]:
    files = dm.image_files(Path(folder))
    if not files:
        raise SynthesisError(f"{flag} {folder} holds no image files ({', '.join(dm.IMAGE_EXTENSIONS)})")
    return files


def batch_sources(args, plan: Plan) -> tuple[list[Path], list[Path]]:
    """(good images, masks) of batch mode."""
    if args.image_dir:
        goods = list_images(args.image_dir, "--image_dir")
    elif plan.data_dir:
        if plan.object_class is None:
            raise SynthesisError("--object_class is needed to find the good images in --data_dir (the run names none)")
        splits = ("train", "test") if args.good_split == "all" else (args.good_split,)
        goods = dm.list_good_images(plan.data_dir, plan.object_class, splits)
        if not goods:
            raise SynthesisError(f"no good images of {plan.object_class} in {plan.data_dir} ({args.good_split})")
    else:
        raise SynthesisError("batch mode needs --image_dir or --data_dir (or single mode: --image_path and --mask_path)")
    if args.mask_dir:
        masks = list_images(args.mask_dir, "--mask_dir")
    elif plan.data_dir and plan.split:
        masks = dm.list_heldout_masks(plan.data_dir, plan.split, plan.defect_type)
        if not masks:
            raise SynthesisError(f"the run's split holds no held-out mask of {plan.defect_type}: give --mask_dir")
    else:
        raise SynthesisError("no masks: give --mask_dir (the run has no split with held-out masks)")
    return goods, masks


def make_pairs(goods: list[Path], masks: list[Path], num_images: int, pairing: str, seed: int) -> list[Pair]:
    """`num_images` (image, mask) pairs: in order, cycling (round_robin), or drawn with a seed (random)."""
    if pairing == "random":
        rng = random.Random(seed)
        return [Pair(i, rng.choice(goods), rng.choice(masks)) for i in range(num_images)]
    return [Pair(i, image, mask) for i, (image, mask) in enumerate(synthesis.round_robin(goods, masks, num_images))]


def build_pairs(args, plan: Plan) -> list[Pair]:
    if args.image_path:
        return [Pair(0, Path(args.image_path), Path(args.mask_path))]
    goods, masks = batch_sources(args, plan)
    return make_pairs(goods, masks, args.num_images or len(masks), args.pairing, args.seed)


def check_inputs(pairs: list[Pair]) -> None:
    """Decode every image and mask before the first one is generated: a corrupt file or an empty mask is
    named up front, not after part of the output is written."""
    for image_path in dict.fromkeys(p.image_path for p in pairs):
        dm.open_checked(image_path, "image").close()
    for mask_path in dict.fromkeys(p.mask_path for p in pairs):
        with dm.open_checked(mask_path, "mask") as mask:
            synthesis.mask_at_image_size(mask, mask.size, f"mask {mask_path}")  # the core's own empty-mask check


def prepare_pair(pair: Pair, settings: SynthesisSettings) -> synthesis.Job:
    with Image.open(pair.image_path) as image, Image.open(pair.mask_path) as mask:
        return synthesis.prepare_job(image, mask, pair.index, settings, mask_name=f"mask {pair.mask_path}")


# ----------------------------------------------------------------------------------------------------
# Output folder
# ----------------------------------------------------------------------------------------------------


def synthesize_to_folder(pipeline, pairs: list[Pair], plan: Plan, scorer, output_dir: Path, batch_size: int,
                         save_candidates: bool = False) -> dict[str, dict]:
    """Generate, select and save every pair not already done; returns all metadata rows."""
    from tqdm.auto import tqdm

    rows = rf.read_metadata(output_dir)
    todo = [p for p in pairs if rf.output_names(p.index)[0] not in rows]
    if len(todo) < len(pairs):
        logger.info("resuming: %d of %d outputs already exist", len(pairs) - len(todo), len(pairs))
    for start in tqdm(range(0, len(todo), batch_size), desc="pairs", unit="batch", disable=not todo):
        batch = todo[start : start + batch_size]
        jobs = [prepare_pair(p, plan.synthesis) for p in batch]
        done = [rf.save_synthesis_result(output_dir, pair.index, result.image, result.job.mask,
                                         synthesis.output_metadata_row(result, pair.image_path, pair.mask_path, plan.synthesis,
                                                                       plan.object_class, plan.defect_type),
                                         result.candidates if save_candidates else None)
                for pair, result in zip(batch, synthesis.synthesize(pipeline, jobs, plan.synthesis, scorer))]
        rows = rf.add_metadata_rows(output_dir, done)
    return rows


# The settings that decide what an output image is: a folder resumes only when they match.
FINGERPRINT_FIELDS = ("lora", "pretrained_model_name_or_path", "prompt", "resolution", "num_candidates", "num_inference_steps",
                      "guidance_scale", "seed", "composite", "crop_to_mask", "crop_context")


def differing_settings(old: rf.SynthesisRecord, new: rf.SynthesisRecord) -> list[str]:
    return [f"{name}: {getattr(old, name)!r} -> {getattr(new, name)!r}" for name in FINGERPRINT_FIELDS
            if getattr(old, name) != getattr(new, name)]


def prepare_output_dir(output_dir: Path, record: rf.SynthesisRecord, overwrite: bool, check_only: bool = False) -> None:
    """Resume a folder made with the same settings; refuse one made with others (or wipe it with --overwrite);
    then record the settings before the first image, so a killed run is resumed on the same terms. With
    `check_only`, only the refusal (before anything is loaded)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise SynthesisError(f"--output_dir {output_dir} exists and is not a folder")
    if check_only and not output_dir.exists():
        return
    with rf.folder_lock(output_dir):
        old = rf.SynthesisRecord.read(output_dir)
        has_outputs = bool(rf.read_metadata(output_dir)) or any((output_dir / "images").glob("*.png"))
        changes = differing_settings(old, record) if old else (["(no synthesis.json)"] if has_outputs else [])
        if changes and not overwrite:
            raise SynthesisError(f"--output_dir {output_dir} holds images made with other settings ({'; '.join(changes)}); "
                                 "choose another --output_dir, or --overwrite to delete them")
        if check_only:
            return
        if changes:
            logger.info("--overwrite: deleting the earlier outputs in %s", output_dir)
            for name in ("images", "masks", "candidates"):
                shutil.rmtree(output_dir / name, ignore_errors=True)
            for name in (rf.METADATA_FILENAME, rf.PREVIEW_FILENAME, rf.SYNTHESIS_FILENAME):
                (output_dir / name).unlink(missing_ok=True)
        record.write(output_dir)


def synthesis_record(plan: Plan) -> rf.SynthesisRecord:
    s = plan.synthesis
    return rf.SynthesisRecord(
        pretrained_model_name_or_path=plan.base_model, prompt=s.prompt, resolution=s.resolution, lora=plan.lora,
        token=plan.token, object_class=plan.object_class, defect_type=plan.defect_type, num_candidates=s.num_candidates,
        num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale, seed=s.seed, composite=s.composite,
        crop_to_mask=s.crop_to_mask, crop_context=s.crop_context, data_dir=plan.data_dir, split=plan.split,
        scale_source=plan.scale_source,
    )


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace, scorer: synthesis.Scorer | None = None) -> Path:
    """Run the synthesis; `scorer` replaces the LPIPS scorer (tests, or another similarity)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        run = rf.read_run(args.lora)
    except rf.RunFileError as error:
        raise SynthesisError(str(error)) from error
    plan = resolve_plan(args, run)
    logger.info("scale: %s (crop_to_mask=%s, crop_context=%s)", plan.scale_source, plan.synthesis.crop_to_mask,
                plan.synthesis.crop_context)
    pairs = build_pairs(args, plan)
    output_dir = Path(args.output_dir)
    record = synthesis_record(plan)
    prepare_output_dir(output_dir, record, args.overwrite, check_only=True)  # before any model loads
    check_inputs(pairs)
    if scorer is None and plan.synthesis.num_candidates > 1:
        scorer = synthesis.LpipsModel(args.lpips_net, plan.device).masked_scores
    pipeline = synthesis.load_pipeline(plan.base_model, plan.lora, run.base_model if run else None, args.revision, args.variant,
                                       synthesis.precision_dtype(args.mixed_precision), plan.device, args.scheduler)
    prepare_output_dir(output_dir, record, args.overwrite)
    rows = synthesize_to_folder(pipeline, pairs, plan, scorer, output_dir, args.batch_size, args.save_candidates)
    rf.save_preview(output_dir, rows)
    logger.info("%d images in %s", len(rows), output_dir)
    if args.push_to_hub:
        try:
            repo_id = rf.upload_folder_to_hub(output_dir, args.hub_dataset_id, args.hub_token, repo_type="dataset",
                                              commit_message="DefectFill synthetic defects")
        except Exception as error:  # offline, bad token, no write access: the images are safe on disk
            raise SynthesisError(f"the images are saved in {output_dir}, but pushing them to the Hub failed: {error}") from error
        logger.info("pushed to https://huggingface.co/datasets/%s", repo_id)
    return output_dir


if __name__ == "__main__":
    try:
        main(parse_args())
    except (SynthesisError, dm.DatasetError, rf.RunFileError) as error:
        raise SystemExit(f"error: {error}") from None
