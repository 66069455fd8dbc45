#!/usr/bin/env python
"""Evaluate synthetic defects as the defect-generation literature does: KID against the real held-out
defect images of the same type, and IC-LPIPS (diversity), per defect type and on average.

    python eval_defectfill.py --generated synthetic/bottle-broken_large synthetic/bottle-contamination

Each folder is an output of `infer_defectfill.py`; its `synthesis.json` names the data folder and the
few-shot split, whose held-out images are the real references (`--real_dir` overrides for one folder).

- KID: torchmetrics' `KernelInceptionDistance` (Inception-v3 pool features, polynomial kernel, unbiased
  MMD^2 over random subsets). Printed as KID x 1000 (`--kid_scale`); the JSON has the raw value too.
- IC-LPIPS (DFMGAN, AnomalyDiffusion, DualAnoDiff): each generated image joins the cluster of its
  nearest real image (LPIPS); the mean pairwise LPIPS inside each cluster, averaged over the clusters
  with at least two members. Higher is more diverse.

The feature extractors' weights are downloaded by torchmetrics / lpips on first use; offline, the error
says which file is missing.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

import dataset_mvtec as dm
from cli_config import parse_args_with_config
from fileio import write_json_atomic
import run_files as rf
from synthesis import LpipsModel, SynthesisError, default_device


class EvaluationError(ValueError):
    """Bad evaluation input; the message names the folder or file."""


def load_images(paths: Sequence[Path], size: int) -> torch.Tensor:
    """uint8 (N, 3, size, size) tensor of RGB images resized (bicubic)."""
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC)) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def kid_score(real: torch.Tensor, fake: torch.Tensor, feature: int | torch.nn.Module = 2048, subsets: int = 100,
              seed: int = 0) -> tuple[float, float]:
    """(mean, std) of KID between uint8 image batches, subsets as large as the smaller set allows."""
    from torchmetrics.image.kid import KernelInceptionDistance

    subset_size = min(len(real), len(fake), 1000)
    if subset_size < 2:
        raise EvaluationError(f"KID needs at least 2 real and 2 generated images, got {len(real)} and {len(fake)}")
    try:
        metric = KernelInceptionDistance(feature=feature, subsets=subsets, subset_size=subset_size)
    except Exception as error:
        raise EvaluationError(f"the Inception weights for KID could not be loaded ({error}); run once with network "
                              "access so torch-fidelity can cache them") from error
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        metric.update(real, real=True)
        metric.update(fake, real=False)
        mean, std = metric.compute()
    return float(mean), float(std)


def ic_lpips(generated: torch.Tensor, real: torch.Tensor, distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
    """IC-LPIPS of generated images (N, 3, H, W) in [-1, 1] against real cluster centres (M, 3, H, W).
    `distance(a, b)` gives the LPIPS of paired batches, shape (K,). NaN when no cluster has two members."""
    to_real = torch.stack([distance(g[None].expand_as(real), real) for g in generated])  # (N, M)
    clusters = to_real.argmin(dim=1)
    means = []
    for centre in clusters.unique():
        members = (clusters == centre).nonzero().flatten().tolist()
        if len(members) < 2:
            continue
        pairs = list(itertools.combinations(members, 2))
        a = generated[[i for i, _ in pairs]]
        b = generated[[j for _, j in pairs]]
        means.append(distance(a, b).mean().item())
    return float(np.mean(means)) if means else float("nan")


def to_signed(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) to float in [-1, 1], the range LPIPS takes."""
    return images.float() / 127.5 - 1


def real_images_of(folder: Path, record: rf.SynthesisRecord | None, real_dir: str | None) -> list[Path]:
    if real_dir:
        return dm.image_files(Path(real_dir))
    split, data_dir = (record.split, record.data_dir) if record else (None, None)
    defect = record.defect_type if record else None
    if not split or not data_dir or defect not in split.get("defect_types", {}):
        raise EvaluationError(f"{folder / rf.SYNTHESIS_FILENAME} names no data folder and split with held-out images of "
                              f"{defect!r}; give --real_dir")
    return [Path(data_dir) / p for p in split["defect_types"][defect]["heldout"]]


