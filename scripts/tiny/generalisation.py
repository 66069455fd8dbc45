"""Does a tiny base model learn defects it was never tuned on?

    python scripts/check_generalisation.py                    # prints the table
    python scripts/check_generalisation.py --update_readme    # also writes it into the model's README.md

For every procedural family of `scripts/defect_families.py` (a thin mint crack, a chartreuse blob, a
cross-hatched texture patch: colours, textures and shapes that the pre-training and the tiny config never
saw), the script trains a DefectFill LoRA with the project's CLI and the demo config (`configs/tiny.yaml`,
only the data, class and defect changed) and paints every held-out mask onto a held-out clean image with
the synthesis core (`painting.synthesize`: the run's scale, composite, paste back; one candidate, 20 PNDM
steps, guidance 7.5), once with the base model and once with base + LoRA, same prompt and seeds.

Measured in pixel space at the image's full resolution, inside the mask, against the real held-out defects
of the family:
- colour: distance between the mean RGB (0-255) of each painted defect and the real defects' mean;
- texture: difference of the local contrast (mean |luminance - its 3x3 mean|, 0-255) from the real defects';
- and, as the ceiling the VAE sets, its round-trip error inside the real defects' masks at the scale of
  generation (mean abs. RGB error, 0-255): a VAE that cannot reproduce a colour can never paint it; and the
  distances of the real defects themselves after that round trip (what painting exactly their latents scores).
The "clean surface" column is the image before painting: what doing nothing scores.

Any other flag goes to train_defectfill.py (`--max_train_steps 300`), to try a config before changing it;
the training seed is the check's (`--train_seeds 2`: two LoRAs per family, seeds 0 and 1, their mean and each).
`tests/test_generalisation.py` runs the same check and guards the margins.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from defectfill import painting, pipelines
from defectfill.data.mask_files import open_mask, read_mask
from defectfill.data.mvtec import list_good_images, list_heldout_masks
from defectfill.runs.files import LORA_FILENAME
from defectfill.runs.records import RunRecord
from defectfill.runs.settings import plan_run

from .docs import write_block
from .families import FAMILIES, Family, RegionStatistics, write_families
from .measure import run_repo_script, train_demo_run
from .paths import CONFIGS, DOCS, TINY_MODEL

STEPS = 20
SUMMARY_BLOCK = "generalisation-summary"  # the sentence of docs/demo.md


# ----------------------------------------------------------------------------------------------------
# Distances to the real defects
# ----------------------------------------------------------------------------------------------------


def distances(statistics: list[RegionStatistics], reference: RegionStatistics) -> dict[str, float]:
    """Mean over the regions of their colour and texture distance to the reference."""
    return {
        "colour": float(np.mean([np.linalg.norm(s.colour - reference.colour) for s in statistics])),
        "texture": float(np.mean([abs(s.texture - reference.texture) for s in statistics])),
    }


# ----------------------------------------------------------------------------------------------------
# One family
# ----------------------------------------------------------------------------------------------------


def heldout_defects(data_dir: Path, record: RunRecord) -> list[tuple[Path, Path]]:
    """(real held-out defect image, its mask) of the run's split."""
    images = [data_dir / p for p in record.split["defect_types"][record.defect_type]["heldout"]]
    return list(zip(images, list_heldout_masks(data_dir, record.split, record.defect_type)))


def synthesis_settings(record: RunRecord) -> painting.SynthesisSettings:
    """How the check paints with a run: as `infer_defectfill.py` would (`plan_run`), one candidate, `STEPS` steps."""
    return plan_run(None, record, num_candidates=1, num_inference_steps=STEPS).settings


