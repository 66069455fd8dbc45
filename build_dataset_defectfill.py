#!/usr/bin/env python
"""Build a synthetic inspection dataset for a whole class: every defect type, many images each, new mask
shapes, sometimes several defects in one image, exact labels, on every process `accelerate launch` starts.

    python build_dataset_defectfill.py --lora runs/metal_nut --num_images 50 --output_dir synthetic/metal_nut \
        --mask_from train --defects_per_image 1:0.8,2:0.2 --export mvtec
    accelerate launch build_dataset_defectfill.py ...   # the same images, split across the processes

`--lora` is the folder `train_defectfill.py --defect_type all` writes (one run per defect type) or several
run folders. Each run is loaded once as a named adapter of one pipeline; a defect is painted with its own
adapter active, a second defect on the first one's result. The steps are `defectfill.build` (the runs and
items, the masks from `defectfill.build.augment`, painting through `defectfill.painting`, the summary and
the MVTec export); the output folder is what `infer_defectfill.py` writes (images/, masks/, metadata.jsonl,
synthesis.json, preview.png; `dataset_mvtec.load_synthetic` reads it) plus one mask per defect
(defect_masks/), a semantic mask (semantic/, pixel value = the defect type's index in synthesis.json),
build.json (what was built, to resume) and build_summary.json; `--export mvtec` adds the MVTec AD layout
(in `<output_dir>-mvtec` by default).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

from defectfill.build.builder import build_dataset
from defectfill.build.plan import parse_defects_per_image
from defectfill.build.settings import BuildSettings
from defectfill.cli import (
    add_hub_arguments,
    add_layout_argument,
    add_model_arguments,
    check_minimums,
    parse_args_with_config,
    run_main,
    settings_from_args,
)
from defectfill.errors import DefectFillError
from defectfill.masks import SPLIT_MASK_SOURCES, mask_origin
from defectfill.painting import Scorer

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

    p.add_argument("--data_dir", default=None,
                   help="The dataset folder, any layout of docs/data.md (good images, the real masks); default: the runs'.")
    add_layout_argument(p, "the layout the runs' split recorded, else detected")
    p.add_argument("--image_dir", default=None, help="A folder of defect-free images to paint on instead of the class's good images.")
    p.add_argument("--good_split", default="train", choices=("train", "test", "all"), help="Which MVTec good images to paint on.")
    p.add_argument("--num_images", type=int, default=10, help="Images per defect type (the type painted first).")

    masks = p.add_argument_group("masks")
    masks.add_argument("--mask_from", default=None, choices=SPLIT_MASK_SOURCES,
                       help="Which real masks of each run's few-shot split the defects are painted in: train (the default: "
                            "a training set for a detector then holds no shape or position of its test defects) or heldout "
                            "(the test set's masks; for looking at the generator, not for training a detector: "
                            "downstream_defectfill.py refuses such a set unless --allow_test_leak). Recorded as mask_from.")
    masks.add_argument("--mask_dir", default=None,
                       help="A folder of user-drawn masks instead of the split's (<DIR>/<defect_type>/*.png, or <DIR>/*.png "
                            "for every type); recorded as mask_from: dir. Not with --mask_from.")
    masks.add_argument("--mask_augment", action=argparse.BooleanOptionalAction, default=True,
                       help="Draw new masks from the real ones (flips, rotation, scale, elastic warp, a new position on the "
                            "object: the --mask_* options below); --no-mask_augment uses the masks as they are.")
    masks.add_argument("--mask_max_rotation", type=float, default=180.0, help="--mask_augment: rotation in degrees, uniform in [-x, x].")
    masks.add_argument("--mask_scale", type=float, nargs=2, default=(0.75, 1.25), metavar=("MIN", "MAX"),
                       help="--mask_augment: scale range.")
    masks.add_argument("--mask_elastic", type=float, default=0.04,
                       help="--mask_augment: elastic warp, as a fraction of the mask's size (0 = off).")
    masks.add_argument("--mask_flip", action=argparse.BooleanOptionalAction, default=True,
                       help="--mask_augment: random horizontal/vertical flips.")
    masks.add_argument("--mask_jitter", type=float, default=None,
                       help="--mask_augment: keep each new mask within this fraction of the image side of where its real mask was "
                            "(position-bound defects); default: anywhere on the object.")
    masks.add_argument("--mask_attempts", type=int, default=50, help="--mask_augment: masks drawn per defect before the defect is skipped.")
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

    out = p.add_argument_group("output")
    out.add_argument("--output_dir", default="defectfill-dataset", help="Output folder (imagefolder layout).")
    out.add_argument("--save_candidates", action="store_true", help="Also keep every candidate (candidates/).")
    out.add_argument("--export", default="none", choices=("none", "mvtec"),
                     help="mvtec: also write the MVTec AD layout (<class>/test/<defect>/NNN.png, ground_truth/...).")
    out.add_argument("--export_dir", default=None,
                     help="Where --export writes; default: <output_dir>-mvtec beside the output folder (inside it, "
                          "imagefolder would read test/ as a split).")
    out.add_argument("--export_good", default="copy", choices=("copy", "symlink", "none"),
                     help="How --export brings the good images (train/good, test/good).")
    add_hub_arguments(p, "--hub_dataset_id", "the built folder as a datasets dataset repo (images, masks, metadata.jsonl) "
                      "with a dataset card (README.md) saying how it was made")
    return p


def parse_args(input_args: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_args_with_config(parser, input_args, required=("lora",))
    check_minimums(parser, args, {"num_images": 1, "num_candidates": 1, "batch_size": 1, "num_inference_steps": 1,
                                  "max_redraws": 0, "mask_attempts": 1, "resolution": 1})
    if not 0 < args.mask_scale[0] <= args.mask_scale[1]:
        parser.error("--mask_scale MIN MAX needs 0 < MIN <= MAX")
    if not 0 <= args.min_on_object <= 1:
        parser.error("--min_on_object is a fraction in [0, 1]")
    try:
        parse_defects_per_image(args.defects_per_image)
        args.mask_from = mask_origin(args.mask_from, args.mask_dir)
    except (DefectFillError, ValueError) as error:
        parser.error(str(error))
    return args


def main(args: argparse.Namespace, scorer: Scorer | None = None) -> Path:
    """Build the dataset (on this process's share of the items under `accelerate launch`); `scorer` replaces
    the LPIPS scorer (tests)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return build_dataset(settings_from_args(BuildSettings, args), scorer, args.hub_token)


if __name__ == "__main__":
    run_main(main, parse_args)
