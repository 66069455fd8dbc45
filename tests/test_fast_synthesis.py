"""Early Low-Fidelity Selection and the sampler choice: the clean-image prediction by hand, a kept candidate paints
what a full run of its seed paints (every scheduler the project offers), select_at 1 is today's synthesis, the UNet
passes are what the settings plan, the [V*] map follows the kept candidate, and bad flags fail before anything loads."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from defectfill import denoising
from defectfill.errors import SynthesisError
from defectfill.synthesis import (
    SynthesisSettings,
    check_scheduler,
    load_pipeline,
    planned_unet_passes,
    prepare_job,
    scheduler_calls,
    synthesize,
    synthesize_with_attention,
)
from tests.conftest import SYNTHETIC_DATA, TINY_MODEL

# Same seed, same candidate: after an early selection the kept candidate denoises in a smaller batch, whose kernels
# may round differently on a CPU; its image stays within this many 8-bit levels of the full run's (measured: 0-1).
SAME_IMAGE_LEVELS = 2
# The base model's (PLMS history), the two few-step solvers (their past outputs), one that rescales the model input
# (Euler) and one that draws noise at every step (DDPM: the generator list is cut too).
SCHEDULERS = ("PNDMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "EulerDiscreteScheduler",
              "DDPMScheduler")
BASE = SynthesisSettings("A metal nut with sks", resolution=64, num_candidates=3, num_inference_steps=4, crop_to_mask=True)


class FixedScorer:
    """Scores that do not depend on the images: the selection is known in advance."""

    def __init__(self, scores):
        self.scores = list(scores)

    def __call__(self, clean, candidates, mask):
        return list(self.scores[: len(candidates)]) if len(candidates) == len(self.scores) else [0.5] * len(candidates)


def jobs(settings, count=1):
    image = Image.open(SYNTHETIC_DATA / "metal_nut" / "test" / "good" / "001.png")
    masks = [SYNTHETIC_DATA / "metal_nut" / "ground_truth" / "color" / f"00{i}_mask.png" for i in range(2, 2 + count)]
    return [prepare_job(image, Image.open(m), i, settings) for i, m in enumerate(masks)]


@pytest.fixture(scope="module")
def pipelines():
    return {name: load_pipeline(str(TINY_MODEL), device="cpu", scheduler=name if name != "PNDMScheduler" else None)
            for name in SCHEDULERS}


def test_clean_prediction_by_hand_matches_the_scheduler():
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    sample, output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for kind in ("epsilon", "v_prediction", "sample"):
        scheduler = DDPMScheduler(prediction_type=kind, clip_sample=False)
        scheduler.set_timesteps(10)
        t = scheduler.timesteps[3]
        expected = scheduler.step(output, t, sample, generator=torch.Generator().manual_seed(0)).pred_original_sample
        assert torch.allclose(denoising.predicted_clean_latents(scheduler, sample, output, t), expected, atol=1e-5), kind
    alpha = DDPMScheduler().alphas_cumprod
    assert float(denoising.alpha_bar(DDPMScheduler(), 10.5)) == pytest.approx(float(alpha[10] + alpha[11]) / 2)


def test_selection_call_and_planned_passes():
    assert denoising.selection_call(50, 0.3) == 15 and denoising.selection_call(50, 1.0) is None
    assert denoising.selection_call(10, 0.01) == 1 and denoising.selection_call(10, 0.99) is None
    settings = dataclasses.replace(BASE, num_candidates=8, num_inference_steps=50, select_at=0.3)
    assert planned_unet_passes(settings, 50) == 8 * 15 + 1 * 35
    assert planned_unet_passes(dataclasses.replace(settings, select_at=1.0), 50) == 400
    assert planned_unet_passes(dataclasses.replace(settings, keep=2), 50) == 8 * 15 + 2 * 35


@pytest.mark.parametrize("name", SCHEDULERS)
def test_a_kept_candidate_paints_what_a_full_run_of_its_seed_paints(pipelines, name):
    pipeline = pipelines[name]
    full_settings, early_settings = BASE, dataclasses.replace(BASE, select_at=0.5)
    scorer = FixedScorer([0.1, 0.9, 0.3])  # candidate 1 is chosen, early and finished
    [full] = synthesize(pipeline, jobs(full_settings), full_settings, scorer)
    [early] = synthesize(pipeline, jobs(early_settings), early_settings, scorer)
    assert full.chosen == early.chosen == 1 and early.kept == [1] and full.kept == [0, 1, 2]
    difference = np.abs(np.asarray(early.image, dtype=int) - np.asarray(full.image, dtype=int)).max()
    assert difference <= SAME_IMAGE_LEVELS, (name, difference)
    total = scheduler_calls(pipeline, BASE.num_inference_steps)
    assert early.selected_after == denoising.selection_call(total, 0.5) and full.selected_after is None
    assert early.unet_passes == planned_unet_passes(early_settings, total) < full.unet_passes == 3 * total
    assert len(early.candidates) == 3 and len(early.scores) == 3  # the previews every candidate was scored on


def test_keep_two_finishes_two_and_picks_the_best_finished(pipelines):
    settings = dataclasses.replace(BASE, select_at=0.5, keep=2)

    class ByBrightness:  # early: fixed; finished: the brighter region wins
        def __call__(self, clean, candidates, mask):
            if len(candidates) == 3:
                return [0.9, 0.1, 0.5]
            return [float(np.asarray(c, dtype=float).mean()) for c in candidates]

    [result] = synthesize(pipelines["PNDMScheduler"], jobs(settings), settings, ByBrightness())
    assert result.kept == [0, 2] and result.chosen in (0, 2)
    brightness = [np.asarray(c, dtype=float).mean() for c in (result.region,)]
    assert result.final_score == pytest.approx(brightness[0])


def test_select_at_one_is_synthesis_as_before(pipelines):
    """select_at 1 scores the finished candidates: the same images, scores and choice with or without the field."""
    pipeline, scorer = pipelines["PNDMScheduler"], FixedScorer([0.2, 0.1, 0.7])
    [result] = synthesize(pipeline, jobs(BASE), BASE, scorer)
    assert result.chosen == 2 and result.scores == [0.2, 0.1, 0.7] and result.final_score == 0.7
    assert result.selected_after is None and result.region is result.candidates[2]


def test_several_jobs_keep_their_own_candidates(pipelines):
    settings = dataclasses.replace(BASE, select_at=0.5)
    pipeline = pipelines["DPMSolverMultistepScheduler"]
    scorer = FixedScorer([0.3, 0.2, 0.8])
    full = synthesize(pipeline, jobs(BASE, 2), BASE, scorer)
    early = synthesize(pipeline, jobs(settings, 2), settings, scorer)
    for a, b in zip(full, early):
        assert a.chosen == b.chosen == 2
        assert np.abs(np.asarray(a.image, dtype=int) - np.asarray(b.image, dtype=int)).max() <= SAME_IMAGE_LEVELS


def test_the_vstar_map_follows_the_kept_candidate(pipelines):
    pipeline = pipelines["PNDMScheduler"]
    settings, scorer = dataclasses.replace(BASE, select_at=0.5), FixedScorer([0.1, 0.9, 0.3])
    [_], [full_map] = synthesize_with_attention(pipeline, jobs(BASE), BASE, "sks", scorer)
    [result], [early_map] = synthesize_with_attention(pipeline, jobs(settings), settings, "sks", scorer)
    assert result.chosen == 1 and early_map.shape == full_map.shape
    assert torch.allclose(early_map, full_map, atol=1e-4)


def test_bad_selection_flags_are_named_before_anything_loads():
    import infer_defectfill as infer

    for flags, message in ((("--select_at", "0"), r"--select_at must be in \(0, 1\]"),
                           (("--select_at", "1.5"), r"--select_at must be in \(0, 1\]"),
                           (("--keep", "9"), r"--keep must be between 1 and --num_candidates \(8\)")):
        with pytest.raises(SystemExit):
            infer.parse_args(["--lora", "x", *flags])
        with pytest.raises(SynthesisError, match=message):
            SynthesisSettings("p", select_at=float(flags[1]) if flags[0] == "--select_at" else 1.0,
                              keep=int(flags[1]) if flags[0] == "--keep" else 1)


def test_a_scheduler_without_a_clean_prediction_is_refused_before_loading():
    early = dataclasses.replace(BASE, select_at=0.3)
    assert check_scheduler(None, str(TINY_MODEL), early) == "PNDMScheduler"
    assert check_scheduler("DPMSolverMultistepScheduler", str(TINY_MODEL), early) == "DPMSolverMultistepScheduler"
    with pytest.raises(SynthesisError, match="FlowMatchEulerDiscreteScheduler gives no clean-image prediction"):
        check_scheduler("FlowMatchEulerDiscreteScheduler", str(TINY_MODEL), early)
    assert check_scheduler("FlowMatchEulerDiscreteScheduler", str(TINY_MODEL), BASE)  # scored finished: any sampler
    with pytest.raises(SynthesisError, match="--scheduler NotAScheduler is not a diffusers scheduler class"):
        check_scheduler("NotAScheduler", str(TINY_MODEL), BASE)


def test_only_per_sample_scheduler_state_is_cut():
    """A 1-D per-timestep array as long as the batch (6 steps, 6 candidates) is not a batch of samples (it was cut
    once, and a two-job DPM-Solver run came out NaN)."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler()
    scheduler.set_timesteps(6)
    scheduler.model_outputs = [None, torch.randn(6, 4, 2, 2)]
    timesteps = scheduler.timesteps.clone()
    denoising.keep_scheduler_rows(scheduler, torch.tensor([1, 4]), batch=6)
    assert torch.equal(scheduler.timesteps, timesteps) and scheduler.model_outputs[0] is None
    assert scheduler.model_outputs[1].shape == (2, 4, 2, 2)


