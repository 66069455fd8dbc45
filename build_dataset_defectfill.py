#!/usr/bin/env python
"""Build a synthetic inspection dataset for a whole class: every defect type, many images each, new mask
shapes, sometimes several defects in one image, exact labels, on every process `accelerate launch` starts.

    python build_dataset_defectfill.py --lora runs/metal_nut --num_images 50 --output_dir synthetic/metal_nut \
        --mask_source augment --defects_per_image 1:0.8,2:0.2 --export mvtec
    accelerate launch build_dataset_defectfill.py ...   # the same images, split across the processes

`--lora` is the folder `train_defectfill.py --defect_type all` writes (one run per defect type) or several
run folders. Each run is loaded once as a named adapter of one pipeline; a defect is painted with its own
adapter active, a second defect on the first one's result. The generation is `synthesis.py`; the masks
come from `mask_augment.py`; the output folder is what `infer_defectfill.py` writes (images/, masks/,
metadata.jsonl, synthesis.json, preview.png; `dataset_mvtec.load_synthetic` reads it) plus one mask per
defect (defect_masks/), a semantic mask (semantic/, pixel value = the defect type's index in synthesis.json),
build.json (what was built, to resume) and build_summary.json; `--export mvtec` adds the MVTec AD layout
(in `<output_dir>-mvtec` by default).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

import dataset_mvtec as dm
import defectfill_method as method
import mask_augment as ma
import run_files as rf
import synthesis
from cli_config import add_model_arguments, parse_args_with_config
from fileio import save_image_atomic, write_json_atomic
from synthesis import SynthesisError, SynthesisSettings

logger = logging.getLogger("defectfill")

BUILD_FILENAME = "build.json"
SUMMARY_FILENAME = "build_summary.json"
SKIPPED_FILENAME = "skipped.json"
BUILD_VERSION = 1
COMBINED = "combined"  # MVTec AD's name for images with several defect types
MAX_DEFECTS_PER_IMAGE = 8  # a defect's job index is item * 8 + slot (its own candidate seeds)
OUTPUT_FOLDERS = ("images", "masks", "defect_masks", "semantic", "candidates")


class BuildError(ValueError):
    """Bad builder input; the message names the flag, folder or file."""


# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="DefectFill: build a synthetic inspection dataset for a whole class.")
    p.add_argument("--lora", nargs="+", default=None,
                   help="Training runs: the folder train_defectfill.py --defect_type all writes (one run per defect type), "
                        "and/or single run folders or Hub repo ids. Required.")
    add_model_arguments(p, "Base inpainting model; default: the runs' base_model (all runs must share it).")
    p.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"), help="Inference dtype (fp16/bf16 on a GPU).")
    p.add_argument("--device", default=None, help="torch device; default: this process's accelerator device, else cuda/cpu.")
    p.add_argument("--scheduler", default=None, help="A diffusers scheduler class name; default: the base model's.")
    p.add_argument("--defect_types", nargs="+", default=None, help="Only these defect types of the runs; default: all.")
    p.add_argument("--resolution", type=int, default=None, help="Generation resolution; default: the runs' training resolution.")

    p.add_argument("--data_dir", default=None, help="MVTec AD root (good images, held-out masks); default: the runs'.")
    p.add_argument("--image_dir", default=None, help="A folder of defect-free images to paint on instead of the class's good images.")
    p.add_argument("--good_split", default="train", choices=("train", "test", "all"), help="Which MVTec good images to paint on.")
    p.add_argument("--num_images", type=int, default=10, help="Images per defect type (the type painted first).")

    masks = p.add_argument_group("masks")
    masks.add_argument("--mask_source", default="augment",
                       help="heldout: the runs' held-out real masks as they are; augment: new masks drawn from them; "
                            "or a folder of user-drawn masks (<DIR>/<defect_type>/*.png, or <DIR>/*.png for every type).")
    masks.add_argument("--mask_max_rotation", type=float, default=180.0, help="augment: rotation in degrees, uniform in [-x, x].")
    masks.add_argument("--mask_scale", type=float, nargs=2, default=(0.75, 1.25), metavar=("MIN", "MAX"), help="augment: scale range.")
    masks.add_argument("--mask_elastic", type=float, default=0.04, help="augment: elastic warp, as a fraction of the mask's size (0 = off).")
    masks.add_argument("--mask_flip", action=argparse.BooleanOptionalAction, default=True, help="augment: random horizontal/vertical flips.")
    masks.add_argument("--mask_jitter", type=float, default=None,
                       help="augment: keep each new mask within this fraction of the image side of where its real mask was "
                            "(position-bound defects); default: anywhere on the object.")
    masks.add_argument("--mask_attempts", type=int, default=50, help="augment: masks drawn per defect before the defect is skipped.")
    masks.add_argument("--foreground_dir", default=None,
                       help="Object masks of the good images (same relative path or file stem, optionally _mask); default: "
                            "estimated from each good image (mask_augment.estimate_foreground).")
    masks.add_argument("--object_type", default="auto", choices=("auto", "object", "texture"),
                       help="texture: the whole image is the object (no foreground test). auto: texture for MVTec's texture "
                            "classes, else the foreground test.")
    masks.add_argument("--min_on_object", type=float, default=0.9, help="Fraction of a new mask that must lie on the object.")
    masks.add_argument("--defects_per_image", default="1",
                       help="Defects per image: K, or a distribution 'K:p,K:p' (e.g. 1:0.8,2:0.2). Later defects are other "
                            "defect types where there are any, never overlapping the earlier ones.")

    gen = p.add_argument_group("generation")
    gen.add_argument("--num_candidates", type=int, default=8, help="Candidates per defect; the highest LPIPS inside the mask is kept.")
    gen.add_argument("--min_lpips", type=float, default=0.0,
                     help="Reject a kept candidate whose LPIPS inside the mask is below this and draw new candidates with the "
                          "next seeds (0 = off).")
    gen.add_argument("--max_redraws", type=int, default=2, help="Redraws of a weak defect before it is rejected (counted).")
    gen.add_argument("--batch_size", type=int, default=4, help="Images per pipeline call (each with all its candidates).")
    gen.add_argument("--num_inference_steps", type=int, default=50, help="Denoising steps.")
    gen.add_argument("--guidance_scale", type=float, default=7.5, help="Classifier-free guidance scale.")
    gen.add_argument("--seed", type=int, default=0, help="Seed; the same seed gives the same dataset on any number of processes.")
    gen.add_argument("--crop_to_mask", action=argparse.BooleanOptionalAction, default=None,
                     help="Generate in a crop around each mask at full resolution; default: each run's training scale.")
    gen.add_argument("--crop_context", type=float, default=None, help="Context around the mask in the crop; default: the run's.")
    gen.add_argument("--lpips_net", default="alex", choices=("alex", "vgg", "squeeze"), help="LPIPS backbone.")
    gen.add_argument("--lpips_random_backbone", action="store_true",
                     help="LPIPS with a random backbone: offline tests and benchmarks only, never for a real dataset.")

    out = p.add_argument_group("output")
    out.add_argument("--output_dir", default="defectfill-dataset", help="Output folder (imagefolder layout).")
    out.add_argument("--save_candidates", action="store_true", help="Also keep every candidate (candidates/).")
    out.add_argument("--export", default="none", choices=("none", "mvtec"),
                     help="mvtec: also write the MVTec AD layout (<class>/test/<defect>/NNN.png, ground_truth/...).")
    out.add_argument("--export_dir", default=None, help="Where --export writes; default: <output_dir>-mvtec beside the output folder (inside it, "
                          "imagefolder would read test/ as a split).")
    out.add_argument("--export_good", default="copy", choices=("copy", "symlink", "none"),
                     help="How --export brings the good images (train/good, test/good).")
    out.add_argument("--preview_rows", type=int, default=8, help="Rows of preview.png (clean | mask | generated).")
    return p


def parse_defects_per_image(text: str) -> dict[int, float]:
    """'2' -> {2: 1.0}; '1:0.8,2:0.2' -> {1: 0.8, 2: 0.2} (normalised)."""
    try:
        if ":" not in text:
            distribution = {int(text): 1.0}
        else:
            distribution = {int(k): float(v) for k, v in (part.split(":") for part in text.split(","))}
    except ValueError:
        raise BuildError(f"--defects_per_image {text!r}: expected K or K:p,K:p (e.g. 1:0.8,2:0.2)") from None
    if not distribution or any(k < 1 or k > MAX_DEFECTS_PER_IMAGE for k in distribution) or any(v < 0 for v in distribution.values()) \
            or sum(distribution.values()) <= 0:
        raise BuildError(f"--defects_per_image {text!r}: counts 1..{MAX_DEFECTS_PER_IMAGE} with non-negative weights")
    total = sum(distribution.values())
    return {k: v / total for k, v in sorted(distribution.items())}


def parse_args(input_args: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_args_with_config(parser, input_args, required=("lora",))
    if args.num_candidates < 1 or args.batch_size < 1 or args.num_images < 1:
        parser.error("--num_candidates, --batch_size and --num_images must be >= 1")
    if args.max_redraws < 0 or args.mask_attempts < 1:
        parser.error("--max_redraws must be >= 0 and --mask_attempts >= 1")
    if not 0 < args.mask_scale[0] <= args.mask_scale[1]:
        parser.error("--mask_scale MIN MAX needs 0 < MIN <= MAX")
    if not 0 <= args.min_on_object <= 1:
        parser.error("--min_on_object is a fraction in [0, 1]")
    try:
        parse_defects_per_image(args.defects_per_image)
    except BuildError as error:
        parser.error(str(error))
    return args


# ----------------------------------------------------------------------------------------------------
# Runs (one per defect type)
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    defect_type: str
    lora: str
    record: rf.RunRecord


def run_folders(lora: str) -> list[str]:
    """The run(s) a --lora value names: a run folder, a folder of run folders (--defect_type all), or a Hub id."""
    path = Path(lora)
    if not path.exists():
        return [lora]  # a Hub repo id; read_run says when it is not one
    if not path.is_dir():
        raise BuildError(f"--lora {lora} is a file; give a run folder (holding {rf.LORA_FILENAME}) or a folder of them")
    if (path / rf.LORA_FILENAME).is_file():
        return [str(path)]
    found = sorted(str(p) for p in path.iterdir() if p.is_dir() and (p / rf.LORA_FILENAME).is_file())
    if not found:
        raise BuildError(f"--lora {lora} holds no training run: no {rf.LORA_FILENAME} in it or in its subfolders "
                         f"(expected the output folder of train_defectfill.py, e.g. with --defect_type all)")
    return found


def discover_runs(loras: Sequence[str], defect_types: Sequence[str] | None = None) -> list[Run]:
    """Every run of the --lora values, one per defect type, checked to share one base model and one class."""
    runs: list[Run] = []
    for value in loras:
        for folder in run_folders(value):
            try:
                record = rf.read_run(folder)
            except rf.RunFileError as error:
                raise BuildError(str(error)) from error
            if record is None:
                raise BuildError(f"--lora {folder} has no {rf.RUN_FILENAME}: the builder needs the run's defect type, class and split")
            runs.append(Run(record.defect_type, folder, record))
    seen: dict[str, str] = {}
    for run in runs:
        if run.defect_type in seen:
            raise BuildError(f"two runs for defect type {run.defect_type!r}: {seen[run.defect_type]} and {run.lora}; give one")
        seen[run.defect_type] = run.lora
    for what in ("base_model", "object_class"):
        values = {getattr(r.record, what) for r in runs}
        if len(values) > 1:
            listing = "; ".join(f"{r.lora}: {getattr(r.record, what)}" for r in runs)
            raise BuildError(f"the runs mix {what}s ({listing}); one build takes the runs of one {what.replace('_', ' ')}")
    if defect_types:
        missing = sorted(set(defect_types) - set(seen))
        if missing:
            raise BuildError(f"--defect_types {', '.join(missing)}: no run for it; the runs have {', '.join(sorted(seen))}")
        runs = [r for r in runs if r.defect_type in set(defect_types)]
    return sorted(runs, key=lambda r: r.defect_type)


def defect_index_table(runs: Sequence[Run]) -> dict[str, int]:
    """Semantic mask values: 0 is defect-free, the defect types 1..N in name order."""
    return {run.defect_type: i + 1 for i, run in enumerate(runs)}


def run_settings(args, run: Run) -> SynthesisSettings:
    """How this run's defect is generated: the run's prompt and training scale, flags win."""
    record = run.record
    if record.defect_crop_probability is not None:
        crop, context = synthesis.crop_at_training_scale(record.defect_crop_probability, record.crop_context or 0.5)
    else:
        crop, context = False, 0.5
    return SynthesisSettings(
        prompt=method.object_prompt(record.object_class, record.token), resolution=args.resolution or record.resolution,
        num_candidates=args.num_candidates, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        seed=args.seed, composite=True, crop_to_mask=crop if args.crop_to_mask is None else args.crop_to_mask,
        crop_context=context if args.crop_context is None else args.crop_context,
    )


# ----------------------------------------------------------------------------------------------------
# Items: one output image each, with the defect types painted into it
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    index: int
    image_path: Path
    defect_types: tuple[str, ...]


def item_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """The random draws of one item (stream 1: its defect types, 2: its masks): the same on any process."""
    return np.random.default_rng([seed, index, stream])


def make_items(defect_types: Sequence[str], goods: Sequence[Path], num_images: int, per_image: dict[int, float],
               seed: int) -> list[Item]:
    """`num_images` items per defect type, that type painted first; item k paints on good image k (cycled)
    and draws how many defects it gets, and which other types, from its own seed."""
    items = []
    counts, weights = list(per_image), list(per_image.values())
    for t, primary in enumerate(defect_types):
        for i in range(num_images):
            index = t * num_images + i
            rng = item_rng(seed, index, 1)
            k = counts[int(rng.choice(len(counts), p=weights))]
            others = [d for d in defect_types if d != primary] or [primary]
            order = [others[j] for j in rng.permutation(len(others))]
            extra = [order[j % len(order)] for j in range(k - 1)]
            items.append(Item(index, Path(goods[index % len(goods)]), (primary, *extra)))
    return items


def good_images(args, data_dir: str | None, object_class: str) -> list[Path]:
    if args.image_dir:
        goods = dm.image_files(Path(args.image_dir))
        if not goods:
            raise BuildError(f"--image_dir {args.image_dir} holds no image files")
        return goods
    if not data_dir:
        raise BuildError("no good images: give --data_dir (the runs record none) or --image_dir")
    splits = ("train", "test") if args.good_split == "all" else (args.good_split,)
    goods = dm.list_good_images(data_dir, object_class, splits)
    if not goods:
        raise BuildError(f"no good images of {object_class} in {data_dir} ({args.good_split})")
    return goods


# ----------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------


def mask_sources(args, run: Run, data_dir: str | None) -> list[Path]:
    """The mask files a defect type draws from: the run's held-out masks, or the user's folder."""
    if args.mask_source in ("heldout", "augment"):
        if not data_dir:
            raise BuildError(f"--mask_source {args.mask_source} needs --data_dir (the run {run.lora} records none)")
        masks = dm.list_heldout_masks(data_dir, run.record.split, run.defect_type)
        if not masks:
            raise BuildError(f"the split of {run.lora} holds no held-out mask of {run.defect_type}; give --mask_source DIR")
        return masks
    folder = Path(args.mask_source)
    if not folder.is_dir():
        raise BuildError(f"--mask_source {args.mask_source}: not heldout, augment or a folder of masks")
    masks = dm.image_files(folder / run.defect_type) or dm.image_files(folder)
    if not masks:
        raise BuildError(f"--mask_source {folder} holds no mask for {run.defect_type} (expected {folder / run.defect_type}/*.png or {folder}/*.png)")
    return masks


def load_mask_files(paths: Sequence[Path]) -> list[np.ndarray]:
    """Boolean masks; an empty mask file is an error that names it (nothing is generated before)."""
    masks = []
    for path in paths:
        with Image.open(path) as image:
            mask = dm.binarize_mask(image)
        if not mask.any():
            raise BuildError(f"mask {path} is empty (no pixel >= {dm.MASK_THRESHOLD}); remove it or draw the defect")
        masks.append(mask)
    return masks


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A boolean mask at (width, height), nearest; may come out empty (a tiny mask on a smaller image)."""
    if mask.shape[::-1] == tuple(size):
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) >= dm.MASK_THRESHOLD