def generated_images_of(folder: Path) -> list[Path]:
    if not (folder / rf.METADATA_FILENAME).is_file():
        raise EvaluationError(f"{folder} has no {rf.METADATA_FILENAME}: is it an output folder of infer_defectfill.py?")
    return [folder / name for name in sorted(rf.read_metadata(folder, require_files=False))]


def evaluate_folder(folder: Path, args, feature, distance) -> dict:
    record = rf.SynthesisRecord.read(folder)
    real_paths, fake_paths = real_images_of(folder, record, args.real_dir), generated_images_of(folder)
    real, fake = load_images(real_paths, args.image_size), load_images(fake_paths, args.image_size)
    kid_mean, kid_std = kid_score(real, fake, feature, args.kid_subsets, args.seed)
    return {
        "folder": str(folder), "object_class": record.object_class if record else None,
        "defect_type": (record.defect_type if record else None) or folder.name,
        "num_generated": len(fake_paths), "num_real": len(real_paths), "kid": kid_mean, "kid_std": kid_std,
        f"kid_x{args.kid_scale:g}": kid_mean * args.kid_scale, "ic_lpips": ic_lpips(to_signed(fake), to_signed(real), distance),
    }


def format_table(results: list[dict], scale: float) -> str:
    header = f"| defect type | generated | real | KID x{scale:g} | IC-LPIPS |"
    lines = [header, "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['defect_type']} | {r['num_generated']} | {r['num_real']} | {r['kid'] * scale:.2f} | {r['ic_lpips']:.3f} |")
    kid_mean = np.mean([r["kid"] for r in results]) * scale
    ic_mean = np.nanmean([r["ic_lpips"] for r in results]) if any(np.isfinite(r["ic_lpips"]) for r in results) else float("nan")
    lines.append(f"| **mean** | | | {kid_mean:.2f} | {ic_mean:.3f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="KID and IC-LPIPS of DefectFill synthetic defects.")
    p.add_argument("--generated", nargs="+", default=None, help="Output folders of infer_defectfill.py, one per defect type. Required.")
    p.add_argument("--real_dir", default=None, help="Folder of real defect images (only with a single --generated folder).")
    p.add_argument("--image_size", type=int, default=256, help="Images are resized to this square size before the metrics.")
    p.add_argument("--kid_subsets", type=int, default=100, help="Random subsets KID averages over.")
    p.add_argument("--kid_scale", type=float, default=1000.0, help="Scale KID is printed at (papers print x100 or x1000).")
    p.add_argument("--lpips_net", default="alex", choices=("alex", "vgg", "squeeze"), help="LPIPS backbone for IC-LPIPS.")
    p.add_argument("--device", default=None, help="torch device; default: cuda if available.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the KID subsets.")
    p.add_argument("--output_json", default=None, help="Where to write the results; default: eval_results.json beside the first folder.")
    return p


def parse_args(input_args: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_args_with_config(parser, input_args, required=("generated",))
    if args.real_dir and len(args.generated) > 1:
        parser.error("--real_dir applies to a single --generated folder")
    return args


def main(args: argparse.Namespace, feature: int | torch.nn.Module = 2048, distance: Callable | None = None) -> list[dict]:
    """`feature` and `distance` replace Inception and LPIPS (tests, or other extractors)."""
    device = default_device(args.device)
    distance = distance or LpipsModel(args.lpips_net, device).distance
    results = [evaluate_folder(Path(folder), args, feature, distance) for folder in args.generated]
    print(format_table(results, args.kid_scale))
    output = Path(args.output_json) if args.output_json else Path(args.generated[0]).parent / "eval_results.json"
    write_json_atomic(output, {"kid_scale": args.kid_scale, "results": results})
    return results


if __name__ == "__main__":
    try:
        main(parse_args())
    except (EvaluationError, SynthesisError, dm.DatasetError, rf.RunFileError) as error:
        raise SystemExit(f"error: {error}") from None
