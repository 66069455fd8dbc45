"""SDXL inpainting through train_defectfill.py, on the tiny offline SDXL model (random weights: the plumbing, not
the quality): a run writes the LoRA as `StableDiffusionXLInpaintPipeline.save_lora_weights` does and that pipeline
loads it and paints differently; resuming is bit-exact; the attention loss trains both text encoders; a base of
another family stops before anything is written; the withdrawn SD2 id loads its mirror."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train_defectfill as train
from defectfill import bases
from defectfill.cli import settings_from_args
from defectfill.errors import InpaintingModelError
from defectfill.models import add_lora_adapters, load_models
from defectfill.runs.files import LORA_FILENAME, MODEL_CARD_FILENAME, RUN_FILENAME
from defectfill.step import DefectFillStep, StepConfig
from defectfill.training.data import build_dataloader, load_training_split
from defectfill.training.settings import TrainingSettings
from tests.conftest import REPO_ROOT
from tests.helpers.sdxl_training import RUN_EXTRA, SIZE, sdxl_args

PREFIXES = {"unet", "text_encoder", "text_encoder_2"}


def paint(pipeline) -> np.ndarray:
    image, mask = Image.new("RGB", (SIZE, SIZE), (128, 100, 60)), Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 40, 40))
    return pipeline("A metal nut with sks", image=image, mask_image=mask, num_inference_steps=2, height=SIZE, width=SIZE,
                    generator=torch.Generator().manual_seed(0), output_type="np").images


def test_an_sdxl_run_writes_the_sdxl_lora_record_and_card(sdxl_run):
    state = load_file(sdxl_run / LORA_FILENAME)
    assert {key.split(".")[0] for key in state} == PREFIXES
    # Both encoders' keys keep CLIP's text_model. level, as SDXL LoRAs are written.
    assert all(key.startswith(("unet.", "text_encoder.text_model.", "text_encoder_2.text_model.")) for key in state)
    record = json.loads((sdxl_run / RUN_FILENAME).read_text())
    assert (record["base_family"], record["pipeline_class"]) == ("sdxl", "StableDiffusionXLInpaintPipeline")
    assert record["training_summary"]["global_step"] == 3 and record["resolution"] == SIZE
    card = (sdxl_run / MODEL_CARD_FILENAME).read_text()
    assert "from diffusers import StableDiffusionXLInpaintPipeline" in card and "stable-diffusion-xl" in card
    assert "StableDiffusionInpaintPipeline" not in card
    assert (sdxl_run / "validation_0.png").is_file()  # the final validation painted with SDXL's pipeline


def test_the_lora_loads_in_the_sdxl_pipeline_and_changes_what_it_paints(sdxl_run, tiny_sdxl_path):
    from diffusers import StableDiffusionXLInpaintPipeline

    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(tiny_sdxl_path)
    pipe.set_progress_bar_config(disable=True)
    before = paint(pipe)
    pipe.load_lora_weights(str(sdxl_run), weight_name=LORA_FILENAME)
    assert PREFIXES <= set(pipe.get_list_adapters())
    assert np.abs(paint(pipe) - before).max() > 1e-3


def test_resuming_an_sdxl_run_gives_the_uninterrupted_lora_bit_for_bit(sdxl_run, tiny_sdxl_path, tmp_path):
    """The fixture's run checkpointed each step; resuming from its step 1 ends with the same three LoRAs."""
    resumed = tmp_path / "resumed"
    train.main(sdxl_args(tiny_sdxl_path, resumed, *RUN_EXTRA, "--resume_from_checkpoint", str(sdxl_run / "checkpoint-1")))
    straight, again = load_file(sdxl_run / LORA_FILENAME), load_file(resumed / LORA_FILENAME)
    assert straight.keys() == again.keys() and {key.split(".")[0] for key in again} == PREFIXES
    for key in straight:
        assert torch.equal(straight[key], again[key]), key
    checkpoint = load_file(sdxl_run / "checkpoint-1" / LORA_FILENAME)
    assert {key.split(".")[0] for key in checkpoint} == PREFIXES  # the checkpoint holds all three, raw