@torch.no_grad()
def vae_round_trip(vae, region: Image.Image) -> Image.Image:
    """A region (RGB at model resolution) encoded and decoded by the VAE."""
    pixels = torch.from_numpy(np.asarray(region.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample.clamp(-1, 1)
    return Image.fromarray(np.round((decoded[0].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8))


def vae_error_in_masks(jobs: list[painting.Job], round_trips: list[Image.Image]) -> float:
    """Mean abs. RGB error (0-255) of the jobs' regions after the VAE round trip, inside their region masks."""
    errors = []
    for job, decoded in zip(jobs, round_trips):
        error = np.abs(np.asarray(decoded, dtype=np.float32) - np.asarray(job.region, dtype=np.float32))
        errors.append(float(error[np.asarray(job.region_mask) > 127].mean()))
    return float(np.mean(errors))


def vae_round_trip_statistics(real_jobs: list[painting.Job], round_trips: list[Image.Image]) -> list[RegionStatistics]:
    """The real defects themselves encoded and decoded by the VAE, pasted back as generation is: what a LoRA that
    denoised to exactly the real defects' latents would score (a LoRA can also do better: its latents are free)."""
    return [RegionStatistics.of(painting.paste_back(job, decoded, use_composite=True), job.mask)
            for job, decoded in zip(real_jobs, round_trips)]


def mean_distances(per_run: list[dict[str, float]]) -> dict[str, float]:
    return {measure: float(np.mean([d[measure] for d in per_run])) for measure in per_run[0]}


@dataclass
class FamilyCase:
    """What a family's measurement paints and compares against: the held-out masks on held-out clean images (`jobs`),
    the real held-out defects (`real_jobs`) and their mean statistics (`reference`)."""

    jobs: list[painting.Job]
    real_jobs: list[painting.Job]
    reference: RegionStatistics


def family_case(data_dir: Path, record: RunRecord, settings: painting.SynthesisSettings) -> FamilyCase:
    defects = heldout_defects(data_dir, record)
    real = [RegionStatistics.of(Image.open(image), read_mask(mask)) for image, mask in defects]
    goods = list_good_images(data_dir, record.object_class, splits=("test",))
    pairs = painting.round_robin(goods, [mask for _, mask in defects], len(defects))
    jobs = [painting.prepare_job(Image.open(image), open_mask(mask), i, settings) for i, (image, mask) in enumerate(pairs)]
    real_jobs = [painting.prepare_job(Image.open(image), open_mask(mask), i, settings) for i, (image, mask) in enumerate(defects)]
    return FamilyCase(jobs, real_jobs, RegionStatistics.mean(real))


def painted_statistics(pipeline, jobs: list[painting.Job], settings: painting.SynthesisSettings) -> list[RegionStatistics]:
    """The statistics, inside each label, of what `pipeline` paints for the jobs."""
    return [RegionStatistics.of(result.image, result.job.mask) for result in painting.synthesize(pipeline, jobs, settings)]


def measure_family(model_path, data_dir: Path, run_dirs: list[Path]) -> dict:
    """The family's distances: the clean surface, the base model, the real defects through the VAE, and each run's
    LoRA ("trained": their mean; the runs differ only in their training seed, so their split and scale are one)."""
    record = RunRecord.read(run_dirs[0])
    settings = synthesis_settings(record)
    case = family_case(data_dir, record, settings)
    jobs, real_jobs, reference = case.jobs, case.real_jobs, case.reference

    def painted(pipeline) -> list[RegionStatistics]:
        return painted_statistics(pipeline, jobs, settings)

    base = pipelines.load_pipeline(str(model_path), device="cpu")
    trained = [distances(painted(pipelines.load_pipeline(str(model_path), lora=str(run_dir), device="cpu")), reference)
               for run_dir in run_dirs]
    round_trips = [vae_round_trip(base.vae, job.region) for job in real_jobs]  # the real defects through the VAE, once
    return {
        "prompt": record.object_prompt,
        "real": {"colour": [round(float(v), 1) for v in reference.colour], "texture": reference.texture},
        "distance": {
            "clean": distances([RegionStatistics.of(job.image, job.mask) for job in jobs], reference),
            "base": distances(painted(base), reference),
            "trained": mean_distances(trained),
            "vae_round_trip": distances(vae_round_trip_statistics(real_jobs, round_trips), reference),
        },
        "trained_per_seed": trained,
        "vae_error_in_mask": vae_error_in_masks(real_jobs, round_trips),
        "images": len(jobs),
    }


DOWNSTREAM_CONFIG = CONFIGS / "tiny_downstream.yaml"
DOWNSTREAM_SETS = ("real_only", "copy_paste", "defectfill", "real+copy_paste", "real+defectfill")
DOWNSTREAM_KEYS = ("image_auroc", "pixel_ap")
DOWNSTREAM_IMAGES = 12


def downstream_figures(run_dir: Path, work: Path, seeds: int) -> dict:
    """The downstream check on one family, as a team would run it: `build_dataset_defectfill.py` paints 12 images
    with the run's LoRA on train/good images, in masks augmented from the run's training masks (nothing of the
    test set), and `downstream_defectfill.py` trains the tiny config's localizer on them, on the baselines and on
    the real defects plus each generated set, tested on the real held-out defects. Mean over `seeds` seeds."""
    import yaml

    synthetic, output, config = work / "synthetic", work / "downstream", work / "downstream.yaml"
    run_repo_script("build_dataset_defectfill.py", "--lora", str(run_dir), "--output_dir", str(synthetic),
                    "--num_images", str(DOWNSTREAM_IMAGES), "--mask_augment", "--mask_from", "train",
                    "--num_candidates", "1", "--num_inference_steps", str(STEPS))
    # The tiny downstream config without the demo's synthetic set and sweep: --synthetic adds to a config's list.
    settings = {k: v for k, v in yaml.safe_load(DOWNSTREAM_CONFIG.read_text()).items()
                if k not in ("synthetic", "output_dir", "synthetic_shares")}
    config.write_text(yaml.safe_dump(settings))
    run_repo_script("downstream_defectfill.py", "--config", str(config), "--synthetic", f"defectfill={synthetic}",
                    "--output_dir", str(output), "--seeds", *(str(seed) for seed in range(seeds)))
    summary = json.loads((output / "downstream_results.json").read_text())["summary"]
    return {name: {key: summary[name][key]["mean"] for key in DOWNSTREAM_KEYS} for name in DOWNSTREAM_SETS}


def train_family_runs(model_path, work: Path, data_dir: Path, family: Family, seeds: int,
                      train_flags: tuple[str, ...] = (), reuse: bool = False) -> list[Path]:
    """`seeds` LoRAs of `configs/tiny.yaml` on the family (training seeds 0, 1, ...), trained as users train; with
    `reuse`, the runs a kept work folder already holds (each with its LoRA file) are taken as they are."""
    folders = [work / "runs" / family.name / f"seed-{seed}" for seed in range(seeds)]
    if reuse and all((folder / LORA_FILENAME).is_file() for folder in folders):
        return folders
    return [train_demo_run(model_path, work / "runs" / family.name / f"seed-{seed}", "--object_class", family.object_class,
                           "--defect_type", family.defect_type, "--seed", str(seed), *train_flags, data_dir=data_dir)
            for seed in range(seeds)]


def check(model_path=TINY_MODEL, work_dir: Path | None = None, families: tuple[Family, ...] = FAMILIES,
          train_flags: tuple[str, ...] = (), downstream_seeds: int = 0, train_seeds: int = 1) -> dict:
    """Write the families' data, train `train_seeds` LoRAs per family with configs/tiny.yaml (training seeds 0, 1,
    ...), measure each (and, with `downstream_seeds`, run the downstream check on each family's seed-0 LoRA)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work_dir or tmp)
        data_dir = write_families(work / "data")
        results = {}
        for family in families:
            # a kept --work_dir's runs are reused when the check trains them as the config says (no extra flags)
            run_dirs = train_family_runs(model_path, work, data_dir, family, train_seeds, train_flags,
                                         reuse=bool(work_dir) and not train_flags)
            results[family.name] = {"object_class": family.object_class, "defect_type": family.defect_type,
                                    "headline": family.headline, "description": family.description,
                                    **measure_family(model_path, data_dir, run_dirs)}
            if downstream_seeds:
                results[family.name]["downstream"] = downstream_figures(run_dirs[0], work / "downstream" / family.name,
                                                                        downstream_seeds)
    return {"model": str(model_path), "train_flags": list(train_flags), "train_seeds": train_seeds,
            "downstream_seeds": downstream_seeds, "families": results}


# ----------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------


def change(base: float, trained: float) -> str:
    return f"{100 * (trained - base) / base:+.0f} %" if base > 0 else "n/a"


def way_to_vae(base: float, trained: float, round_trip: float) -> str:
    """How much of the gap between the base model and the real defects through the VAE the LoRA closes: 100 %
    paints as close as exactly the real defects' latents would (more is possible: its latents are free)."""
    return f"{100 * (base - trained) / (base - round_trip):.0f} %" if base > round_trip else "n/a"


def trained_cell(family: dict, measure: str) -> str:
    """The LoRA's distance: with several training seeds, their mean and then each seed's in brackets."""
    per_seed = family.get("trained_per_seed", [])
    seeds = f" ({', '.join(f'{d[measure]:.1f}' for d in per_seed)})" if len(per_seed) > 1 else ""
    return f"{family['distance']['trained'][measure]:.1f}{seeds}"


def as_markdown(results: dict) -> str:
    lines = [
        "| family | defect (object): what is new | measure, distance to the real defects | clean surface | base model | base + LoRA | "
        "LoRA vs base | real defects through the VAE | LoRA: of the way from the base to the VAE's |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, family in results["families"].items():
        distance = family["distance"]
        for index, measure in enumerate(("colour", "texture")):
            label = f"{measure} (mean RGB)" if measure == "colour" else f"{measure} (local contrast)"
            if measure == family["headline"]:
                label = f"**{label}**"
            head = f"| {name} | {family['defect_type']} ({family['object_class']}): {family['description']} |" if index == 0 else "| | |"
            lines.append(f"{head} {label} | {distance['clean'][measure]:.1f} | {distance['base'][measure]:.1f} | "
                         f"{trained_cell(family, measure)} | {change(distance['base'][measure], distance['trained'][measure])} | "
                         f"{distance['vae_round_trip'][measure]:.1f} | "
                         f"{way_to_vae(distance['base'][measure], distance['trained'][measure], distance['vae_round_trip'][measure])} |")
    lines += [
        "",
        "| family | real defects: mean RGB, local contrast | VAE round trip inside their masks, mean abs. RGB error (0-255) |",
        "|---|---|---|",
    ]
    for name, family in results["families"].items():
        rgb = ", ".join(f"{v:.0f}" for v in family["real"]["colour"])
        lines.append(f"| {name} | ({rgb}), {family['real']['texture']:.1f} | {family['vae_error_in_mask']:.1f} |")
    if results.get("downstream_seeds"):
        lines += [
            "",
            f"Downstream (`downstream_defectfill.py --config configs/tiny_downstream.yaml`, {results['downstream_seeds']} "
            f"seed(s)): a localizer trained on {DOWNSTREAM_IMAGES} images that `build_dataset_defectfill.py` painted with "
            "the family's LoRA (training seed 0) in masks augmented from its training masks (nothing of the test set), "
            "on the baselines, or on the 3 real training defects plus each generated set (real+), tested on the real "
            "held-out defects (image AUROC / pixel AP, %):",
            "",
            "| family | " + " | ".join(DOWNSTREAM_SETS) + " |",
            "|---|" + "---|" * len(DOWNSTREAM_SETS),
        ]
        for name, family in results["families"].items():
            cells = [" / ".join(f"{100 * family['downstream'][s][k]:.1f}" for k in DOWNSTREAM_KEYS) for s in DOWNSTREAM_SETS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_markdown(results: dict) -> str:
    """The check in one sentence, per family on the measure it is about: how the LoRA's distance to the real defect
    compares with the base model's, and how much of the way to the VAE's round trip it goes (the README quotes it)."""
    changes, ways = [], []
    for name, family in results["families"].items():
        measure, distance = family["headline"], family["distance"]
        changes.append(f"{name} ({family['defect_type']}, {measure}) {change(distance['base'][measure], distance['trained'][measure])}")
        ways.append(f"{name} {way_to_vae(distance['base'][measure], distance['trained'][measure], distance['vae_round_trip'][measure])}")
    seeds = results.get("train_seeds", 1)
    return (f"A LoRA of `configs/tiny.yaml` against the base model, distance of the painted defect to the real one "
            f"({'mean of ' + str(seeds) + ' training seeds' if seeds > 1 else 'one training seed'}): {', '.join(changes)}; "
            f"of the way from the base model to what the VAE can reproduce: {', '.join(ways)}.")


def readme_markdown(results: dict) -> str:
    flags = " ".join(results["train_flags"])
    seeds = results.get("train_seeds", 1)
    options = (f" --train_seeds {seeds}" if seeds > 1 else "") + (
        f" --downstream_seeds {results['downstream_seeds']}" if results.get("downstream_seeds") else "")
    per_family = (f"{seeds} LoRAs per procedural family (`scripts/defect_families.py`; training seeds 0-{seeds - 1}: "
                  "\"base + LoRA\" is their mean, then each seed's)" if seeds > 1
                  else "one LoRA per procedural family (`scripts/defect_families.py`)")
    return "\n".join([
        summary_markdown(results),
        "",
        f"`python scripts/check_generalisation.py --update_readme{options}`{(' (training flags: `' + flags + '`)') if flags else ''}: "
        f"{per_family}, trained with `configs/tiny.yaml` on 3 images; "
        f"held-out masks painted on held-out clean images, {STEPS} PNDM steps, guidance 7.5, one candidate, the same "
        "seeds for base and LoRA. Distances are to the mean of the real held-out defects (lower is better); bold is the "
        "statistic the family is about. \"Real defects through the VAE\" is the real held-out defects themselves encoded and "
        "decoded by the VAE and pasted back as generation is: what painting exactly their latents would score; the last "
        "column, how much of the distance between the base model and that the LoRA closes.",
        "",
        as_markdown(results),
    ])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(TINY_MODEL), help="The tiny model folder to check.")
    parser.add_argument("--work_dir", default=None, help="Keep the families' data and runs here (default: a temp folder); the "
                        "runs a kept folder holds are reused unless training flags are given (delete it after changing "
                        "configs/tiny.yaml).")
    parser.add_argument("--families", default=",".join(f.name for f in FAMILIES), help="Comma-separated family names.")
    parser.add_argument("--update_readme", action="store_true", help="Write the table into the model folder's README.md.")
    parser.add_argument("--output_json", default=None, help="Also write the results here as JSON.")
    parser.add_argument("--from_json", default=None,
                        help="Print (and with --update_readme write) the table of a saved --output_json instead of running the check.")
    parser.add_argument("--downstream_seeds", type=int, default=0,
                        help="Also run the downstream check on each family with this many seeds (0: skip; "
                             "about a minute per family and seed on 2 CPU cores).")
    parser.add_argument("--train_seeds", type=int, default=1,
                        help="Train this many LoRAs per family (training seeds 0, 1, ...) and report their mean and each "
                             "one: a 40-step LoRA of the tiny model scores differently with its training seed (about 70 s per "
                             "family and seed on 2 CPU cores).")
    args, train_flags = parser.parse_known_args(argv)
    if args.train_seeds < 1:
        parser.error(f"--train_seeds must be at least 1, got {args.train_seeds}")
    if "--seed" in train_flags or any(flag.startswith("--seed=") for flag in train_flags):
        parser.error("--seed: the check sets the training seed itself (0, 1, ... with --train_seeds)")
    wanted = args.families.split(",")
    unknown = set(wanted) - {f.name for f in FAMILIES}
    if unknown:
        parser.error(f"--families: unknown {sorted(unknown)}; known: {[f.name for f in FAMILIES]}")
    torch.manual_seed(0)
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        if Path(results["model"]).resolve() != Path(args.model).resolve():
            parser.error(f"--from_json {args.from_json} checked {results['model']}, not --model {args.model}")
    else:
        results = check(args.model, Path(args.work_dir) if args.work_dir else None,
                        tuple(f for f in FAMILIES if f.name in wanted), tuple(train_flags), args.downstream_seeds,
                        args.train_seeds)
    print(json.dumps(results, indent=2))
    print(as_markdown(results))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2) + "\n")
    if args.update_readme:
        from .pretrain import GENERALISATION_BLOCK, update_readme_section

        update_readme_section(Path(args.model), GENERALISATION_BLOCK, readme_markdown(results))
        write_block(DOCS / "demo.md", SUMMARY_BLOCK, summary_markdown(results))
    return results


if __name__ == "__main__":
    main()
