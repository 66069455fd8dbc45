"""How few denoising steps keep what synthesis paints: measured on the procedural defect families of the
generalisation check (defects the tiny model and its config were not made for).

    python scripts/measure_fast_synthesis.py                   # prints the table and writes the JSON
    python scripts/measure_fast_synthesis.py --update_docs     # also writes it into docs/fast_synthesis.md

For every family, `--train_seeds` LoRAs of `configs/tiny.yaml` (training seeds 0, 1, ...), then each held-out mask
painted on a held-out clean image (one candidate, guidance 7.5, the same seeds) with the base model's scheduler at 50
steps and with DPM-Solver++ (2M) and UniPC at 10 / 15 / 20 / 25 steps; the in-mask distance to the real defect on the
family's headline statistic (colour or local contrast, as the generalisation check measures it), per training seed. A
setting *holds* when, for every family, its mean over the seeds is no farther from the real defect than the base
scheduler's at 50 steps by more than that one's seed-to-seed spread (mean - mean at 50 <= |seed 0 - seed 1| at 50:
within the spread, or closer). The recommendation is the fewest steps that hold (the first solver of `SOLVERS` when
both do); a saved JSON is re-read by these rules. `tests/test_fast_synthesis.py` checks them by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from defectfill import pipelines
from defectfill.runs.records import RunRecord

from .docs import write_block
from .families import FAMILIES, write_families
from .generalisation import distances, family_case, painted_statistics, synthesis_settings, train_family_runs
from .paths import DOCS, TINY_MODEL

BASE_STEPS = 50
SOLVERS = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
SOLVER_NAMES = {"DPMSolverMultistepScheduler": "DPM-Solver++ (2M)", "UniPCMultistepScheduler": "UniPC"}
STEP_COUNTS = (10, 15, 20, 25)
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
        figures[key] = [headline_distance(pipelines.load_pipeline(str(model_path), lora=str(run), device="cpu", scheduler=scheduler),
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


def recommendations(results: dict) -> dict:
    """The recommended solver setting, by the rule above, from the measured figures (also for a saved JSON: the
    rule, not the file, decides)."""
    found = recommend_solver(results["solvers"])
    return {"recommended_setting": found or f"base@{BASE_STEPS}", "setting_found": found is not None}


# ----------------------------------------------------------------------------------------------------
# The run, the tables
# ----------------------------------------------------------------------------------------------------


def measure(model_path=TINY_MODEL, work_dir: Path | None = None, train_seeds: int = 2) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work_dir or tmp)
        data_dir = write_families(work / "data")
        runs = {family.name: train_family_runs(model_path, work, data_dir, family, train_seeds, reuse=True) for family in FAMILIES}
        solvers = {f.name: solver_figures(model_path, data_dir, f, runs[f.name]) for f in FAMILIES}
    return {"model": str(model_path), "train_seeds": train_seeds, "solvers": solvers,
            "headline": {f.name: f.headline for f in FAMILIES}}


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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(TINY_MODEL), help="The tiny model folder.")
    parser.add_argument("--work_dir", default=None, help="Keep the families' data and runs here (default: a temp folder); "
                                                          "runs a kept folder already holds are reused, not retrained.")
    parser.add_argument("--train_seeds", type=int, default=2, help="LoRAs per family (training seeds 0, 1, ...); at least 2 "
                                                                    "for a seed-to-seed spread.")
    parser.add_argument("--output_json", default="outputs/fast_synthesis.json", help="Where the figures go (JSON).")
    parser.add_argument("--from_json", default=None, help="Print (and with --update_docs write) a saved --output_json.")
    parser.add_argument("--update_docs", action="store_true", help="Write the table into docs/fast_synthesis.md.")
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
    solvers = solver_markdown(results)
    print(solvers)
    if args.update_docs:
        stamp = "`python scripts/measure_fast_synthesis.py --update_docs`"
        write_block(DOC, "solver-steps", f"{stamp}, {results['train_seeds']} training seeds per family:\n\n{solvers}")
    return results


if __name__ == "__main__":
    main()