def visible_at_latent_size(mask: np.ndarray, settings: SynthesisSettings, vae_scale_factor: int) -> bool:
    """Whether the mask keeps a pixel at the UNet's latent size, through the same crop and resize as synthesis."""
    blank = Image.new("RGB", mask.shape[::-1])
    try:
        job = synthesis.prepare_job(blank, mask, 0, settings)
    except SynthesisError:
        return False
    return bool(ma.latent_mask(job.region_mask, vae_scale_factor).any())


def find_foreground_file(folder: Path, image_path: Path, data_dir: str | None, object_class: str) -> Path | None:
    """The object mask of a good image in --foreground_dir: same path relative to the class folder, else same stem."""
    candidates = []
    if data_dir:
        try:
            relative = image_path.relative_to(Path(data_dir) / object_class)
            candidates += [folder / relative, folder / relative.with_name(f"{relative.stem}_mask{relative.suffix}")]
        except ValueError:
            pass
    for ext in dm.IMAGE_EXTENSIONS:
        candidates += [folder / f"{image_path.stem}{ext}", folder / f"{image_path.stem}_mask{ext}"]
    return next((c for c in candidates if c.is_file()), None)


def foreground_of(args, image: Image.Image, image_path: Path, texture: bool, data_dir: str | None,
                  object_class: str) -> np.ndarray | None:
    """Where on the image a defect may go; None for a texture (the whole image)."""
    if texture:
        return None
    if args.foreground_dir:
        path = find_foreground_file(Path(args.foreground_dir), image_path, data_dir, object_class)
        if path is None:
            raise BuildError(f"--foreground_dir {args.foreground_dir} has no object mask for {image_path} "
                             f"(looked for the same relative path or {image_path.stem}[_mask].png)")
        with Image.open(path) as mask_image:
            return resize_mask(dm.binarize_mask(mask_image), image.size)
    return ma.estimate_foreground(image)


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
    rng = item_rng(context.args.seed, item.index, 2)
    augment = context.args.mask_source == "augment"
    foreground = foreground_of(context.args, image, item.image_path, context.texture, context.data_dir,
                               context.object_class) if augment else None
    taken = np.zeros(image.size[::-1], dtype=bool)
    defects, rejected, dropped = [], Counter(), []
    for slot, defect_type in enumerate(item.defect_types):
        sources = [resize_mask(m, image.size) for m in context.masks[defect_type]]
        settings = context.settings[defect_type]
        checks = dict(visible_at_latent=lambda m, s=settings: visible_at_latent_size(m, s, context.vae_scale_factor),
                      avoid=taken if taken.any() else None)
        if augment:
            checks.update(foreground=foreground, min_on_object=context.args.min_on_object)
            mask, source, why = ma.draw_mask(sources, rng, context.augment, context.args.mask_attempts, **checks)
        else:
            start = item.index % context.args.num_images if slot == 0 else int(rng.integers(len(sources)))
            mask, source, why = ma.pick_mask(sources, start % len(sources), **checks)
        rejected.update({f"{defect_type}/{k}": v for k, v in why.items()})
        if mask is None:
            if slot == 0:  # the defect type the item is for: no image without it
                return [], rejected, [defect_type]
            dropped.append(defect_type)
            continue
        defects.append(Defect(defect_type, mask, str(context.mask_paths[defect_type][source]), context.args.mask_source == "augment"))
        taken |= mask
    return defects, rejected, dropped


