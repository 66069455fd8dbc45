"""The bundled tiny model is pre-trained (scripts/pretrain_tiny_model.py): its VAE reconstructs, its UNet
continues the surroundings, and the README demo's DefectFill run teaches it a defect colour it has never seen.
Every figure is compared with a reference measured in the same run (the same architecture at random init, or the
base model without the LoRA); the functions are those of scripts/measure_tiny_model.py, which wrote the table in
models/tiny-sd2-inpainting/README.md. The LoRA measured is the bundled demo run, checked to be what the demo's
config trains (the script itself trains a fresh one; the generalisation check trains the config on new data)."""

from __future__ import annotations

import json

import pytest
import yaml

from defectfill.runs.records import RunRecord
from defectfill.training.settings import RECORDED_TRAINING_FIELDS
from scripts.tiny import measure
from scripts.tiny.paths import CONFIGS, DEMO_RUN
from tests.conftest import TINY_MODEL


def test_the_bundled_demo_run_is_what_the_demo_config_trains():
    """Every training option of configs/tiny.yaml is the one the bundled demo run was trained with: a change of the
    config that is not followed by `python scripts/refresh_docs.py --only demo` fails here."""
    config = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    record = RunRecord.read(DEMO_RUN)
    recorded = {**record.training, "object_class": record.object_class, "defect_type": record.defect_type,
                "resolution": record.resolution, "token": record.token}
    checked = set(RECORDED_TRAINING_FIELDS) | {"object_class", "defect_type", "resolution", "token"}
    stale = {key: (value, recorded.get(key)) for key, value in config.items() if key in checked and recorded.get(key) != value}
    assert stale == {}


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    return measure.measure(TINY_MODEL, tmp_path_factory.mktemp("measure"), run_dir=DEMO_RUN)


def test_model_readme_records_how_it_was_made():
    readme = (TINY_MODEL / "README.md").read_text()
    record = json.loads((TINY_MODEL / "pretraining.json").read_text())
    assert "python scripts/pretrain_tiny_model.py" in readme and "python scripts/measure_tiny_model.py" in readme
    assert record["settings"]["unet_steps"] > 0 and record["inpainting_loss"] < 0.1
    assert f"{record['inpainting_loss']:.4f}" in readme and f"{record['vae_l1']:.4f}" in readme


@pytest.mark.slow  # the measurement paints with two models and builds a random one
def test_vae_reconstructs_held_out_images(measured):
    error = measured["vae_error"]
    assert error["pretrained"] < 0.03, error
    assert error["pretrained"] < 0.2 * error["random"], error


@pytest.mark.slow  # the measurement paints with two models and builds a random one
def test_base_inpainting_continues_the_surroundings(measured):
    error = measured["inpainting_error"]  # a weak inpainter, but one that continues the colour of its context
    assert error["pretrained"] < error["random"], error


@pytest.mark.slow  # the measurement paints with two models and builds a random one
def test_demo_run_paints_the_defect_colour(measured):
    distance = measured["stain_distance"]  # the figures: models/tiny-sd2-inpainting/README.md
    assert distance["trained"] < 0.9 * distance["base"], distance


@pytest.mark.slow  # the measurement paints with two models and builds a random one
def test_demo_run_focuses_the_vstar_attention_on_the_mask(measured):
    overlap = measured["vstar_overlap"]
    assert overlap["trained"] > 1.3 * overlap["base"], overlap
    assert overlap["trained"] > 1.3 * measured["mask_share"], overlap
