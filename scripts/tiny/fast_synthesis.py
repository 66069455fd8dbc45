"""How few denoising steps, and how early a selection, keep what synthesis paints: measured on the procedural defect
families of the generalisation check (defects the tiny model and its config were not made for).

    python scripts/measure_fast_synthesis.py                   # prints the tables and writes the JSON
    python scripts/measure_fast_synthesis.py --update_docs     # also writes them into docs/fast_synthesis.md

For every family, `--train_seeds` LoRAs of `configs/tiny.yaml` (training seeds 0, 1, ...), then:

1. Solvers. Each held-out mask painted on a held-out clean image (one candidate, guidance 7.5, the same seeds) with the
   base model's scheduler at 50 steps and with DPM-Solver++ (2M) and UniPC at 10 / 15 / 20 / 25 steps; the in-mask
   distance to the real defect on the family's headline statistic (colour or local contrast, as the generalisation
   check measures it), per training seed. A setting *holds* when, for every family, its mean over the seeds is no
   farther from the real defect than the base scheduler's at 50 steps by more than that one's seed-to-seed spread
   (mean - mean at 50 <= |seed 0 - seed 1| at 50: within the spread, or closer). The recommendation is the fewest
   steps that hold (the first solver of `SOLVERS` when both do).
2. Early selection, with the recommended solver and steps (DPM-Solver++ at 25 when none holds): eight candidates per
   pair, scored as synthesis scores them (LPIPS inside the mask, composited over the clean region) on the clean image
   predicted after 10 / 20 / 30 / 50 % of the steps, and on the finished images. Per fraction: the share of pairs
   whose early choice is the full run's, and the final score (and the family distance) of the early choice against
   the full run's choice and a random candidate's (the mean over the candidates). The recommended `--select_at` is
   the smallest fraction whose early choice keeps at least 90 % of the full selection's gain over a random candidate,
   on both figures (a figure on which the full selection gains nothing does not judge); a saved JSON is re-read by
   these rules.

Offline, LPIPS runs with a random-init AlexNet backbone (its real code, no downloaded weights): the figures say how
well an early prediction ranks candidates as their finished images rank under that scorer, not under the pretrained
one. `tests/test_fast_synthesis.py` checks the arithmetic of the tables by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from defectfill import denoising, synthesis
from defectfill.runs.records import RunRecord
from defectfill.scoring import LpipsModel

from .docs import write_block
from .families import FAMILIES, RegionStatistics, write_families
from .generalisation import distances, family_case, painted_statistics, synthesis_settings, train_family_runs
from .paths import DOCS, TINY_MODEL

BASE_STEPS = 50
SOLVERS = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
SOLVER_NAMES = {"DPMSolverMultistepScheduler": "DPM-Solver++ (2M)", "UniPCMultistepScheduler": "UniPC"}
STEP_COUNTS = (10, 15, 20, 25)
SELECT_ATS = (0.1, 0.2, 0.3, 0.5)
CANDIDATES = 8
GAIN_KEPT = 0.9  # an early selection must keep this share of the full selection's gain over a random candidate
DOC = DOCS / "fast_synthesis.md"


# ----------------------------------------------------------------------------------------------------
# Solvers
# ----------------------------------------------------------------------------------------------------


def headline_distance(pipeline, case, settings, measure: str) -> float:
    return distances(painted_statistics(pipeline, case.jobs, settings), case.reference)[measure]


def solver_figures(model_path, data_dir: Path, family, run_dirs: list[Path]) -> dict:
    """{setting: [headline distance per training seed]}; settings "base@50" and "<solver>@<steps>"."""
    record = RunRecord.read(run_dirs[0])
    figures: dict[str, list[float]] = {}
    for scheduler, steps in [(None, BASE_STEPS)] + [(s, n) for s in SOLVERS for n in STEP_COUNTS]:
        settings = dataclasses.replace(synthesis_settings(record), num_inference_steps=steps)
        case = family_case(data_dir, record, settings)
        key = f"{scheduler or 'base'}@{steps}"
        figures[key] = [headline_distance(synthesis.load_pipeline(str(model_path), lora=str(run), device="cpu", scheduler=scheduler),
                                          case, settings, family.headline) for run in run_dirs]
    return figures


def setting_change(figures: dict[str, list[float]], setting: str) -> str:
    """How the setting's mean distance over the seeds compares with the base scheduler's at 50 steps, against the
    seed-to-seed spread there (|seed 0 - seed 1|): "within" the spread, "closer" to the real defect by more than
    it, or "farther" by more than it."""
    base = figures[f"base@{BASE_STEPS}"]
    spread = max(base) - min(base)
    difference = float(np.mean(figures[setting])) - float(np.mean(base))
    return "within" if abs(difference) <= spread else ("closer" if difference < 0 else "farther")


def setting_holds(figures: dict[str, list[float]], setting: str) -> bool:
    """The setting paints no farther from the real defect than the base scheduler at 50 steps, beyond the
    seed-to-seed spread there: within it, or closer (the distances are to the real defect, lower is better; a
    solver that paints closer loses nothing a team wants)."""
    return setting_change(figures, setting) != "farther"


def recommend_solver(per_family: dict[str, dict[str, list[float]]]) -> str | None:
    """The fewest steps (then the first solver of `SOLVERS`) whose setting holds on every family; None if none does."""
    for steps in STEP_COUNTS:
        for solver in SOLVERS:
            setting = f"{solver}@{steps}"
            if all(setting_holds(figures, setting) for figures in per_family.values()):
                return setting
    return None


# ----------------------------------------------------------------------------------------------------
# Early selection
# ----------------------------------------------------------------------------------------------------


def early_scores(pipeline, jobs, settings, scorer, fractions) -> tuple[list, dict]:
    """Every candidate of every job finished (the full run), and the scores each would have had at every fraction of
    `fractions` (the clean image its step predicted, composited, scored by `scorer`): (results, {fraction: [per job
    [per candidate score]]})."""
    total = synthesis.scheduler_calls(pipeline, settings.num_inference_steps)
    at = {denoising.selection_call(total, f) or total: f for f in fractions}
    recorded: dict[float, list[list[float]]] = {}
    guided = settings.guidance_scale > 1
    n = settings.num_candidates
    with denoising.watch_unet(pipeline.unet, guided) as calls:
        def observe(pipe, step, timestep, tensors):
            if calls.calls in at:
                clean = denoising.predicted_clean_latents(pipe.scheduler, calls.input_latents(),
                                                          calls.guided_prediction(settings.guidance_scale), calls.last_timestep)
                previews = denoising.decode_previews(pipe, clean)
                scores = []
                for j, job in enumerate(jobs):
                    mine = [synthesis.composite(job.region, p, job.region_mask) for p in previews[j * n : (j + 1) * n]]
                    scores.append([float(x) for x in scorer(job.region, mine, job.region_mask)])
                recorded[at[calls.calls]] = scores
            return tensors

        results = _synthesize_observed(pipeline, jobs, settings, scorer, observe)
    return results, recorded


def _synthesize_observed(pipeline, jobs, settings, scorer, observe) -> list:
    """`synthesis.synthesize` with every candidate finished and `observe` called after each step."""
    n = settings.num_candidates
    generators = [g for job in jobs for g in synthesis.candidate_generators(settings.seed, job.index, n, pipeline.device)]
    images = pipeline(
        prompt=[settings.prompt] * (len(jobs) * n), image=[job.region for job in jobs for _ in range(n)],
        mask_image=[synthesis.masks.model_mask(job.region_mask, pipeline.vae_scale_factor) for job in jobs for _ in range(n)],
        height=settings.resolution, width=settings.resolution, num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale, generator=generators, callback_on_step_end=observe,
        callback_on_step_end_tensor_inputs=["latents"],
    ).images
    out = []
    for j, job in enumerate(jobs):
        finished = [synthesis.composite(job.region, image, job.region_mask) for image in images[j * n : (j + 1) * n]]
        scores = [float(x) for x in scorer(job.region, finished, job.region_mask)]
        out.append((job, finished, scores))
    return out


def selection_summary(early: dict[float, list[list[float]]], final: list[list[float]], distance: list[list[float]]) -> dict:
    """Per fraction: `agree` (share of pairs whose early choice is the full choice), and the mean over pairs of the
    early choice's final score and family distance, against the full choice's and a random candidate's (the mean
    over a pair's candidates). `final[p][c]`: the finished candidate's score; `distance[p][c]`: its distance."""
    final, distance = np.asarray(final, dtype=np.float64), np.asarray(distance, dtype=np.float64)
    full = final.argmax(axis=1)
    rows = np.arange(len(final))
    summary = {"full": {"score": float(final[rows, full].mean()), "distance": float(distance[rows, full].mean())},
               "random": {"score": float(final.mean()), "distance": float(distance.mean())}, "fractions": {}}
    for fraction, scores in sorted(early.items()):
        choice = np.asarray(scores, dtype=np.float64).argmax(axis=1)
        summary["fractions"][fraction] = {"agree": float((choice == full).mean()), "score": float(final[rows, choice].mean()),
                                          "distance": float(distance[rows, choice].mean())}
    return summary


def gain_kept(summary: dict, fraction: float, figure: str) -> float | None:
    """How much of the full selection's gain over a random candidate the early choice keeps (1: all of it). Scores
    gain upward (a higher LPIPS is more defect-like), distances downward. None when the full selection gains
    nothing over a random candidate on that figure: there is no gain to keep, and the figure cannot judge."""
    early, full, random = summary["fractions"][fraction][figure], summary["full"][figure], summary["random"][figure]
    gain = (full - random) if figure == "score" else (random - full)
    kept = (early - random) if figure == "score" else (random - early)
    return kept / gain if gain > 1e-12 else None


def recommend_select_at(summary: dict) -> float:
    """The smallest fraction that keeps `GAIN_KEPT` of the gain on both figures (a figure with no gain to keep does
    not judge); 1.0 when none does."""
    for fraction in sorted(summary["fractions"]):
        kept = [gain_kept(summary, fraction, figure) for figure in ("score", "distance")]
        if all(k is None or k >= GAIN_KEPT for k in kept):
            return fraction
    return 1.0


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def recommendations(results: dict) -> dict:
    """The recommended solver setting and `--select_at`, by the rules above, from the measured figures (also for a
    saved JSON: the rules, not the file, decide). JSON keys are strings: the fractions come back as floats."""
    results.setdefault("selection_setting", results.get("recommended_setting"))  # a JSON of the first version
    for summary in results["selection"].values():
        summary["fractions"] = {float(k): v for k, v in summary["fractions"].items()}
    found = recommend_solver(results["solvers"])
    return {"recommended_setting": found or f"base@{BASE_STEPS}", "setting_found": found is not None,
            "recommended_select_at": max(recommend_select_at(summary) for summary in results["selection"].values())}


def selection_figures(model_path, data_dir: Path, family, run_dirs: list[Path], setting: str, scorer) -> dict:
    """The pooled (all seeds' pairs) early-selection summary of one family, with the recommended solver and steps."""
    solver, steps = setting.split("@")
    early_all: dict[float, list] = {f: [] for f in SELECT_ATS}
    final_all, distance_all = [], []
    for run in run_dirs:
        record = RunRecord.read(run)
        settings = dataclasses.replace(synthesis_settings(record), num_inference_steps=int(steps), num_candidates=CANDIDATES)
        case = family_case(data_dir, record, settings)
        pipeline = synthesis.load_pipeline(str(model_path), lora=str(run), device="cpu", scheduler=solver)
        results, early = early_scores(pipeline, case.jobs, settings, scorer, SELECT_ATS)
        for fraction in SELECT_ATS:
            early_all[fraction] += early[fraction]
        for job, finished, scores in results:
            final_all.append(scores)
            statistics = [RegionStatistics.of(synthesis.paste_back(job, c, True), job.mask) for c in finished]
            distance_all.append([distances([s], case.reference)[family.headline] for s in statistics])
    return selection_summary(early_all, final_all, distance_all)


# ----------------------------------------------------------------------------------------------------
# The run, the tables
# ----------------------------------------------------------------------------------------------------


def measure(model_path=TINY_MODEL, work_dir: Path | None = None, train_seeds: int = 2) -> dict:
    scorer = LpipsModel("alex", "cpu", pretrained_backbone=False).masked_scores
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work_dir or tmp)
        data_dir = write_families(work / "data")
        runs = {family.name: train_family_runs(model_path, work, data_dir, family, train_seeds, reuse=True) for family in FAMILIES}
        solvers = {f.name: solver_figures(model_path, data_dir, f, runs[f.name]) for f in FAMILIES}
        # the selection is measured with the recommended solver (the fastest multistep one when none holds)
        setting = recommend_solver(solvers) or f"{SOLVERS[0]}@{STEP_COUNTS[-1]}"
        selection = {f.name: selection_figures(model_path, data_dir, f, runs[f.name], setting, scorer) for f in FAMILIES}
    return {"model": str(model_path), "train_seeds": train_seeds, "solvers": solvers, "selection_setting": setting,
            "selection": selection, "headline": {f.name: f.headline for f in FAMILIES}}


