"""The sampler and what synthesis costs: every scheduler the project offers paints the same image for the same seed,
the UNet passes are the candidates times the scheduler's denoising calls, a named sampler is checked before anything
loads; and the rules of the solver measurement (scripts/measure_fast_synthesis.py), by hand."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from defectfill.errors import SynthesisError
from defectfill.painting import SynthesisSettings, prepare_job, synthesize
from defectfill.pipelines import check_scheduler, load_pipeline, scheduler_calls
from tests.conftest import SYNTHETIC_DATA, TINY_MODEL

# The base model's (PLMS history) and the two few-step solvers the tiny configs choose from.
SCHEDULERS = ("PNDMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
BASE = SynthesisSettings("A metal nut with sks", resolution=64, num_candidates=2, num_inference_steps=4, crop_to_mask=True)


def jobs(settings):
    image = Image.open(SYNTHETIC_DATA / "metal_nut" / "test" / "good" / "001.png")
    mask = Image.open(SYNTHETIC_DATA / "metal_nut" / "ground_truth" / "color" / "002_mask.png")
    return [prepare_job(image, mask, 0, settings)]


@pytest.fixture(scope="module")
def pipelines():
    return {name: load_pipeline(str(TINY_MODEL), device="cpu", scheduler=name if name != "PNDMScheduler" else None)
            for name in SCHEDULERS}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_each_sampler_paints_the_same_image_for_the_same_seed(pipelines, name):
    pipeline = pipelines[name]
    assert type(pipeline.scheduler).__name__ == name
    [first] = synthesize(pipeline, jobs(BASE), BASE)
    [again] = synthesize(pipeline, jobs(BASE), BASE)
    [other] = synthesize(pipeline, jobs(BASE), dataclasses.replace(BASE, seed=1))
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert not np.array_equal(np.asarray(first.image), np.asarray(other.image))
    assert first.unet_passes == BASE.num_candidates * scheduler_calls(pipeline, BASE.num_inference_steps)


def test_unet_passes_are_the_calls_the_pipeline_makes(pipelines):
    """Counted on the UNet itself: every call sees the candidates twice (classifier-free guidance), and PNDM makes one
    call more than its steps."""
    pipeline, rows = pipelines["PNDMScheduler"], []
    hook = pipeline.unet.register_forward_hook(lambda module, inputs, output: rows.append(inputs[0].shape[0]))
    try:
        [result] = synthesize(pipeline, jobs(BASE), BASE)
    finally:
        hook.remove()
    assert result.unet_passes == sum(rows) // 2 == BASE.num_candidates * (BASE.num_inference_steps + 1)


def test_the_sampler_is_named_before_anything_loads():
    assert check_scheduler(None, str(TINY_MODEL)) == "PNDMScheduler"  # the base model's, from its config alone
    assert check_scheduler("DPMSolverMultistepScheduler", str(TINY_MODEL)) == "DPMSolverMultistepScheduler"
    with pytest.raises(SynthesisError, match="--scheduler NotAScheduler is not a diffusers scheduler class"):
        check_scheduler("NotAScheduler", str(TINY_MODEL))


# ----------------------------------------------------------------------------------------------------
# The measurement's rules (scripts/measure_fast_synthesis.py), by hand
# ----------------------------------------------------------------------------------------------------


def solver_grid(base: list[float]) -> dict[str, list[float]]:
    """The base at 50 steps, and every other measured setting far from it (tests override the ones they use)."""
    from scripts.tiny.fast_synthesis import SOLVERS, STEP_COUNTS

    return {"base@50": base, **{f"{s}@{n}": [99.0, 99.0] for s in SOLVERS for n in STEP_COUNTS}}


def test_a_solver_holds_within_the_seed_spread_or_closer():
    from scripts.tiny.fast_synthesis import recommend_solver, setting_change, setting_holds

    # base at 50: seeds 10 and 12 (mean 11, spread 2)
    figures = {**solver_grid([10.0, 12.0]), "DPMSolverMultistepScheduler@10": [13.5, 14.5],  # mean 14: 3 farther
               "UniPCMultistepScheduler@10": [12.0, 14.0],  # mean 13: 2 farther, the edge of the spread
               "DPMSolverMultistepScheduler@15": [7.0, 8.0]}  # mean 7.5: 3.5 closer
    assert setting_change(figures, "DPMSolverMultistepScheduler@10") == "farther"
    assert setting_change(figures, "UniPCMultistepScheduler@10") == "within"
    assert setting_change(figures, "DPMSolverMultistepScheduler@15") == "closer"
    assert not setting_holds(figures, "DPMSolverMultistepScheduler@10")
    assert setting_holds(figures, "UniPCMultistepScheduler@10") and setting_holds(figures, "DPMSolverMultistepScheduler@15")
    # the fewest steps that hold on every family, the first solver first; one family farther rules a setting out
    other = {**figures, "UniPCMultistepScheduler@10": [20.0, 20.0]}
    assert recommend_solver({"a": figures}) == "UniPCMultistepScheduler@10"
    assert recommend_solver({"a": figures, "b": other}) == "DPMSolverMultistepScheduler@15"
    assert recommend_solver({"b": solver_grid([1.0, 1.0])}) is None


def test_a_saved_measurement_is_judged_again_by_the_rules():
    from scripts.tiny.fast_synthesis import recommendations

    saved = json.loads(json.dumps({"solvers": {"a": {**solver_grid([1.0, 2.0]), "UniPCMultistepScheduler@10": [1.5, 1.5]}},
                                   "recommended_setting": "DPMSolverMultistepScheduler@25"}))
    assert recommendations(saved) == {"recommended_setting": "UniPCMultistepScheduler@10", "setting_found": True}
    assert recommendations({"solvers": {"a": solver_grid([1.0, 1.0])}}) == {"recommended_setting": "base@50",
                                                                             "setting_found": False}