# ----------------------------------------------------------------------------------------------------
# The build: settings, fingerprint, output folder
# ----------------------------------------------------------------------------------------------------


@dataclass
class BuildContext:
    args: argparse.Namespace
    runs: list[Run]
    index_table: dict[str, int]
    settings: dict[str, SynthesisSettings]
    mask_paths: dict[str, list[Path]]
    masks: dict[str, list[np.ndarray]]
    augment: ma.AugmentSettings
    texture: bool
    data_dir: str | None
    object_class: str
    base_model: str
    vae_scale_factor: int = 8  # read from the pipeline's VAE once it is loaded


def lora_digest(lora: str) -> str:
    """sha256 (first 16 hex digits) of a run's LoRA weights; the Hub id itself for a remote run."""
    path = Path(lora) / rf.LORA_FILENAME
    if not path.is_file():
        return lora
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def build_fingerprint(context: BuildContext, items: Sequence[Item]) -> dict:
    """Everything that decides the output images: a folder built with another fingerprint is another build."""
    a = context.args
    return {
        "base_model": context.base_model, "revision": a.revision, "variant": a.variant, "mixed_precision": a.mixed_precision,
        "scheduler": a.scheduler, "object_class": context.object_class,
        "runs": {r.defect_type: lora_digest(r.lora) for r in context.runs},
        "settings": {d: asdict(s) for d, s in context.settings.items()},
        "mask_source": a.mask_source, "augment": asdict(context.augment) if a.mask_source == "augment" else None,
        "mask_attempts": a.mask_attempts, "foreground_dir": a.foreground_dir, "texture": context.texture,
        "min_on_object": a.min_on_object, "defects_per_image": parse_defects_per_image(a.defects_per_image),
        "min_lpips": a.min_lpips, "max_redraws": a.max_redraws, "lpips_net": a.lpips_net,
        "lpips_random_backbone": a.lpips_random_backbone, "num_images": a.num_images,
        "items": hashlib.sha256(json.dumps([[i.index, str(i.image_path), i.defect_types] for i in items]).encode()).hexdigest()[:16],
    }


