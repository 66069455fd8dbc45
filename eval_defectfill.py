#!/usr/bin/env python
"""Evaluate synthetic defects as the defect-generation literature does: KID against the real held-out
defect images of the same type, and IC-LPIPS (diversity), per defect type and on average.

    python eval_defectfill.py --generated synthetic/bottle-broken_large synthetic/bottle-contamination

Each folder is an output of `infer_defectfill.py`; its `synthesis.json` names the data folder and the
few-shot split, whose held-out images are the real references (`--real_dir` overrides for one folder).

- KID: torchmetrics' `KernelInceptionDistance` (Inception-v3 pool features, polynomial kernel, unbiased
  MMD^2 over random subsets). The peers' protocol is DFMGAN's (StyleGAN2-ADA's `compute_kid`: 100 subsets
  of min(real, generated, 1000) images; AnomalyDiffusion and DualAnoDiff ship no KID script and report
  theirs "following DFMGAN"): `--kid_subsets 100`, `--kid_max_subset_size 1000`; the output states both.
  Printed as KID x 1000 (`--kid_scale`); the JSON has the raw value too.
- IC-LPIPS as DFMGAN defines it (`metrics/lpips.py`): each generated image joins the cluster of its
  nearest **few-shot training** image (LPIPS, AlexNet); per cluster, the mean pairwise LPIPS of its members
  (at most 200; a cluster of fewer than two counts 0); reported both as the average over all training
  images (`ic_lpips`, DFMGAN's headline figure) and over the non-zero clusters only (`ic_lpips_nonzero`).
  Higher is more diverse.

Papers generate about 1000 images per defect type for these figures; with fewer, both move a lot between
runs, and the script warns.

The feature extractors' weights are downloaded by torchmetrics / lpips on first use; offline, the error
says which file is missing. The figures are computed by `defectfill.evaluation`.
"""

from __future__ import annotations

import argparse
from typing import Callable, Sequence

import torch

from defectfill.cli import check_minimums, parse_args_with_config, run_main, settings_from_args
from defectfill.evaluation import EvalSettings, run_evaluation


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="KID and IC-LPIPS of DefectFill synthetic defects.")
    p.add_argument("--generated", nargs="+", default=None, help="Output folders of infer_defectfill.py, one per defect type. Required.")
    p.add_argument("--real_dir", default=None,
                   help="Folder of real held-out defect images, KID's reference (only with a single --generated folder).")
    p.add_argument("--train_dir", default=None,
                   help="Folder of the few-shot training images, IC-LPIPS's cluster centres (only with a single --generated folder).")
    p.add_argument("--image_size", type=int, default=256, help="Images are resized to this square size before the metrics.")
    p.add_argument("--kid_subsets", type=int, default=100, help="Random subsets KID averages over (DFMGAN: 100).")
    p.add_argument("--kid_max_subset_size", type=int, default=1000,
                   help="Largest KID subset; the subset is min(real, generated, this) images (DFMGAN: 1000).")
    p.add_argument("--kid_scale", type=float, default=1000.0, help="Scale KID is printed at (papers print x100 or x1000).")
    p.add_argument("--lpips_net", default="alex", choices=("alex", "vgg", "squeeze"), help="LPIPS backbone for IC-LPIPS.")
    p.add_argument("--device", default=None, help="torch device; default: cuda if available.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the KID subsets.")
    p.add_argument("--output_json", default=None, help="Where to write the results; default: eval_results.json beside the first folder.")
    return p


def parse_args(input_args: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_args_with_config(parser, input_args, required=("generated",))
    if (args.real_dir or args.train_dir) and len(args.generated) > 1:
        parser.error("--real_dir and --train_dir apply to a single --generated folder")
    check_minimums(parser, args, {"image_size": 1, "kid_subsets": 1, "kid_max_subset_size": 2})
    return args


def main(args: argparse.Namespace, feature: int | torch.nn.Module = 2048, distance: Callable | None = None) -> list[dict]:
    """`feature` and `distance` replace Inception and LPIPS (tests, or other extractors)."""
    return run_evaluation(settings_from_args(EvalSettings, args), feature, distance)


if __name__ == "__main__":
    run_main(main, parse_args)
