"""Synthesis on SDXL inpainting, on the tiny offline SDXL model (64 px, 2 steps): infer, the builder and the app paint
an SDXL run (a LoRA written as `StableDiffusionXLInpaintPipeline.save_lora_weights` writes it, with its run record:
tests/helpers/sdxl_run.py) with `StableDiffusionXLInpaintPipeline`; a base DefectFill does not support is refused before
any weight loads; a run recorded on the withdrawn SD2 id paints with the mirror."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import build_dataset_defectfill as build
import infer_defectfill as infer
from defectfill import bases, pipelines
from defectfill.app import handlers
from defectfill.app import runs as app_runs
from defectfill.app.runs import AppPaths
from defectfill.app.settings import AppSettings
from defectfill.build.plan import discover_runs
from defectfill.errors import BuildError, SynthesisError
from defectfill.painting import SynthesisSettings, prepare_job, synthesize
from defectfill.runs.files import LORA_FILENAME, METADATA_FILENAME, RUN_FILENAME
from defectfill.runs.records import RunRecord, SynthesisRecord
from defectfill.runs.settings import plan_run
from tests.conftest import REPO_ROOT, SYNTHETIC_DATA, TINY_MODEL
from tests.helpers.sdxl_run import make_sdxl_run

WITHDRAWN, MIRROR = "stabilityai/stable-diffusion-2-inpainting", "sd2-community/stable-diffusion-2-inpainting"
SIZE = 64
FAST = ("--num_inference_steps", "2", "--num_candidates", "2")


class FirstScorer:
    """Known scores: the first candidate is the most defect-like."""

    def __call__(self, clean, candidates, mask):
        return [1.0] + [0.0] * (len(candidates) - 1)


@pytest.fixture(scope="module")
def sdxl_runs(tiny_sdxl_path, tmp_path_factory) -> Path:
    """Two SDXL runs of metal_nut (color, scratch) in one folder, as `--defect_type all` leaves them."""
    folder = tmp_path_factory.mktemp("sdxl_runs") / "metal_nut"
    for seed, defect_type in enumerate(("color", "scratch"), start=1):
        make_sdxl_run(tiny_sdxl_path, folder / defect_type, defect_type, seed=seed)
    return folder


def small_pair(tmp_path: Path) -> tuple[Path, Path]:
    image = Image.open(SYNTHETIC_DATA / "metal_nut" / "test" / "good" / "001.png").resize((SIZE, SIZE), Image.BICUBIC)
    mask = Image.open(SYNTHETIC_DATA / "metal_nut" / "ground_truth" / "color" / "004_mask.png").resize((SIZE, SIZE), Image.NEAREST)
    image.save(tmp_path / "good.png")
    mask.save(tmp_path / "mask.png")
    return tmp_path / "good.png", tmp_path / "mask.png"


def unet_calls(pipeline):
    """(the list that grows by one per UNet call, the hook to remove)."""
    calls = []
    return calls, pipeline.unet.register_forward_hook(lambda module, args, output: calls.append(1))


# ------------------------------------------------------------------------------------------------ infer


def test_infer_paints_an_sdxl_run_with_the_sdxl_pipeline(sdxl_runs, tiny_sdxl_path, tmp_path):
    """Outside the mask every pixel is the clean image's; inside, the LoRA paints something else than the base alone;
    the record names the pipeline class, and the 2 steps are 2 UNet calls (SDXL's default strength would drop one)."""
    run = sdxl_runs / "color"
    image_path, mask_path = small_pair(tmp_path)
    args = infer.parse_args(["--lora", str(run), "--output_dir", str(tmp_path / "out"), *FAST,
                             "--image_path", str(image_path), "--mask_path", str(mask_path)])
    out = infer.main(args, scorer=FirstScorer())
    record = SynthesisRecord.read(out)
    assert record.pipeline_class == "StableDiffusionXLInpaintPipeline" and record.unet_passes_per_image == 2 * 2
    assert record.pretrained_model_name_or_path == str(tiny_sdxl_path)
    row = json.loads((out / METADATA_FILENAME).read_text().splitlines()[0])
    painted = np.asarray(Image.open(out / row["file_name"]).convert("RGB")).astype(int)
    clean = np.asarray(Image.open(image_path).convert("RGB")).astype(int)
    inside = np.asarray(Image.open(mask_path)) >= 128
    assert np.array_equal(painted[~inside], clean[~inside]) and row["candidate"] == 0

    base = pipelines.load_pipeline(str(tiny_sdxl_path), device="cpu")
    assert type(base).__name__ == "StableDiffusionXLInpaintPipeline"
    settings = SynthesisSettings("A metal nut with sks", resolution=SIZE, num_candidates=2, num_inference_steps=2)
    with Image.open(image_path) as image, Image.open(mask_path) as mask:
        job = prepare_job(image, mask, 0, settings)
    calls, hook = unet_calls(base)
    try:
        [without_lora] = synthesize(base, [job], settings, FirstScorer())
    finally:
        hook.remove()
    assert len(calls) == 2  # one (guided) UNet call per step: strength 1.0 keeps every step
    plain = np.asarray(without_lora.image.convert("RGB")).astype(int)
    assert np.array_equal(plain[~inside], clean[~inside])
    assert np.abs(painted[inside] - plain[inside]).max() > 0


def test_an_sdxl_lora_on_an_sd_base_names_both(sdxl_runs, tiny_pipeline, tiny_sdxl_path):
    with pytest.raises(SynthesisError, match=r"an SDXL LoRA \(it has text_encoder_2 layers\).*StableDiffusionInpaintPipeline. "
                                             r"Use --pretrained_model_name_or_path .*tiny-sdxl-inpainting"):
        pipelines.check_lora_fits(tiny_pipeline, str(sdxl_runs / "color"), str(tiny_sdxl_path), str(TINY_MODEL))


# ------------------------------------------------------------------------------------------------ builder


def test_the_builder_paints_with_two_sdxl_runs_as_named_adapters(sdxl_runs, tmp_path, monkeypatch):
    import diffusers

    loads = []
    real_load = diffusers.StableDiffusionXLInpaintPipeline.load_lora_weights
    monkeypatch.setattr(diffusers.StableDiffusionXLInpaintPipeline, "load_lora_weights",
                        lambda self, *a, **k: loads.append(k.get("adapter_name")) or real_load(self, *a, **k))
    out = build.main(build.parse_args(["--lora", str(sdxl_runs), "--output_dir", str(tmp_path / "build"), "--num_images", "1",
                                       "--num_inference_steps", "2", "--num_candidates", "1", "--seed", "3"]))
    assert loads == ["color", "scratch"]
    rows = [json.loads(line) for line in (out / METADATA_FILENAME).read_text().splitlines()]
    assert sorted(row["defect_type"] for row in rows) == ["color", "scratch"]
    for row in rows:
        image = np.asarray(Image.open(out / row["file_name"]).convert("RGB"))
        assert image.shape[:2] == (128, 128) and np.isfinite(image).all()


def test_a_run_on_the_withdrawn_id_and_one_on_the_mirror_share_a_base(tmp_path):
    for defect_type, base in (("color", WITHDRAWN), ("scratch", MIRROR)):
        folder = tmp_path / "runs" / defect_type
        folder.mkdir(parents=True)
        (folder / LORA_FILENAME).write_bytes(b"")
        RunRecord(base_model=base, token="sks", object_class="metal_nut", defect_type=defect_type, defect_prompt="A photo of sks",
                  object_prompt="A metal nut with sks", resolution=64, split={"defect_types": {}}).write(folder)
    runs = discover_runs([str(tmp_path / "runs")])
    assert {run.base_model for run in runs} == {MIRROR}
    (tmp_path / "runs" / "scratch" / RUN_FILENAME).write_text(
        (tmp_path / "runs" / "scratch" / RUN_FILENAME).read_text().replace(MIRROR, "models/other"))
    with pytest.raises(BuildError, match="mix base_models"):
        discover_runs([str(tmp_path / "runs")])


# ------------------------------------------------------------------------------------------------ app


def test_the_app_generates_once_with_an_sdxl_run_and_its_vstar_map(sdxl_runs):
    paths = AppPaths.of_repository(REPO_ROOT)
    run = app_runs.load_run(str(sdxl_runs / "color"), paths)
    state = handlers.AppState(AppSettings(device="cpu"), FirstScorer(), "on", paths)
    source, _ = handlers.pick_good_image(str(run.good_images[0]))
    editor = handlers.pick_heldout_mask(source, str(run.heldout_masks[0]))
    generated = handlers.generate(state, run, source, editor, None, num_candidates=2, num_inference_steps=2,
                                  guidance_scale=7.5, seed=0, crop_to_mask=False)
    assert type(state.pipeline(run)).__name__ == "StableDiffusionXLInpaintPipeline"
    result = generated.result
    clean, painted = np.asarray(source.image).astype(int), np.asarray(result.image.convert("RGB")).astype(int)
    assert np.array_equal(painted[~result.job.mask], clean[~result.job.mask])
    # the [V*] map: the latent grid of the 64 px region (SDXL's tiny VAE halves it), from both tokenizers' positions
    assert generated.attention.shape == (SIZE // 2, SIZE // 2) and torch.isfinite(generated.attention).all()
    assert generated.attention.max() > 0 and 0 <= generated.attention_share <= 1
    assert generated.overlay.size == source.image.size


# ------------------------------------------------------------------------------------------------ bases


def sd3_like(folder: Path) -> Path:
    """The config files of an SD3 pipeline (no weights: the error must come first)."""
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
    }))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler"}))
    return folder