def check_output_folder(output_dir: Path, fingerprint: dict) -> None:
    """The folder is empty, or holds this very build (resume); anything else is an error that says what differs."""
    build_file = output_dir / BUILD_FILENAME
    if build_file.is_file():
        try:
            recorded = json.loads(build_file.read_text()).get("fingerprint", {})
        except json.JSONDecodeError as error:
            raise BuildError(f"{build_file} is not JSON ({error}); use another --output_dir") from error
        recorded = json.loads(json.dumps(recorded))
        current = json.loads(json.dumps(fingerprint))
        differing = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
        if differing:
            raise BuildError(f"--output_dir {output_dir} holds a different build (it differs in: {', '.join(differing)}); "
                             f"use a new --output_dir, or the same flags to resume it")
    elif (output_dir / rf.METADATA_FILENAME).is_file() or (output_dir / "images").is_dir():
        raise BuildError(f"--output_dir {output_dir} holds another synthesis (images but no {BUILD_FILENAME}); use a new --output_dir")


def defect_mask_name(index: int, slot: int, defect_type: str) -> str:
    return f"defect_masks/{index:05d}_{slot}_{defect_type}_mask.png"


def semantic_mask_name(index: int) -> str:
    return f"semantic/{index:05d}_semantic.png"


def read_skipped(output_dir: Path) -> dict[str, dict]:
    path = output_dir / SKIPPED_FILENAME
    return json.loads(path.read_text()) if path.is_file() else {}


