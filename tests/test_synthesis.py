"""synthesis: the core on the tiny pipeline: thin defects are regenerated, the background stays exact,
grayscale and 16-bit sources, and the one mask function training and synthesis share."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import dataset_mvtec as dm
from defectfill import masks
from defectfill.masks import model_mask
from defectfill.models import load_models
from defectfill.painting import SynthesisSettings, generate_candidates, prepare_job, synthesize
from defectfill.pipelines import load_pipeline
from defectfill.step import DefectFillStep
from defectfill.vstar_map import synthesize_with_attention
from tests.conftest import SYNTHETIC_DATA

SETTINGS = SynthesisSettings("A metal nut with sks", resolution=64, num_candidates=1, num_inference_steps=2,
                                       crop_to_mask=False)


def clean_image(mode: str = "RGB") -> Image.Image:
    return Image.open(SYNTHETIC_DATA / "metal_nut" / "test" / "good" / "001.png").convert(mode)


def scratch_mask(size: int = 128, width: int = 3, column: int = 61) -> np.ndarray:
    """A vertical scratch `width` px wide at an odd column: at 64 px (scale 1/2) and latent size it falls
    between the pixels a nearest resize keeps."""
    mask = np.zeros((size, size), dtype=bool)
    mask[30:100, column : column + width] = True
    return mask


@pytest.fixture(scope="module")
def pipeline(tiny_model_path):
    return load_pipeline(str(tiny_model_path), device="cpu")


def test_thin_scratch_is_regenerated_and_the_background_kept(pipeline):
    clean = clean_image()
    label = scratch_mask(width=1)  # 1 px at 128 px: half a pixel at the model's 64 px, a quarter at latent size
    job = prepare_job(clean, label, 0, SETTINGS)
    assert (np.asarray(job.region_mask) > 0).any()  # the resize kept it
    [result] = synthesize(pipeline, [job], SETTINGS)
    out, reference = np.asarray(result.image).astype(int), np.asarray(clean).astype(int)
    assert np.array_equal(out[~label], reference[~label])  # outside the label: the clean pixels exactly
    assert np.abs(out[label] - reference[label]).mean() > 5  # inside: regenerated


def test_a_redraw_paints_the_next_candidates_and_the_highest_score_is_kept(pipeline):
    """`first_candidate` continues the candidate numbers: candidates 2-3 drawn on their own are candidates 2-3 of a
    draw of four (up to the rounding of a smaller batch); `chosen` indexes the call's candidates."""
    two, four = (dataclasses.replace(SETTINGS, num_candidates=n) for n in (2, 4))
    job = prepare_job(clean_image(), scratch_mask(width=6), 0, two)
    [all_four] = synthesize(pipeline, [job], four)
    [redraw] = synthesize(pipeline, [job], two, lambda clean, candidates, mask: [0.1, 0.7], first_candidate=2)
    for drawn, again in zip(all_four.candidates[2:], redraw.candidates):
        assert np.abs(np.asarray(drawn, dtype=int) - np.asarray(again, dtype=int)).max() <= 2
    assert all_four.scores == [0.0] * 4 and all_four.chosen == 0  # no scorer: the first is kept
    assert redraw.chosen == 1 and redraw.final_score == 0.7 and redraw.region is redraw.candidates[1]


def test_the_vstar_map_is_the_chosen_candidates_of_each_job(pipeline):
    """Two jobs in one call, the second candidate chosen in each: the second job's map is the one its chosen
    candidate gets when painted alone, not its other candidate's."""
    settings = dataclasses.replace(SETTINGS, num_candidates=2)
    first, second = (prepare_job(clean_image(), scratch_mask(width=6, column=c), i, settings) for i, c in ((0, 20), (1, 61)))

    def choose(index):
        return lambda clean, candidates, mask: [1.0 if c == index else 0.0 for c in range(len(candidates))]

    results, maps = synthesize_with_attention(pipeline, [first, second], settings, "sks", choose(1))
    assert [r.chosen for r in results] == [1, 1]
    [_], [alone] = synthesize_with_attention(pipeline, [second], settings, "sks", choose(1))
    [_], [other] = synthesize_with_attention(pipeline, [second], settings, "sks", choose(0))
    assert torch.allclose(maps[1], alone, atol=1e-4) and not torch.allclose(maps[1], other, atol=1e-4)


def test_model_mask_is_the_training_mask_function(pipeline, monkeypatch, tiny_model_path):
    """Synthesis hands the pipeline the mask that `defectfill.masks.cover_latent_blocks` makes, the function
    the training step uses for its masked images: called from both, with the VAE's scale."""
    calls = []
    real = masks.cover_latent_blocks
    monkeypatch.setattr(masks, "cover_latent_blocks", lambda mask, scale: calls.append(scale) or real(mask, scale))
    job = prepare_job(clean_image(), scratch_mask(), 0, SETTINGS)
    generate_candidates(pipeline, [job], SETTINGS)
    assert calls == [pipeline.vae_scale_factor] == [2]
    covered = model_mask(job.region_mask, 2)
    assert np.all(np.asarray(covered)[np.asarray(job.region_mask) > 0] == 255)

    models = load_models(str(tiny_model_path))
    step = DefectFillStep.build(models, "metal_nut", capture=False)
    mask = torch.from_numpy(np.asarray(job.region_mask) > 0).float()[None, None]
    with torch.no_grad(), step({"pixel_values": torch.zeros(1, 3, 64, 64), "masks": mask}):
        pass
    assert calls[2:] == [2, 2]  # the step: the defect mask and the random boxes


def test_grayscale_source_stays_grayscale(pipeline):
    clean = clean_image("L")
    label = scratch_mask(width=6)
    [result] = synthesize(pipeline, [prepare_job(clean, label, 0, SETTINGS)], SETTINGS)
    assert result.image.mode == "L"
    out, reference = np.asarray(result.image), np.asarray(clean)
    assert np.array_equal(out[~label], reference[~label])


def test_sixteen_bit_images_are_scaled_not_clipped():
    values = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)  # 0 .. 65520
    image = Image.fromarray(values, mode="I;16")
    converted = dm.to_8bit(image)
    assert converted.mode == "L"
    assert np.asarray(converted).max() == 255 and 100 < np.asarray(converted).mean() < 155  # not all white
    assert np.asarray(image.convert("L")).min() == 255 or np.asarray(image.convert("RGB")).mean() > 200  # PIL clips
    job = prepare_job(image, scratch_mask(64, 4, 20), 0, SETTINGS)
    assert job.mode == "L" and np.asarray(job.image).mean() < 200


def test_mask_of_another_aspect_ratio_warns(caplog):
    mask = Image.fromarray((scratch_mask(128)[:, :64] * 255).astype(np.uint8))  # 64 x 128 for a 128 x 128 image
    with caplog.at_level("WARNING", logger="defectfill"):
        prepare_job(clean_image(), mask, 0, SETTINGS, mask_name="mask m.png")
    assert "mask m.png is 64x128 but its image is 128x128" in caplog.text