def test_a_base_we_do_not_support_is_refused_before_any_weight_loads(tmp_path, monkeypatch):
    import diffusers

    def no_load(*args, **kwargs):
        raise AssertionError("weights loaded before the base was checked")

    for name in ("StableDiffusionInpaintPipeline", "StableDiffusionXLInpaintPipeline"):
        monkeypatch.setattr(getattr(diffusers, name), "from_pretrained", no_load)
    base = str(sd3_like(tmp_path / "sd3"))
    supported = r"StableDiffusion3Pipeline \(transformer SD3Transformer2DModel\); DefectFill supports .*SDXL inpainting"
    with pytest.raises(SynthesisError, match=supported):
        pipelines.check_scheduler(None, base)
    with pytest.raises(SynthesisError, match=supported):
        pipelines.check_scheduler("DPMSolverMultistepScheduler", base)
    with pytest.raises(SynthesisError, match=supported):
        pipelines.load_pipeline(base, device="cpu")


def test_a_run_recorded_on_the_withdrawn_sd2_id_paints_with_the_mirror(tmp_path, monkeypatch, caplog):
    """Offline: the family detection and the pipeline load are stood in for (they would read the Hub); what matters
    is the name they are asked for, said once, and recorded in synthesis.json."""
    import diffusers

    run = tmp_path / "run"
    shutil.copytree(REPO_ROOT / "models" / "demo-lora-metal_nut-color", run)
    payload = json.loads((run / RUN_FILENAME).read_text())
    payload.update(base_model=WITHDRAWN, data_dir=str(SYNTHETIC_DATA))
    (run / RUN_FILENAME).write_text(json.dumps(payload))
    record = RunRecord.read(run)
    monkeypatch.setattr(bases, "_announced", set())
    with caplog.at_level(logging.WARNING, logger="defectfill"):
        assert plan_run(str(run), record).base_model == MIRROR
        assert plan_run(str(run), record).base_model == MIRROR
    assert sum("withdrawn" in message and MIRROR in message for message in caplog.messages) == 1

    asked, real = [], diffusers.StableDiffusionInpaintPipeline.from_pretrained
    monkeypatch.setattr(pipelines, "detect_base_family", lambda name, revision=None: asked.append(name) or bases.BaseFamily(
        name, "sd", "StableDiffusionInpaintPipeline", False, False, 9))
    monkeypatch.setattr(diffusers.StableDiffusionInpaintPipeline, "from_pretrained",
                        classmethod(lambda cls, name, **kwargs: asked.append(name) or real(str(TINY_MODEL), **kwargs)))
    # the resolution check reads the base's VAE config (the Hub for the mirror): the tiny model's, asked by the same name
    real_scale = infer.base_vae_scale_factor
    monkeypatch.setattr(infer, "base_vae_scale_factor",
                        lambda name, *args, **kwargs: asked.append(name) or real_scale(str(TINY_MODEL), *args, **kwargs))
    image_path, mask_path = small_pair(tmp_path)
    out = infer.main(infer.parse_args(["--lora", str(run), "--output_dir", str(tmp_path / "out"), "--num_inference_steps", "2",
                                       "--num_candidates", "1", "--image_path", str(image_path), "--mask_path", str(mask_path)]))
    assert asked and set(asked) == {MIRROR}
    synthesis = SynthesisRecord.read(out)
    assert synthesis.pretrained_model_name_or_path == MIRROR and synthesis.pipeline_class == "StableDiffusionInpaintPipeline"