def add_skipped(output_dir: Path, entries: dict[str, dict]) -> dict[str, dict]:
    """Merge skipped items into skipped.json under the folder lock (several processes)."""
    with rf.folder_lock(output_dir):
        skipped = read_skipped(output_dir)
        skipped.update(entries)
        write_json_atomic(output_dir / SKIPPED_FILENAME, skipped)
        return skipped


def item_of_file(name: str) -> int | None:
    """The item number of an output file (`images/00012.png`, `.00012_mask.png.tmp`: its first 5 digits), None
    for other files."""
    head = Path(name).name.lstrip(".")[:5]
    return int(head) if head.isdigit() else None


def remove_orphans(output_dir: Path, done: set[int]) -> int:
    """Remove every output file of an unfinished item (killed between its files and its metadata row) and
    every temporary file; returns how many were removed."""
    removed = 0
    for folder in OUTPUT_FOLDERS:
        for path in (output_dir / folder).glob("*") if (output_dir / folder).is_dir() else []:
            if path.name.endswith(".tmp") or item_of_file(path.name) not in done:
                path.unlink()
                removed += 1
    for path in output_dir.glob(".*.tmp"):
        path.unlink()
        removed += 1
    return removed


# ----------------------------------------------------------------------------------------------------
# Painting
# ----------------------------------------------------------------------------------------------------


def paint_defects(pipeline, batch: list[tuple[Item, Image.Image, list[Defect]]], context: BuildContext,
                  scorer) -> list[dict]:
    """Paint every item's defects in order, one pipeline call per (slot, defect type) of the batch, redrawing
    weak ones; returns per item {image, results (per slot, None if rejected), rejected candidates}."""
    args = context.args
    states = [{"image": image, "slots": [None] * len(defects), "rejected": []} for _, image, defects in batch]
    for slot in range(max((len(d) for _, _, d in batch), default=0)):
        groups: dict[str, list[int]] = {}
        for i, (_, _, defects) in enumerate(batch):
            if slot < len(defects):
                groups.setdefault(defects[slot].defect_type, []).append(i)
        for defect_type, members in groups.items():
            synthesis.use_adapter(pipeline, defect_type)
            settings = context.settings[defect_type]
            todo, first = list(members), 0
            for draw in range(args.max_redraws + 1):
                jobs = [synthesis.prepare_job(states[i]["image"], batch[i][2][slot].mask, batch[i][0].index * MAX_DEFECTS_PER_IMAGE + slot,
                                              settings) for i in todo]
                results = synthesis.synthesize(pipeline, jobs, settings, scorer, first, score_single=args.min_lpips > 0)
                weak = []
                for i, result in zip(todo, results):
                    score = result.scores[result.chosen]
                    if args.min_lpips > 0 and score < args.min_lpips:
                        states[i]["rejected"].append({"slot": slot, "defect_type": defect_type, "first_candidate": first,
                                                      "num_candidates": settings.num_candidates, "lpips": score})
                        weak.append(i)
                    else:
                        states[i]["slots"][slot] = (result, first)
                todo, first = weak, first + settings.num_candidates
                if not todo:
                    break
            for i in members:
                if states[i]["slots"][slot] is not None:
                    states[i]["image"] = states[i]["slots"][slot][0].image
    return states


