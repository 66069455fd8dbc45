"""The defect-generation literature's figures for synthetic defects: KID against the real held-out defect
images of the same type, and IC-LPIPS (diversity), per synthesis folder (`eval_defectfill.py` prints them).

- KID: torchmetrics' `KernelInceptionDistance` over random subsets of min(real, generated, 1000) images
  (DFMGAN's protocol, which AnomalyDiffusion and DualAnoDiff report).
- IC-LPIPS as DFMGAN defines it: each generated image joins the cluster of its nearest few-shot training image,
  the mean pairwise LPIPS inside each cluster, averaged over all clusters (and over the non-zero ones).
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from defectfill.errors import EvaluationError, SynthesisError
from defectfill.fileio import check_output_folder, write_json_atomic
from defectfill.images import image_files, open_checked
from defectfill.models import default_device
from defectfill.runs.files import METADATA_FILENAME, SYNTHESIS_FILENAME
from defectfill.runs.folder import read_metadata
from defectfill.runs.records import SynthesisRecord


@dataclass(frozen=True)
class EvalSettings:
    """What `eval_defectfill.py` is asked for (field names are its flags' dests)."""

    generated: tuple[str, ...] = ()
    real_dir: str | None = None
    train_dir: str | None = None
    image_size: int = 256
    kid_subsets: int = 100
    kid_max_subset_size: int = 1000
    kid_scale: float = 1000.0
    lpips_net: str = "alex"
    device: str | None = None
    seed: int = 0
    output_json: str | None = None


def load_images(paths: Sequence[Path], size: int) -> torch.Tensor:
    """uint8 (N, 3, size, size) tensor of RGB images resized (bicubic)."""
    arrays = []
    for path in paths:
        with open_checked(Path(path), "image") as image:
            arrays.append(np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC)))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


KID_MIN_IMAGES = 100  # below this many generated or real images, KID varies a lot between seeds: warn
IC_LPIPS_MIN_PER_CLUSTER = 10  # average cluster size under which IC-LPIPS is mostly zeros and noise: warn


def kid_score(real: torch.Tensor, fake: torch.Tensor, feature: int | torch.nn.Module = 2048, subsets: int = 100,
              max_subset_size: int = 1000, seed: int = 0, device: str = "cpu") -> dict:
    """KID between uint8 image batches: {"kid", "kid_std", "kid_subsets", "kid_subset_size"}, with subsets of
    min(len(real), len(fake), max_subset_size) images (DFMGAN's protocol)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    subset_size = min(len(real), len(fake), max_subset_size)
    if subset_size < 2:
        raise EvaluationError(f"KID needs at least 2 real and 2 generated images for a subset, got {len(real)} real and "
                              f"{len(fake)} generated; generate more images (papers use about 1000 per defect type)")
    try:
        metric = KernelInceptionDistance(feature=feature, subsets=subsets, subset_size=subset_size).to(device)
    except Exception as error:
        raise EvaluationError(f"the Inception weights for KID could not be loaded ({error}); run once with network "
                              "access so torch-fidelity can cache them") from error
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        metric.update(real.to(device), real=True)
        metric.update(fake.to(device), real=False)
        mean, std = metric.compute()
    return {"kid": float(mean), "kid_std": float(std), "kid_subsets": subsets, "kid_subset_size": subset_size}


def ic_lpips(generated: torch.Tensor, centres: torch.Tensor, distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             max_cluster_size: int = 200) -> dict:
    """IC-LPIPS (DFMGAN) of generated images (N, 3, H, W) in [-1, 1] clustered to centres (M, 3, H, W), the
    few-shot training images. `distance(a, b)` gives the LPIPS of paired batches, shape (K,). Returns
    {"ic_lpips": mean over all M clusters (a cluster of fewer than two counts 0), "ic_lpips_nonzero": mean
    over the clusters with a non-zero score (NaN when none), "cluster_sizes": members per centre}. A
    cluster keeps its first `max_cluster_size` members, as DFMGAN does."""
    to_centre = torch.stack([distance(g[None].expand_as(centres), centres) for g in generated])  # (N, M)
    nearest = to_centre.argmin(dim=1).tolist()
    members: list[list[int]] = [[] for _ in range(len(centres))]
    for index, centre in enumerate(nearest):
        if len(members[centre]) < max_cluster_size:
            members[centre].append(index)
    scores = []
    for cluster in members:
        if len(cluster) < 2:
            scores.append(0.0)
            continue
        pairs = list(itertools.combinations(cluster, 2))
        scores.append(distance(generated[[i for i, _ in pairs]], generated[[j for _, j in pairs]]).mean().item())
    nonzero = [score for score in scores if score != 0.0]
    return {"ic_lpips": float(np.mean(scores)), "ic_lpips_nonzero": float(np.mean(nonzero)) if nonzero else float("nan"),
            "cluster_sizes": [len(cluster) for cluster in members]}


def to_signed(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) to float in [-1, 1], the range LPIPS takes."""
    return images.float() / 127.5 - 1


def split_images_of(folder: Path, record: SynthesisRecord | None, part: str) -> list[Path]:
    """The real images of the folder's defect type in the few-shot split: "heldout" (KID's reference) or
    "train" (IC-LPIPS's cluster centres)."""
    split, data_dir = (record.split, record.data_dir) if record else (None, None)
    defect = record.defect_type if record else None
    if not split or not data_dir or defect not in split.get("defect_types", {}):
        flag = "--real_dir" if part == "heldout" else "--train_dir"
        raise EvaluationError(f"{folder / SYNTHESIS_FILENAME} names no data folder and split with {part} images of "
                              f"{defect!r}; give {flag}")
    return [Path(data_dir) / p for p in split["defect_types"][defect][part]]


