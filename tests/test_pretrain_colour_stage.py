"""The later stages of scripts/pretrain_tiny_model.py: the colour stage (the VAE learns near-flat
surfaces of every colour, with thin lines, blobs and patterns on them, and keeps the latents the UNet was trained
on) and the v-prediction stage (the UNet turned into a velocity predictor); each gives the same weights (up to float
rounding) whether it runs after the stages before it or on their saved output (--init_from)."""

from __future__ import annotations

import colorsys
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from scripts.tiny.families import UNSEEN_HUE_BANDS
from scripts.tiny.pretrain import COLOUR_SETTINGS, FROM_SCRATCH_SETTINGS, main, surface_crop
from tests.conftest import TINY_MODEL


def test_surface_crops_are_images_that_cover_the_hue_bands_no_caption_names():
    rng = np.random.default_rng(0)
    crops = [surface_crop(rng, 32) for _ in range(300)]
    assert all(crop.shape == (32, 32, 3) and crop.min() >= 0 and crop.max() <= 255 for crop in crops)
    hues = []
    for crop in crops:
        hue, saturation, value = colorsys.rgb_to_hsv(*(np.median(crop.reshape(-1, 3), axis=0) / 255))
        if saturation > 0.4 and value > 0.3:
            hues.append(hue * 360)
    for low, high in UNSEEN_HUE_BANDS:  # the VAE sees the colours the families' defects are made of
        assert sum(low <= hue <= high for hue in hues) >= 5, (low, high)
    # some are near-flat (the surfaces the first VAE stage got wrong), some carry a line, a blob or a pattern
    spreads = np.array([crop.std(axis=(0, 1)).max() for crop in crops])
    assert (spreads < 12).mean() > 0.2 and (spreads > 25).mean() > 0.2


def test_surface_crops_are_deterministic_for_a_seed():
    first = [surface_crop(np.random.default_rng(3), 16) for _ in range(3)]
    second = [surface_crop(np.random.default_rng(3), 16) for _ in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_bundled_model_records_its_stages_and_is_what_they_made():
    """pretraining.json adds up; the scheduler predicts what the last UNet stage trained; a colour stage, where the
    recipe has one, moved the clean classes' latents by a small fraction of their unit variance (the UNet stays
    valid). Which stages the recipe runs is its own choice."""
    record = json.loads((TINY_MODEL / "pretraining.json").read_text())
    settings = record["settings"]
    assert record["minutes"] == pytest.approx(record["from_scratch_minutes"] + record.get("colour_vae_minutes", 0)
                                              + record.get("v_prediction_minutes", 0), abs=0.15)
    scheduler = json.loads((TINY_MODEL / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == ("v_prediction" if settings.get("v_prediction_steps") else "epsilon")
    assert not settings.get("colour_vae_steps") or record["colour_vae_latent_drift"] < 0.02


def weights(model_dir):
    return {part: load_file(model_dir / part / "diffusion_pytorch_model.safetensors" if part != "text_encoder"
                            else model_dir / part / "model.safetensors") for part in ("vae", "unet", "text_encoder")}


@pytest.mark.slow  # five short pre-training runs, about 40 s
def test_later_stages_on_a_saved_model_give_the_weights_of_a_run_from_scratch(tmp_path):
    few = ["--vae_steps", "2", "--unet_steps", "2", "--batch_size", "8"]
    first = main([*few, "--colour_vae_steps", "0", "--v_prediction_steps", "0", "--output_dir", str(tmp_path / "first")])
    coloured = main([*few, "--colour_vae_steps", "2", "--v_prediction_steps", "0", "--init_from", str(first),
                              "--output_dir", str(tmp_path / "coloured")])
    stages = ["--colour_vae_steps", "2", "--v_prediction_steps", "2"]
    resumed = main([*few, *stages, "--init_from", str(coloured), "--output_dir", str(tmp_path / "resumed")])
    both = main([*few, *stages, "--init_from", str(first), "--output_dir", str(tmp_path / "both")])
    scratch = main([*few, *stages, "--output_dir", str(tmp_path / "scratch")])
    before, middle, reference = weights(first), weights(coloured), weights(scratch)
    for model in (resumed, both):
        after = weights(model)
        for part in ("vae", "unet", "text_encoder"):
            assert after[part].keys() == reference[part].keys()
            # oneDNN's kernels on differently allocated tensors round differently: trained weights agree to 1e-5
            assert all(torch.allclose(after[part][name], reference[part][name], rtol=0, atol=1e-5) for name in after[part]), part
        for name in ("model_index.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "vae/config.json",
                     "unet/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json"):  # a from-scratch run's layout
            assert (model / name).read_text() == (scratch / name).read_text(), name
    # the colour stage trained the VAE only; the v-prediction stage the UNet and text encoder only
    assert not all(before["vae"][name].equal(middle["vae"][name]) for name in before["vae"])
    assert all(before["unet"][name].equal(middle["unet"][name]) for name in before["unet"])
    after = weights(resumed)
    assert all(middle["vae"][name].equal(after["vae"][name]) for name in middle["vae"])
    assert not all(middle["unet"][name].equal(after["unet"][name]) for name in middle["unet"])
    assert json.loads((coloured / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"
    assert json.loads((resumed / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    record = json.loads((resumed / "pretraining.json").read_text())
    assert record["settings"]["v_prediction_steps"] == 2 and "colour_vae_latent_drift" in record and "v_prediction_loss" in record
    readme = (resumed / "README.md").read_text()
    assert "| VAE on near-flat surfaces of any colour" in readme and "| UNet + text encoder, inpainting (velocity MSE) | 2 |" in readme

    with pytest.raises(SystemExit, match="v-prediction stage already"):
        main([*few, *stages, "--init_from", str(scratch), "--output_dir", str(tmp_path / "twice")])
    with pytest.raises(SystemExit, match="its colour stage used"):
        main([*few, "--colour_vae_steps", "3", "--init_from", str(coloured), "--output_dir", str(tmp_path / "recoloured")])
    with pytest.raises(SystemExit, match="from-scratch stages used"):
        main(["--init_from", str(first), "--output_dir", str(tmp_path / "other")])
    with pytest.raises(SystemExit, match="no pretraining.json"):
        main(["--init_from", str(tmp_path), "--output_dir", str(tmp_path / "none")])
    assert not any((tmp_path / name).exists() for name in ("twice", "recoloured", "other", "none"))


def test_colour_stage_refuses_a_batch_without_room_for_a_surface_crop(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--batch_size", "1", "--output_dir", str(tmp_path / "out")])
    assert "--batch_size must be at least 2 with the colour stage" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help_lists_every_stage_setting(capsys):
    with pytest.raises(SystemExit) as exit_info:  # "5 % warmup" in a help string once made --help crash
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (*FROM_SCRATCH_SETTINGS, *COLOUR_SETTINGS, "v_prediction_steps", "v_prediction_lr", "init_from"):
        assert f"--{flag}" in text, flag