def save_item(output_dir: Path, item: Item, defects: list[Defect], state: dict, context: BuildContext,
              rejections: Counter, dropped: list[str], source_size) -> dict:
    """Write one item's masks, then its image last (the done marker); return its metadata row."""
    kept = [(d, s) for d, s in zip(defects, state["slots"]) if s is not None]
    union = np.zeros(source_size[::-1], dtype=bool)
    semantic = np.zeros(source_size[::-1], dtype=np.uint8)
    names = []
    for slot, (defect, _) in enumerate(kept):
        name = defect_mask_name(item.index, slot, defect.defect_type)
        save_image_atomic(Image.fromarray(defect.mask.astype(np.uint8) * 255), output_dir / name)
        names.append(name)
        union |= defect.mask
        semantic[defect.mask] = context.index_table[defect.defect_type]
    save_image_atomic(Image.fromarray(semantic), output_dir / semantic_mask_name(item.index))
    types = [d.defect_type for d, _ in kept]
    row = {
        "source_image": str(item.image_path), "defect_type": types[0] if len(set(types)) == 1 else COMBINED,
        "defect_types": types, "object_class": context.object_class, "num_defects": len(kept),
        "defect_mask_file_names": names, "semantic_mask_file_name": semantic_mask_name(item.index),
        "source_masks": [d.source_mask for d, _ in kept], "augmented": [d.augmented for d, _ in kept],
        "prompts": [context.settings[t].prompt for t in types], "seed": context.args.seed,
        "candidate": [r.chosen + first for _, (r, first) in kept], "lpips": [r.scores[r.chosen] for _, (r, _) in kept],
        "crop_box": [list(r.job.box) for _, (r, _) in kept], "rejected_candidates": state["rejected"],
        "mask_rejections": dict(rejections), "dropped_defects": dropped,
    }
    candidates = [c for _, (r, _) in kept for c in r.candidates] if context.args.save_candidates else None
    return rf.save_synthesis_result(output_dir, item.index, state["image"], union, row, candidates)


def build_batch(pipeline, items: list[Item], context: BuildContext, scorer, output_dir: Path) -> tuple[list[dict], dict]:
    """Draw masks, paint and save a batch of items; returns (metadata rows, skipped entries)."""
    prepared, skipped = [], {}
    for item in items:
        with Image.open(item.image_path) as opened:
            image = opened.convert("RGB")
        defects, rejections, dropped = draw_item_masks(item, image, context)
        if not defects:
            skipped[str(item.index)] = {"reason": "no_mask_fits", "defect_types": list(item.defect_types),
                                        "source_image": str(item.image_path), "mask_rejections": dict(rejections)}
            logger.warning("item %d (%s on %s): no mask fits; skipped (%s)", item.index, item.defect_types[0],
                           item.image_path.name, dict(rejections))
            continue
        prepared.append((item, image, defects, rejections, dropped))
    states = paint_defects(pipeline, [(i, im, d) for i, im, d, _, _ in prepared], context, scorer)
    rows = []
    for (item, image, defects, rejections, dropped), state in zip(prepared, states):
        weak = [d.defect_type for d, s in zip(defects, state["slots"]) if s is None]
        if state["slots"][0] is None:  # the defect the item is for stayed weak after every redraw
            skipped[str(item.index)] = {"reason": "weak_after_redraws", "defect_types": list(item.defect_types),
                                        "source_image": str(item.image_path), "mask_rejections": dict(rejections),
                                        "rejected_candidates": state["rejected"]}
            logger.warning("item %d: every candidate of %s stayed below --min_lpips; skipped", item.index, item.defect_types[0])
            continue
        rows.append(save_item(output_dir, item, defects, state, context, rejections, dropped + weak, image.size))
    return rows, skipped


# ----------------------------------------------------------------------------------------------------
# Summary, preview, MVTec export
# ----------------------------------------------------------------------------------------------------


def summarize(rows: dict[str, dict], skipped: dict[str, dict], context: BuildContext, seconds: float, made: int,
              generation_wall: float | None = None, done_before: set | None = None) -> dict:
    """Images per defect type, masks augmented/rejected and why, candidates rejected, time per kept image:
    wall-clock (whole run, and the generation alone, all processes together) and process time (the sum of
    every process's batch time over the images it kept)."""
    new_rows = [r for name, r in rows.items() if item_of_file(name) not in (done_before or set())]
    process_seconds = sum(r.get("seconds", 0.0) for r in new_rows)
    drawn = sum(sum(r["num_candidates"] for r in row.get("rejected_candidates", [])) + context.args.num_candidates * row["num_defects"]
                for row in new_rows)
    per_type, per_label, reasons = Counter(), Counter(), Counter()
    rejected_candidates = 0
    augmented = 0
    for row in rows.values():
        per_label[row["defect_type"]] += 1
        per_type.update(row["defect_types"])
        augmented += sum(row.get("augmented", []))
        reasons.update(row.get("mask_rejections", {}))
        rejected_candidates += sum(r["num_candidates"] for r in row.get("rejected_candidates", []))
    skip_reasons = Counter()
    for entry in skipped.values():
        skip_reasons[entry["reason"]] += 1
        reasons.update(entry.get("mask_rejections", {}))
        rejected_candidates += sum(r["num_candidates"] for r in entry.get("rejected_candidates", []))
    return {
        "images": len(rows), "images_per_label": dict(sorted(per_label.items())),
        "defects_per_type": dict(sorted(per_type.items())),
        "multi_defect_images": sum(1 for r in rows.values() if r["num_defects"] > 1),
        "masks_augmented": augmented, "masks_rejected": sum(reasons.values()), "masks_rejected_by_reason": dict(sorted(reasons.items())),
        "candidates_rejected": rejected_candidates, "items_skipped": dict(sorted(skip_reasons.items())),
        "images_made_this_run": made, "seconds_this_run": round(seconds, 3),
        "seconds_per_kept_image": round(seconds / made, 4) if made else None,
        "generation_seconds_wall": round(generation_wall, 3) if generation_wall is not None else None,
        "generation_seconds_per_kept_image": round(generation_wall / made, 4) if made and generation_wall is not None else None,
        "process_seconds_per_kept_image": round(process_seconds / made, 4) if made else None,
        "candidates_drawn_per_kept_image": round(drawn / made, 3) if made else None,
    }