def test_the_attention_loss_trains_both_text_encoders(tiny_sdxl_path, tmp_path):
    """The [V*] attention loss alone reaches the LoRA of both text encoders (its map reads the concatenated
    embeddings at the token's positions) and of the UNet; the UNet call gets SDXL's added conditioning."""
    settings = settings_from_args(TrainingSettings, sdxl_args(tiny_sdxl_path, tmp_path))
    models = load_models(str(tiny_sdxl_path))
    assert models.is_sdxl and models.base.family == "sdxl"
    add_lora_adapters(models, 4, 8)
    step = DefectFillStep.build(models, "metal_nut", "sks", StepConfig.from_settings(settings.method))
    rows, _ = load_training_split(settings, "color")
    batch = next(iter(build_dataloader(rows, settings, 1)))
    seen = {}
    handle = models.unet.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        with step(batch) as output:
            assert output.attention_map.shape == (1, 1, SIZE // 2, SIZE // 2)
            output.losses["attention"].backward()
    finally:
        handle.remove()
    assert seen["added_cond_kwargs"]["time_ids"].tolist() == [[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2
    assert seen["added_cond_kwargs"]["text_embeds"].shape == (2, models.text_encoder_2.config.projection_dim)
    for name, model in (("unet", models.unet), ("text_encoder", models.text_encoder), ("text_encoder_2", models.text_encoder_2)):
        grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0, name


def test_a_base_of_another_family_stops_before_anything_is_written(tmp_path):
    base = tmp_path / "sd3"
    base.mkdir()
    (base / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModelWithProjection"]}))
    output_dir = tmp_path / "run"
    with pytest.raises(InpaintingModelError, match="StableDiffusion3Pipeline.*SDXL inpainting"):
        train.main(sdxl_args(base, output_dir))
    assert not output_dir.exists()


def test_the_withdrawn_sd2_id_trains_from_the_mirror(tmp_path, monkeypatch, caplog):
    """Offline: the run says once that the id was withdrawn and asks the Hub for the mirror's files (here refused,
    as offline without a cache), before anything is written."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(bases, "_announced", set())
    asked = []

    def offline_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline_download)
    output_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="defectfill"), pytest.raises(InpaintingModelError, match="not in the Hugging Face cache"):
        train.main(sdxl_args("stabilityai/stable-diffusion-2-inpainting", output_dir))
    mirror = "sd2-community/stable-diffusion-2-inpainting"
    assert asked == [(mirror, "model_index.json")]
    assert [r.getMessage() for r in caplog.records if "withdrawn" in r.getMessage()] == [
        f"stabilityai/stable-diffusion-2-inpainting was withdrawn from the Hub by Stability AI in November 2025; "
        f"loading the community mirror {mirror}"]
    assert not output_dir.exists()


def test_the_sdxl_config_is_the_sd2_recipe_at_1024_px_with_the_memory_options():
    """configs/sdxl_inpainting.yaml: the SD2 config's method and optimisation values; what differs is the base, the
    resolution, the batch (4 as 1 x 4 accumulated) and the memory options."""
    from defectfill.cli import load_config

    parser = train.build_parser()
    sdxl = load_config(REPO_ROOT / "configs" / "sdxl_inpainting.yaml", parser)
    sd2 = load_config(REPO_ROOT / "configs" / "sd2_inpainting.yaml", parser)
    differ = {key for key in sd2 if sdxl.get(key) != sd2[key]}
    assert differ == {"pretrained_model_name_or_path", "resolution", "train_batch_size"}
    assert {key: sdxl[key] for key in sorted(set(sdxl) - set(sd2))} == {
        "gradient_accumulation_steps": 4, "gradient_checkpointing": True, "mixed_precision": "bf16", "use_8bit_adam": True}
    assert sdxl["pretrained_model_name_or_path"] == "diffusers/stable-diffusion-xl-1.0-inpainting-0.1"
    assert (sdxl["resolution"], sdxl["train_batch_size"] * sdxl["gradient_accumulation_steps"]) == (1024, sd2["train_batch_size"])
    args = train.parse_args(["--config", str(REPO_ROOT / "configs" / "sdxl_inpainting.yaml"), "--data_dir", "d",
                             "--object_class", "bottle"])
    settings = settings_from_args(TrainingSettings, args)
    assert settings.runtime.gradient_checkpointing and settings.optimization.use_8bit_adam


def test_the_record_and_card_of_an_sd_run_name_its_family_and_a_withdrawn_id_is_recorded_as_its_mirror(tmp_path, monkeypatch):
    """Without training: the SD record names its family and pipeline class, the card's snippet uses that class; a record
    written before those fields (still format 3) reads, and its card is SD's; the withdrawn id is recorded as the mirror."""
    from defectfill.bases import detect_base_family
    from defectfill.runs.records import RunRecord
    from defectfill.training.outputs import run_record, save_model_card
    from defectfill.training.setup import with_resolved_base
    from tests.conftest import TINY_MODEL

    monkeypatch.setattr(bases, "_announced", set())
    settings = settings_from_args(TrainingSettings, sdxl_args(TINY_MODEL, tmp_path / "run"))
    split = {"defect_types": {"color": {"train": ["metal_nut/test/color/000.png"], "test": []}}}
    record = run_record(settings, "color", split, detect_base_family(str(TINY_MODEL)))
    assert (record.base_family, record.pipeline_class) == ("sd", "StableDiffusionInpaintPipeline")
    older = {key: value for key, value in record.to_dict().items() if key not in ("base_family", "pipeline_class")}
    for written in (record, RunRecord.from_dict(older)):
        save_model_card(tmp_path, written, None)
        card = (tmp_path / MODEL_CARD_FILENAME).read_text()
        assert "pipe = StableDiffusionInpaintPipeline.from_pretrained(" in card and "stable-diffusion-xl" not in card
    withdrawn = settings_from_args(TrainingSettings, sdxl_args("stabilityai/stable-diffusion-2-inpainting", tmp_path / "run"))
    resolved = with_resolved_base(withdrawn)
    assert run_record(resolved, "color", split).base_model == "sd2-community/stable-diffusion-2-inpainting"
    assert with_resolved_base(settings) is settings  # any other name is kept as given


def test_a_trained_sdxl_run_feeds_infer_and_the_builder(sdxl_run, tiny_sdxl_path, tmp_path):
    """The seam: the run train_defectfill.py wrote on the SDXL base paints through infer_defectfill.py (its split's
    held-out masks, the pipeline of its family) and through the builder as a named adapter, each output exact
    outside its mask."""
    import build_dataset_defectfill as build
    import infer_defectfill as infer
    from defectfill.runs.files import METADATA_FILENAME
    from defectfill.runs.records import SynthesisRecord

    def first(clean, candidates, mask):  # no LPIPS weights needed: the first candidate is kept
        return [1.0] + [0.0] * (len(candidates) - 1)

    out = infer.main(infer.parse_args(["--lora", str(sdxl_run), "--output_dir", str(tmp_path / "infer"), "--num_images", "2",
                                       "--num_inference_steps", "2", "--num_candidates", "2"]), scorer=first)
    assert SynthesisRecord.read(out).pipeline_class == "StableDiffusionXLInpaintPipeline"
    built = build.main(build.parse_args(["--lora", str(sdxl_run), "--output_dir", str(tmp_path / "build"), "--num_images", "2",
                                         "--num_inference_steps", "2", "--num_candidates", "1", "--seed", "3"]), scorer=first)
    assert SynthesisRecord.read(built).pipeline_class == "StableDiffusionXLInpaintPipeline"
    for folder, count in ((out, 2), (built, 2)):
        rows = [json.loads(line) for line in (folder / METADATA_FILENAME).read_text().splitlines()]
        assert len(rows) == count
        for row in rows:
            painted = np.asarray(Image.open(folder / row["file_name"]).convert("RGB")).astype(int)
            clean = np.asarray(Image.open(row["source_image"]).convert("RGB")).astype(int)
            inside = np.asarray(Image.open(folder / row["mask_file_name"]).convert("L")) >= 128
            assert inside.any() and np.array_equal(painted[~inside], clean[~inside])