def solver_markdown(results: dict) -> str:
    families = list(results["solvers"])
    settings = list(next(iter(results["solvers"].values())))
    lines = ["| sampler, steps | " + " | ".join(f"{name} ({results['headline'][name]})" for name in families) + " | holds |",
             "|---|" + "---|" * (len(families) + 1)]
    for setting in settings:
        solver, steps = setting.split("@")
        label = f"base scheduler (PNDM), {steps}" if solver == "base" else f"{SOLVER_NAMES[solver]}, {steps}"
        cells = []
        for name in families:
            values = results["solvers"][name][setting]
            cells.append(f"{np.mean(values):.1f} ({', '.join(f'{v:.1f}' for v in values)})")
        changes = {setting_change(results["solvers"][n], setting) for n in families}
        holds = ("baseline" if solver == "base" else "no (farther)" if "farther" in changes else
                 "yes (closer on some)" if "closer" in changes else "yes")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {holds} |")
    found = results["setting_found"]
    solver, steps = results["recommended_setting"].split("@")
    lines += ["", "A setting holds on a family when its mean distance is no farther from the real defect than the base "
                  "scheduler's at 50 steps by more than that one's seed-to-seed spread (|seed 0 - seed 1|): within the "
                  "spread, or closer.",
              "", (f"Recommended: {SOLVER_NAMES[solver]} at {steps} steps, the fewest that hold on every family." if found else
                   "No setting holds on every family: the base scheduler at 50 steps stays the recommendation.")]
    return "\n".join(lines)