def format_summary(summary: dict) -> str:
    lines = [f"{summary['images']} images ({summary['multi_defect_images']} with several defects)"]
    lines += [f"  {label}: {count}" for label, count in summary["images_per_label"].items()]
    lines.append(f"defects per type: {summary['defects_per_type']}")
    lines.append(f"masks augmented: {summary['masks_augmented']}, rejected: {summary['masks_rejected']} {summary['masks_rejected_by_reason']}")
    lines.append(f"candidates rejected (below --min_lpips): {summary['candidates_rejected']}; items skipped: {summary['items_skipped']}")
    if summary["seconds_per_kept_image"] is not None:
        lines.append(f"{summary['images_made_this_run']} images made in {summary['seconds_this_run']:.1f} s "
                     f"({summary['seconds_per_kept_image']:.3f} s per kept image; generation alone "
                     f"{summary['generation_seconds_per_kept_image']:.3f} s wall, {summary['process_seconds_per_kept_image']:.3f} s "
                     f"per process; {summary['candidates_drawn_per_kept_image']:g} candidates drawn per kept image)")
    return "\n".join(lines)


def preview_rows(rows: dict[str, dict], count: int) -> dict[str, dict]:
    """Rows for preview.png spread over the labels (each defect type, then combined), in file order."""
    by_label: dict[str, list[str]] = {}
    for name in sorted(rows):
        by_label.setdefault(rows[name]["defect_type"], []).append(name)
    chosen, round_index = [], 0
    while len(chosen) < min(count, len(rows)):
        for names in by_label.values():
            if round_index < len(names) and len(chosen) < count:
                chosen.append(names[round_index])
        round_index += 1
    return {name: rows[name] for name in chosen}


def default_export_dir(output_dir: Path) -> Path:
    return output_dir.with_name(f"{output_dir.name}-mvtec")