# ----------------------------------------------------------------------------------------------------
# The measurement's arithmetic (scripts/measure_fast_synthesis.py), by hand
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


def test_early_selection_summary_and_gain_kept_by_hand():
    from scripts.tiny.fast_synthesis import gain_kept, recommend_select_at, recommendations, selection_summary

    final = [[0.1, 0.5, 0.3], [0.4, 0.2, 0.0]]  # full choices: candidate 1, then 0
    distance = [[9.0, 3.0, 6.0], [2.0, 5.0, 8.0]]
    early = {0.2: [[0.9, 0.0, 0.0], [0.5, 0.0, 0.1]],  # chooses 0 and 0: agrees on the second pair
             0.5: [[0.0, 0.9, 0.0], [0.5, 0.0, 0.1]]}  # chooses 1 and 0: agrees on both
    summary = selection_summary(early, final, distance)
    assert summary["full"] == pytest.approx({"score": 0.45, "distance": 2.5})
    assert summary["random"] == pytest.approx({"score": 1.5 / 6, "distance": 33 / 6})
    assert summary["fractions"][0.2] == pytest.approx({"agree": 0.5, "score": 0.25, "distance": 5.5})
    assert summary["fractions"][0.5] == pytest.approx({"agree": 1.0, "score": 0.45, "distance": 2.5})
    # at 0.2: the early choice scores exactly a random candidate's mean on both figures, so it keeps none of the gain
    assert gain_kept(summary, 0.2, "score") == pytest.approx(0.0) and gain_kept(summary, 0.2, "distance") == pytest.approx(0.0)
    assert gain_kept(summary, 0.5, "score") == pytest.approx(1.0)
    assert recommend_select_at(summary) == 0.5
    # a figure on which the full selection is no better than a random candidate has nothing to keep, and does not judge
    flat = selection_summary({0.3: [[1.0, 0.0], [1.0, 0.0]]}, [[0.2, 0.1], [0.2, 0.1]], [[4.0, 4.0], [4.0, 4.0]])
    assert gain_kept(flat, 0.3, "distance") is None and gain_kept(flat, 0.3, "score") == pytest.approx(1.0)
    assert recommend_select_at(flat) == 0.3
    # none keeps 90 %: score the candidates finished
    assert recommend_select_at(selection_summary({0.2: early[0.2]}, final, distance)) == 1.0
    # a saved JSON has string keys; the rules decide again from its figures
    import json

    saved = json.loads(json.dumps({"solvers": {"a": {**solver_grid([1.0, 2.0]), "UniPCMultistepScheduler@10": [1.5, 1.5]}},
                                   "selection": {"a": summary}, "recommended_setting": "DPMSolverMultistepScheduler@25"}))
    assert recommendations(saved) == {"recommended_setting": "UniPCMultistepScheduler@10", "setting_found": True,
                                      "recommended_select_at": 0.5}
    assert saved["selection_setting"] == "DPMSolverMultistepScheduler@25"  # what the selection was measured with
