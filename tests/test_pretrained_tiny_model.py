"""The bundled tiny model is pre-trained (scripts/pretrain_tiny_model.py): its VAE reconstructs, its UNet
continues the surroundings, and the README demo's 40-step DefectFill run teaches it a defect colour it has
never seen. Every figure is compared with a reference measured in the same run (the same architecture at
random init, or the base model without the LoRA); the functions are those of scripts/measure_tiny_model.py,
which wrote the table in models/tiny-sd2-inpainting/README.md."""

from __future__ import annotations

import json

import pytest

from scripts import measure_tiny_model as measure
from tests.conftest import TINY_MODEL


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    return measure.measure(TINY_MODEL, tmp_path_factory.mktemp("measure"))


def test_model_readme_records_how_it_was_made():
    readme = (TINY_MODEL / "README.md").read_text()
    record = json.loads((TINY_MODEL / "pretraining.json").read_text())
    assert "python scripts/pretrain_tiny_model.py" in readme and "python scripts/measure_tiny_model.py" in readme
    assert record["settings"]["unet_steps"] >= 1000 and record["inpainting_loss"] < 0.1
    assert f"{record['inpainting_loss']:.4f}" in readme and f"{record['vae_l1']:.4f}" in readme


@pytest.mark.slow  # the measurement trains the demo run in a subprocess
def test_vae_reconstructs_held_out_images(measured):
    error = measured["vae_error"]
    assert error["pretrained"] < 0.03, error  # measured 0.016 vs 0.288
    assert error["pretrained"] < 0.2 * error["random"], error


@pytest.mark.slow  # the measurement trains the demo run in a subprocess
def test_base_inpainting_continues_the_surroundings(measured):
    error = measured["inpainting_error"]  # measured 61.5 vs 71.5: a weak inpainter, but the colour of its context
    assert error["pretrained"] < 0.9 * error["random"], error


@pytest.mark.slow  # the measurement trains the demo run in a subprocess
def test_demo_run_paints_the_defect_colour(measured):
    distance = measured["stain_distance"]  # measured 126.5 -> 86.9 (models/tiny-sd2-inpainting/README.md)
    assert distance["trained"] < 0.75 * distance["base"], distance


@pytest.mark.slow  # the measurement trains the demo run in a subprocess
def test_demo_run_focuses_the_vstar_attention_on_the_mask(measured):
    overlap = measured["vstar_overlap"]  # measured 0.068 -> 0.134, the mask covering 0.072 of the image
    assert overlap["trained"] > 1.3 * overlap["base"], overlap
    assert overlap["trained"] > 1.3 * measured["mask_share"], overlap