def export_mvtec(output_dir: Path, rows: dict[str, dict], export_dir: Path, object_class: str, data_dir: str | None,
                 image_dir: str | None, good: str) -> Path:
    """The MVTec AD layout: <class>/test/<label>/NNN.png, <class>/ground_truth/<label>/NNN_mask.png (the union
    mask), <class>/train/good and test/good (copied or linked), written beside the target and renamed into
    place (a reader never sees half an export). Returns the class folder."""
    staging = export_dir.with_name(f".{export_dir.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    root = staging / object_class
    numbers: Counter = Counter()
    sources = {}
    for name in sorted(rows):
        row = rows[name]
        label = row["defect_type"]
        number = numbers[label]
        numbers[label] += 1
        image_target = root / "test" / label / f"{number:03d}.png"
        mask_target = root / "ground_truth" / label / f"{number:03d}_mask.png"
        for source, target in ((output_dir / row["file_name"], image_target), (output_dir / row["mask_file_name"], mask_target)):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        sources[f"test/{label}/{number:03d}.png"] = row["file_name"]
    goods: dict[str, list[Path]] = {}
    if image_dir:
        goods["train"] = dm.image_files(Path(image_dir))
    elif data_dir:
        for split in ("train", "test"):
            goods[split] = dm.list_good_images(data_dir, object_class, (split,))
    if good != "none":
        for split, files in goods.items():
            for path in files:
                target = root / split / dm.GOOD / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                if good == "symlink":
                    target.symlink_to(path.resolve())
                else:
                    shutil.copyfile(path, target)
    write_json_atomic(root / "defectfill_export.json", {"source": str(output_dir), "files": sources})
    if export_dir.exists():
        old = export_dir.with_name(f".{export_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(export_dir, old)
        os.replace(staging, export_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        export_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, export_dir)
    return export_dir / object_class


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------


def make_context(args) -> BuildContext:
    runs = discover_runs(args.lora, args.defect_types)
    first = runs[0].record
    base_model = args.pretrained_model_name_or_path or first.base_model
    data_dir = args.data_dir or first.data_dir
    data_dir = str(data_dir) if data_dir else None
    object_class = first.object_class
    mask_paths = {r.defect_type: mask_sources(args, r, data_dir) for r in runs}
    masks = {d: load_mask_files(paths) for d, paths in mask_paths.items()}
    texture = args.object_type == "texture" or (args.object_type == "auto" and ma.is_texture_class(object_class))
    augment = ma.AugmentSettings(flip=args.mask_flip, max_rotation=args.mask_max_rotation, min_scale=args.mask_scale[0],
                                 max_scale=args.mask_scale[1], elastic=args.mask_elastic, jitter=args.mask_jitter)
    return BuildContext(args, runs, defect_index_table(runs), {r.defect_type: run_settings(args, r) for r in runs},
                        mask_paths, masks, augment, texture, data_dir, object_class, base_model)


def write_synthesis_record(output_dir: Path, context: BuildContext) -> None:
    """synthesis.json: the SynthesisRecord fields evaluation reads, plus the defect type index table."""
    first = context.runs[0]
    settings = context.settings[first.defect_type]
    record = rf.SynthesisRecord(
        pretrained_model_name_or_path=context.base_model, prompt=settings.prompt, resolution=settings.resolution,
        lora=",".join(r.lora for r in context.runs), token=first.record.token, object_class=context.object_class,
        defect_type=first.defect_type if len(context.runs) == 1 else None, num_candidates=settings.num_candidates,
        num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale, seed=settings.seed,
        composite=True, crop_to_mask=settings.crop_to_mask, crop_context=settings.crop_context, data_dir=context.data_dir,
        split=first.record.split, scale_source="each run's training scale, unless a flag overrides it",
    )
    payload = record.to_dict()
    payload["defect_type_index"] = {"good": 0, **context.index_table}
    payload["runs"] = {r.defect_type: {"lora": r.lora, "split": r.record.split} for r in context.runs}
    write_json_atomic(output_dir / rf.SYNTHESIS_FILENAME, payload)


def main(args: argparse.Namespace, scorer: synthesis.Scorer | None = None) -> Path:
    """Build the dataset (on this process's share of the items under `accelerate launch`); `scorer` replaces
    the LPIPS scorer (tests)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from tqdm.auto import tqdm

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    started = time.perf_counter()
    # PartialState reads the process group from the launcher's environment; on CPUs (gloo) it must be told.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    context = make_context(args)
    goods = good_images(args, context.data_dir, context.object_class)
    items = make_items([r.defect_type for r in context.runs], goods, args.num_images,
                       parse_defects_per_image(args.defects_per_image), args.seed)
    output_dir = Path(args.output_dir)
    fingerprint = build_fingerprint(context, items)
    check_output_folder(output_dir, fingerprint)  # on every process (read only): an error stops them all
    state.wait_for_everyone()
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        done = {item_of_file(name) for name in rf.read_metadata(output_dir)} | {int(k) for k in read_skipped(output_dir)}
        removed = remove_orphans(output_dir, done)
        if removed:
            logger.info("removed %d files of unfinished items (the run was interrupted)", removed)
        write_json_atomic(output_dir / BUILD_FILENAME, {"version": BUILD_VERSION, "fingerprint": fingerprint})
    state.wait_for_everyone()

    rows = rf.read_metadata(output_dir)
    done = {item_of_file(name) for name in rows} | {int(k) for k in read_skipped(output_dir)}
    if done and state.is_main_process:
        logger.info("resuming: %d of %d items already done", len(done), len(items))
    # Batches are cut from the whole item list, then dealt to the processes: a batch is the same on any
    # number of processes, so every image is too.
    batches = [items[i : i + args.batch_size] for i in range(0, len(items), args.batch_size)]
    mine = [[it for it in b if it.index not in done] for b in batches[state.process_index :: state.num_processes]]
    mine = [b for b in mine if b]
    device = args.device or str(state.device)
    if scorer is None and (args.num_candidates > 1 or args.min_lpips > 0):
        scorer = synthesis.LpipsModel(args.lpips_net, device, pretrained_backbone=not args.lpips_random_backbone).masked_scores
    pipeline = synthesis.load_pipeline(context.base_model, None, None, args.revision, args.variant,
                                       synthesis.precision_dtype(args.mixed_precision), device, args.scheduler)
    synthesis.load_named_adapters(pipeline, {r.defect_type: r.lora for r in context.runs}, context.runs[0].record.base_model,
                                  context.base_model)
    context.vae_scale_factor = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)

    progress = tqdm(total=len(items), initial=len(done), desc="images", unit="img", disable=not state.is_main_process)
    generation_started = time.perf_counter()
    for batch in mine:
        batch_started = time.perf_counter()
        new_rows, new_skipped = build_batch(pipeline, batch, context, scorer, output_dir)
        for row in new_rows:  # which process made it, and its time for the batch shared by the kept images
            row["process"] = state.process_index
            row["seconds"] = round((time.perf_counter() - batch_started) / len(new_rows), 4)
        all_rows = rf.add_metadata_rows(output_dir, new_rows) if new_rows else rf.read_metadata(output_dir)
        all_skipped = add_skipped(output_dir, new_skipped) if new_skipped else read_skipped(output_dir)
        progress.n = len(all_rows) + len(all_skipped)  # every process's items, as the shared files say
        progress.refresh()
    state.wait_for_everyone()
    generation_wall = time.perf_counter() - generation_started
    if not state.is_main_process:
        progress.close()
        return output_dir
    rows, skipped = rf.read_metadata(output_dir), read_skipped(output_dir)
    progress.n = len(rows) + len(skipped)
    progress.close()
    remove_orphans(output_dir, {item_of_file(name) for name in rows})
    write_synthesis_record(output_dir, context)
    rf.save_preview(output_dir, preview_rows(rows, args.preview_rows), max_rows=args.preview_rows)
    made_now = sum(1 for name in rows if item_of_file(name) not in done)  # by every process, this run
    summary = summarize(rows, skipped, context, time.perf_counter() - started, made_now, generation_wall, done)
    write_json_atomic(output_dir / SUMMARY_FILENAME, summary)
    if args.export == "mvtec":
        export_dir = Path(args.export_dir) if args.export_dir else default_export_dir(output_dir)
        class_dir = export_mvtec(output_dir, rows, export_dir, context.object_class, context.data_dir, args.image_dir, args.export_good)
        logger.info("MVTec AD layout in %s", class_dir)
    print(format_summary(summary))
    logger.info("%d images in %s", len(rows), output_dir)
    return output_dir


if __name__ == "__main__":
    try:
        main(parse_args())
    except (BuildError, SynthesisError, dm.DatasetError, rf.RunFileError) as error:
        raise SystemExit(f"error: {error}") from None