def selection_markdown(results: dict) -> str:
    solver, steps = results["selection_setting"].split("@")
    lines = [f"{SOLVER_NAMES[solver]} at {steps} steps, {CANDIDATES} candidates per pair, every pair of both training seeds. "
             "Per fraction of the steps: the share of pairs whose early choice is the full run's; the final LPIPS inside the "
             "mask of the early choice (higher is more defect-like) and its distance to the real defect (lower is better), "
             "against the full run's choice and a random candidate.", "",
             "| family | scored after | early choice = full choice | final LPIPS: early / full / random | "
             "distance: early / full / random | gain kept (LPIPS, distance) |", "|---|---|---|---|---|---|"]
    for name, summary in results["selection"].items():
        full, random = summary["full"], summary["random"]
        for fraction, row in summary["fractions"].items():
            fraction = float(fraction)
            lines.append(f"| {name} | {fraction:.0%} | {row['agree']:.0%} | {row['score']:.3f} / {full['score']:.3f} / "
                         f"{random['score']:.3f} | {row['distance']:.1f} / {full['distance']:.1f} / {random['distance']:.1f} | "
                         f"{percent(gain_kept(summary, fraction, 'score'))}, {percent(gain_kept(summary, fraction, 'distance'))} |")
    lines += ["", f"Recommended `--select_at`: {results['recommended_select_at']:g}, the smallest fraction that keeps at least "
                  f"{GAIN_KEPT:.0%} of the full selection's gain over a random candidate on both figures, on every family "
                  "(n/a: the full selection gains nothing over a random candidate on that figure, which then does not "
                  "judge; 1 = none does: score the candidates finished)."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(TINY_MODEL), help="The tiny model folder.")
    parser.add_argument("--work_dir", default=None, help="Keep the families' data and runs here (default: a temp folder); "
                                                          "runs a kept folder already holds are reused, not retrained.")
    parser.add_argument("--train_seeds", type=int, default=2, help="LoRAs per family (training seeds 0, 1, ...); at least 2 "
                                                                    "for a seed-to-seed spread.")
    parser.add_argument("--output_json", default="outputs/fast_synthesis.json", help="Where the figures go (JSON).")
    parser.add_argument("--from_json", default=None, help="Print (and with --update_docs write) a saved --output_json.")
    parser.add_argument("--update_docs", action="store_true", help="Write the tables into docs/fast_synthesis.md.")
    args = parser.parse_args(argv)
    if args.train_seeds < 2:
        parser.error("--train_seeds must be at least 2: the solvers are judged against the seed-to-seed spread")
    torch.manual_seed(0)
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
    else:
        results = measure(args.model, Path(args.work_dir) if args.work_dir else None, args.train_seeds)
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(results, indent=2) + "\n")
    results.update(recommendations(results))
    solvers, selection = solver_markdown(results), selection_markdown(results)
    print(solvers, "\n\n", selection, sep="")
    if args.update_docs:
        stamp = "`python scripts/measure_fast_synthesis.py --update_docs`"
        write_block(DOC, "solver-steps", f"{stamp}, {results['train_seeds']} training seeds per family:\n\n{solvers}")
        write_block(DOC, "early-selection", f"{stamp}:\n\n{selection}")
    return results


if __name__ == "__main__":
    main()