def generated_images_of(folder: Path) -> list[Path]:
    if not (folder / METADATA_FILENAME).is_file():
        raise EvaluationError(f"{folder} has no {METADATA_FILENAME}: is it an output folder of infer_defectfill.py?")
    return [folder / name for name in sorted(read_metadata(folder, require_files=False))]


def stability_warnings(num_generated: int, num_real: int, num_centres: int) -> list[str]:
    """What makes a figure unstable: too few images for KID, too few per IC-LPIPS cluster."""
    warnings = []
    if min(num_generated, num_real) < KID_MIN_IMAGES:
        warnings.append(f"KID from {num_generated} generated and {num_real} real images varies a lot between runs "
                        f"(papers generate about 1000 per defect type; under {KID_MIN_IMAGES} it is indicative only)")
    if num_generated < IC_LPIPS_MIN_PER_CLUSTER * num_centres:
        warnings.append(f"IC-LPIPS from {num_generated} images over {num_centres} clusters: under "
                        f"{IC_LPIPS_MIN_PER_CLUSTER} per cluster, it is mostly singletons (counted 0) and noise")
    return warnings


def evaluate_folder(folder: Path, settings: EvalSettings, feature, distance, device: str) -> dict:
    """KID and IC-LPIPS of one synthesis folder against its real references, with the warnings that apply."""
    fake_paths = generated_images_of(folder)
    record = SynthesisRecord.read(folder)
    real_paths = image_files(Path(settings.real_dir)) if settings.real_dir else split_images_of(folder, record, "heldout")
    centre_paths = image_files(Path(settings.train_dir)) if settings.train_dir else split_images_of(folder, record, "train")
    size = settings.image_size
    real, fake, centres = load_images(real_paths, size), load_images(fake_paths, size), load_images(centre_paths, size)
    kid = kid_score(real, fake, feature, settings.kid_subsets, settings.kid_max_subset_size, settings.seed, device)
    result = {
        "folder": str(folder), "object_class": record.object_class if record else None,
        "defect_type": (record.defect_type if record else None) or folder.name, "num_generated": len(fake_paths),
        "num_real": len(real_paths), "num_clusters": len(centre_paths), **kid,
        f"kid_x{settings.kid_scale:g}": kid["kid"] * settings.kid_scale,
        **ic_lpips(to_signed(fake), to_signed(centres), distance),
    }
    result["warnings"] = stability_warnings(len(fake_paths), len(real_paths), len(centre_paths))
    for warning in result["warnings"]:
        print(f"warning: {result['defect_type']}: {warning}", file=sys.stderr)
    return result


def format_table(results: list[dict], scale: float) -> str:
    header = f"| defect type | generated | real | clusters | KID x{scale:g} | IC-LPIPS | IC-LPIPS (non-zero clusters) |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['defect_type']} | {r['num_generated']} | {r['num_real']} | {r['num_clusters']} | "
                     f"{r['kid'] * scale:.2f} | {r['ic_lpips']:.3f} | {r['ic_lpips_nonzero']:.3f} |")
    kid_mean = np.mean([r["kid"] for r in results]) * scale
    ic_mean = np.mean([r["ic_lpips"] for r in results])
    nonzero = [r["ic_lpips_nonzero"] for r in results if np.isfinite(r["ic_lpips_nonzero"])]
    lines.append(f"| **mean** | | | | {kid_mean:.2f} | {ic_mean:.3f} | {np.mean(nonzero) if nonzero else float('nan'):.3f} |")
    subsets = {(r["kid_subsets"], r["kid_subset_size"]) for r in results}
    lines.append("")
    lines.append("KID: " + "; ".join(f"{n} subsets of {size} images" for n, size in sorted(subsets)) +
                 f", printed x{scale:g}. IC-LPIPS: clusters around the few-shot training images (DFMGAN).")
    return "\n".join(lines)


def lpips_distance(net: str, device: str) -> Callable:
    """IC-LPIPS's distance; without its backbone weights (offline, never downloaded), an error that says how to get
    them for evaluation (there is no LPIPS-free IC-LPIPS)."""
    from defectfill.scoring import LpipsModel

    try:
        return LpipsModel(net, device).distance
    except SynthesisError as error:
        raise EvaluationError(
            f"IC-LPIPS needs the torchvision '{net}' backbone weights of LPIPS, which could not be loaded "
            f"({error.__cause__ or error}). Run eval_defectfill.py once with network access (they are downloaded to "
            f"$TORCH_HOME/hub/checkpoints), or copy the checkpoint file there from a machine that has it; "
            f"--lpips_net chooses another backbone"
        ) from error


def run_evaluation(settings: EvalSettings, feature: int | torch.nn.Module = 2048, distance: Callable | None = None) -> list[dict]:
    """Every --generated folder evaluated, the table printed and the results JSON written (default: eval_results.json
    beside the first folder). `feature` and `distance` replace Inception and LPIPS (tests, or other extractors)."""

    device = default_device(settings.device)
    output = Path(settings.output_json) if settings.output_json else Path(settings.generated[0]).parent / "eval_results.json"
    check_output_folder(output.parent, "--output_json" if settings.output_json else "--output_json (default: beside --generated)")
    distance = distance or lpips_distance(settings.lpips_net, device)
    results = [evaluate_folder(Path(folder), settings, feature, distance, device) for folder in settings.generated]
    print(format_table(results, settings.kid_scale))
    write_json_atomic(output, {"kid_scale": settings.kid_scale, "kid_subsets": settings.kid_subsets,
                               "kid_max_subset_size": settings.kid_max_subset_size, "results": results})
    return results
