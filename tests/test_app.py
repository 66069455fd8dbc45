"""app_defectfill: the [V*] attention recorded during synthesis, the handlers (runs, masks, errors in the
CLI's words, "add to dataset" in infer's layout), the app through gradio_client, a public server as a
hostile visitor sees it (through gradio_client and raw HTTP), and a real browser (Debian's chromium driven
by Playwright) that paints a stroke and generates, on a local and on a public server."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import shutil
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import app_defectfill as app  # noqa: E402
from defectfill.app import handlers  # noqa: E402
from defectfill.app import runs as app_runs  # noqa: E402
from defectfill.app.browser import find_chromium  # noqa: E402
from defectfill.app.editor import MASK_COLOUR, editor_value, mask_from_editor, mask_layer  # noqa: E402
from defectfill.app.handlers import AppState, Source, inference_dtype, upload_good_image  # noqa: E402
from defectfill.app.policy import AppPolicy, RequestRefused, serving_mode, session_folder_name  # noqa: E402
from defectfill.app.runs import AppPaths, RunInfo, run_summary  # noqa: E402
from defectfill.app.settings import AppSettings, PageDefaults, ServerSettings  # noqa: E402
from defectfill.app.ui import build_app, launch  # noqa: E402
from defectfill.cli import settings_from_args  # noqa: E402
from defectfill.errors import DatasetError, RunFileError, SynthesisError  # noqa: E402
from defectfill.painting import Job, SynthesisResult, SynthesisSettings, mask_at_image_size, prepare_job, synthesize  # noqa: E402
from defectfill.runs.files import LORA_FILENAME, PREVIEW_FILENAME, RUN_FILENAME  # noqa: E402
from defectfill.runs.folder import read_metadata  # noqa: E402
from defectfill.runs.metadata import output_metadata_row  # noqa: E402
from defectfill.runs.records import SynthesisRecord, read_run  # noqa: E402
from defectfill.vstar_map import attention_in_mask, attention_overlay, synthesize_with_attention  # noqa: E402
from tests.conftest import REPO_ROOT, SYNTHETIC_DATA, TINY_MODEL  # noqa: E402

PATHS = AppPaths.of_repository(REPO_ROOT)

CHROMIUM = find_chromium()

DEMO = REPO_ROOT / "models" / "demo-lora-metal_nut-color"
FAST = dict(num_candidates=2, num_inference_steps=2, guidance_scale=7.5, seed=0, crop_to_mask=True)


def settings_of(*flags: str) -> AppSettings:
    """The app's settings as its command line makes them."""
    return settings_from_args(AppSettings, app.parse_args(list(flags)))


def fast_settings(*extra: str) -> AppSettings:
    return settings_of("--num_candidates", "2", "--num_inference_steps", "2", *extra)


@pytest.fixture(scope="module")
def state(offline_lpips_weights) -> AppState:
    """The app's state as the app makes it: LPIPS loads (its AlexNet weights from the offline cache), so selection
    runs."""
    state = AppState.from_settings(fast_settings(), PATHS)
    assert state.scorer is not None and "Low-Fidelity Selection is on" in state.selection_note
    return state


@pytest.fixture(scope="module")
def demo_run() -> RunInfo:
    return app_runs.load_run(str(DEMO), PATHS)


@pytest.fixture(scope="module")
def demo_pipeline(state, demo_run):
    return state.pipeline(demo_run)


def heldout_editor(run: RunInfo, source: Source) -> dict:
    return handlers.pick_heldout_mask(source, str(run.heldout_masks[0]))


# ----------------------------------------------------------------------------------------------------
# synthesis: the [V*] map during synthesis
# ----------------------------------------------------------------------------------------------------


def demo_job(run, settings):
    with Image.open(run.good_images[0]) as image, Image.open(run.heldout_masks[0]) as mask:
        return prepare_job(image, mask, 0, settings)


def test_recording_attention_keeps_the_images_and_restores_the_processors(demo_pipeline, demo_run):
    from attention_processor import VStarCrossAttnProcessor

    settings = SynthesisSettings(prompt=demo_run.prompt, resolution=64, num_candidates=2, num_inference_steps=2)
    job = demo_job(demo_run, settings)
    [plain] = synthesize(demo_pipeline, [job], settings)
    calls = []
    [recorded], [attention] = synthesize_with_attention(demo_pipeline, [job], settings, "sks",
                                                                  on_step=lambda *a: calls.append(a))
    total = len(demo_pipeline.scheduler.timesteps)  # PNDM: one call more than the steps
    assert total >= 2 and calls == [(i, total) for i in range(1, total + 1)]  # one UNet call per step, CFG halves batched
    # The recording processor writes the attention product out (fp32 softmax) instead of SDPA: same images up to rounding.
    difference = np.abs(np.asarray(plain.image, dtype=int) - np.asarray(recorded.image, dtype=int))
    assert difference.max() <= 2
    latent = 64 // demo_pipeline.vae_scale_factor
    assert attention.shape == (latent, latent) and torch.isfinite(attention).all()
    assert 0 <= attention.min() and attention.max() <= 1  # averaged softmax probabilities of one text position
    assert not any(isinstance(p, VStarCrossAttnProcessor) for p in demo_pipeline.unet.attn_processors.values())


def test_attention_is_read_from_the_conditional_rows_under_guidance(demo_pipeline, demo_run):
    """One step: the conditional rows of a guided call see the same input as an unguided call, so the
    [V*] maps agree only if the recorded rows are the second (conditional) half of the doubled batch."""
    maps = []
    for guidance in (1.0, 7.5):
        settings = SynthesisSettings(prompt=demo_run.prompt, resolution=64, num_candidates=2, num_inference_steps=1,
                                               guidance_scale=guidance)
        maps.append(synthesize_with_attention(demo_pipeline, [demo_job(demo_run, settings)], settings, "sks")[1][0])
    assert torch.allclose(maps[0], maps[1], atol=1e-5)


def test_prompt_without_the_token_has_no_attention_map(demo_pipeline, demo_run):
    settings = SynthesisSettings(prompt="A metal nut", resolution=64, num_candidates=1, num_inference_steps=1)
    with pytest.raises(SynthesisError, match="does not contain the \\[V\\*\\] token 'sks'"):
        synthesize_with_attention(demo_pipeline, [demo_job(demo_run, settings)], settings, "sks")


def test_attention_overlay_and_share_inside_the_mask():
    image = Image.new("RGB", (40, 40), (100, 100, 100))
    mask = np.zeros((40, 40), bool)
    mask[10:20, 10:20] = True
    job = Job(0, image, mask, (8, 8, 24, 24), image.crop((8, 8, 24, 24)), Image.new("L", (16, 16)))
    result = SynthesisResult(job, image, [image], [0.0], 0)
    attention = torch.zeros(4, 4)
    attention[1:3, 1:3] = 1.0
    overlay = np.asarray(attention_overlay(result, attention, opacity=0.5)).astype(int)
    assert (overlay[:8] == 50).all() and (overlay[30:] == 50).all()  # outside the region: no heat
    assert (overlay[16, 16] == [178, 178, 178]).all()  # the peak: white heat
    region_mask = np.zeros((16, 16), np.uint8)
    region_mask[4:12, 4:12] = 255
    assert attention_in_mask(attention, region_mask) > 0.7  # bilinear resizing spreads a little
    assert attention_in_mask(attention, 255 - region_mask) < 0.3
    assert attention_in_mask(attention, region_mask) + attention_in_mask(attention, 255 - region_mask) == pytest.approx(1)


# ----------------------------------------------------------------------------------------------------
# Arguments, runs, masks
# ----------------------------------------------------------------------------------------------------


def test_flags_have_help_and_config_files_work(tmp_path):
    parser = app.build_parser()
    assert all(a.help for a in parser._actions)
    config = tmp_path / "app.yaml"
    config.write_text("lora: runs/x\nserver_port: 7999\nshare: false\n")
    settings = settings_of("--config", str(config), "--device", "cpu")
    assert (settings.lora, settings.device, settings.page) == (("runs/x",), "cpu", PageDefaults())
    assert settings.server == ServerSettings(server_name=settings.server.server_name, server_port=7999)
    assert app.parse_args([]).server_name == os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    assert inference_dtype("auto", "cpu") == torch.float32 and inference_dtype("fp16", "cpu") == torch.float16


def test_the_bundled_demo_run_resolves_from_anywhere(demo_run, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # its run file names models/... and data/... relative to the repository
    run = app_runs.load_run(str(DEMO), PATHS)
    assert Path(run.base_model).resolve() == TINY_MODEL.resolve() and run.is_tiny_demo
    assert (run.object_class, run.defect_type, run.token, run.resolution) == ("metal_nut", "color", "sks", 64)
    assert run.prompt == "A metal nut with sks" and run.crop_to_mask
    assert run.good_images and all(p.is_file() for p in run.good_images)
    assert run.heldout_masks and all(p.is_file() and "color" in str(p) for p in run.heldout_masks)
    assert (DEMO / LORA_FILENAME).stat().st_size < 2_000_000


def test_a_folder_of_runs_lists_its_defect_types(tmp_path):
    for defect in ("color", "scratch"):
        shutil.copytree(DEMO, tmp_path / "all" / defect)
        record = json.loads((tmp_path / "all" / defect / RUN_FILENAME).read_text())
        record["defect_type"] = defect
        (tmp_path / "all" / defect / RUN_FILENAME).write_text(json.dumps(record))
    runs = app_runs.list_runs(str(tmp_path / "all"), PATHS)
    assert runs == {f"metal_nut / {d} ({d})": str(tmp_path / "all" / d) for d in ("color", "scratch")}
    assert app_runs.list_runs(str(DEMO), PATHS) == {"metal_nut / color (demo-lora-metal_nut-color)": str(DEMO)}
    assert app_runs.list_runs("you/defectfill-bottle", PATHS) == {"you/defectfill-bottle": "you/defectfill-bottle"}
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFileError, match="holds no training run: no pytorch_lora_weights.safetensors in it or in its subfolders"):
        app_runs.list_runs(str(tmp_path / "empty"), PATHS)


def test_mask_from_editor_layers_at_image_size():
    layer = np.zeros((50, 50, 4), np.uint8)
    layer[10:20, 5:15] = (*MASK_COLOUR, 255)
    mask = mask_from_editor({"background": None, "layers": [Image.fromarray(layer)], "composite": None}, (100, 100))
    assert mask.shape == (100, 100) and mask[20:40, 10:30].all() and mask.sum() == 400
    # black is no stroke: an all-black layer, opaque or without alpha, is an empty mask (as a black mask file is)
    for black in (Image.new("RGBA", (50, 50), (0, 0, 0, 255)), Image.new("RGB", (50, 50)), Image.new("L", (50, 50))):
        assert not mask_from_editor({"background": None, "layers": [black], "composite": None}, (100, 100)).any()
    assert not mask_from_editor(None, (8, 8)).any()
    # a held-out mask shown as a layer comes back as the same mask
    held = Image.open(SYNTHETIC_DATA / "metal_nut" / "ground_truth" / "color" / "004_mask.png")
    shown = editor_value(Image.new("RGB", held.size), mask_at_image_size(held, held.size))
    assert np.array_equal(mask_from_editor(shown, held.size), mask_at_image_size(held, held.size))


# ----------------------------------------------------------------------------------------------------
# Generate and "add to dataset"
# ----------------------------------------------------------------------------------------------------


def test_without_lpips_selection_is_off_and_one_candidate_is_made(demo_run, demo_pipeline, monkeypatch):
    def offline(*args, **kwargs):
        raise SynthesisError("LPIPS needs the torchvision 'alex' backbone weights, which could not be loaded (offline)")

    monkeypatch.setattr(handlers, "LpipsModel", offline)
    state = AppState.from_settings(fast_settings(), PATHS)
    assert state.scorer is None and "Low-Fidelity Selection is off" in state.selection_note
    assert "Low-Fidelity Selection is off" in run_summary(demo_run, state.selection_note, PATHS)
    state._pipeline, state._pipeline_key = demo_pipeline, (demo_run.base_model, demo_run.lora, demo_run.record.base_model)
    source, _ = handlers.pick_good_image(str(demo_run.good_images[1]))
    generated = handlers.generate(state, demo_run, source, heldout_editor(demo_run, source), None, **{**FAST, "num_candidates": 4})
    assert len(generated.result.candidates) == 1 and not generated.selection and "Low-Fidelity Selection off" in generated.status()


def test_bad_input_is_reported_in_the_cli_words(state, demo_run, demo_pipeline, tmp_path):
    source, empty_editor = handlers.pick_good_image(str(demo_run.good_images[0]))
    with pytest.raises(SynthesisError, match=r"the painted mask is empty \(no pixel >= 128\); nothing to inpaint"):
        handlers.generate(state, demo_run, source, empty_editor, None, **FAST)
    with pytest.raises(SynthesisError, match="no good image"):
        handlers.generate(state, demo_run, None, empty_editor, None, **FAST)
    (tmp_path / "not_an_image.png").write_text("hello")
    with pytest.raises(DatasetError, match="good image .*not_an_image.png cannot be read as an image"):
        handlers.pick_good_image(str(tmp_path / "not_an_image.png"))
    with pytest.raises(SynthesisError, match="nothing to add yet"):
        handlers.add_to_dataset(None, str(tmp_path / "out"))


def test_lora_of_another_base_model_is_named(demo_run, tmp_path):
    other = tmp_path / "other_run"
    shutil.copytree(DEMO, other)
    weights = load_file(other / LORA_FILENAME)
    key = next(k for k in weights if k.startswith("unet.") and ("lora.down" in k or "lora_A" in k))
    weights[key] = torch.zeros(weights[key].shape[0], weights[key].shape[1] * 2)
    save_file(weights, other / LORA_FILENAME)
    run = app_runs.load_run(str(other), PATHS)
    fresh = AppState(fast_settings(), None, "off", PATHS)
    source, _ = handlers.pick_good_image(str(run.good_images[0]))
    with pytest.raises(SynthesisError, match=r"trained on .*tiny-sd2-inpainting.*expects input size \d+, the base model has in_features"):
        handlers.generate(fresh, run, source, heldout_editor(run, source), None, **FAST)


def test_generate_then_add_to_dataset_writes_what_infer_writes(state, demo_run, demo_pipeline, tmp_path):
    import dataset_mvtec as dm
    import infer_defectfill as infer

    source, _ = handlers.pick_good_image(str(demo_run.good_images[0]))
    picked = handlers.generate(state, demo_run, source, heldout_editor(demo_run, source), str(demo_run.heldout_masks[0]), **FAST)
    result = picked.result
    assert len(result.candidates) == 2 and result.chosen == int(np.argmax(result.scores)) and picked.selection
    assert sum("✓ chosen" in c for c in picked.captions()) == 1 and "LPIPS in mask" in picked.captions()[0]
    clean, out = np.asarray(source.image), np.asarray(result.image)
    assert out.shape == clean.shape and np.array_equal(out[~result.job.mask], clean[~result.job.mask])
    assert picked.overlay.size == source.image.size and 0 <= picked.attention_share <= 1
    assert "[V*] attention falls inside the mask" in picked.status()

    folder = tmp_path / "app"
    handlers.add_to_dataset(picked, str(folder))
    uploaded, editor = upload_good_image(np.asarray(Image.open(demo_run.good_images[2])))
    editor["layers"] = [mask_layer(np.pad(np.ones((20, 30), bool), ((50, 58), (40, 58))), uploaded.image.size)]
    painted = handlers.generate(state, demo_run, uploaded, editor, None, **{**FAST, "seed": 3})
    _, row = handlers.add_to_dataset(painted, str(folder))

    rows = read_metadata(folder)
    assert sorted(rows) == ["images/00000.png", "images/00001.png"]
    # the row infer_defectfill.py writes for the same pair and result (its settings resolved from the same run)
    plan = infer.resolve_plan(infer.parse_args(["--lora", str(DEMO), "--num_inference_steps", "2"]), read_run(str(DEMO)))
    pair = infer.Pair(0, demo_run.good_images[0], demo_run.heldout_masks[0])
    row_fields = output_metadata_row(result, pair.image_path, pair.mask_path, plan.settings, plan.object_class,
                                               plan.defect_type)
    expected = {"file_name": "images/00000.png", "mask_file_name": "masks/00000_mask.png", **row_fields}
    assert rows["images/00000.png"] == json.loads(json.dumps(expected))
    assert Path(row["source_image"]) == folder / "sources" / "00001.png" and Path(row["source_image"]).is_file()
    assert row["source_mask"] == str(folder / "masks" / "00001_mask.png") and row["seed"] == 3
    assert np.array_equal(np.asarray(Image.open(folder / "images" / "00001.png")), np.asarray(painted.result.image))
    assert np.array_equal(np.asarray(Image.open(folder / "masks" / "00001_mask.png")) > 0, painted.result.job.mask)
    assert SynthesisRecord.read(folder).lora == str(DEMO) and (folder / PREVIEW_FILENAME).is_file()
    assert len(dm.load_synthetic(folder)) == 2


# ----------------------------------------------------------------------------------------------------
# The app served: gradio_client, and a real browser
# ----------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(blocks, policy: AppPolicy):
    launch(blocks, policy, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, share=False, quiet=True)
    return blocks.local_url


@pytest.fixture(scope="module")
def server(state):
    blocks = build_app(state)
    try:
        yield serve(blocks, AppPolicy.local(PATHS))
    finally:
        blocks.close()


@pytest.fixture(scope="module")
def public_root(tmp_path_factory) -> Path:
    """What a public server's visitor aims at: the dataset root (datasets/) and the folders beside it."""
    return tmp_path_factory.mktemp("public")


@pytest.fixture(scope="module")
def public_server(state, public_root):
    """The app as a Space serves it (--public, on 127.0.0.1 here), sharing the test state's loaded pipeline."""
    settings = settings_of("--public", "--lora", str(DEMO), "--output_dir", str(public_root / "datasets"),
                           "--num_candidates", "2", "--num_inference_steps", "2")
    policy = AppPolicy.from_settings(settings, PATHS)
    blocks = build_app(state, policy=policy)
    try:
        yield serve(blocks, policy)
    finally:
        blocks.close()


@pytest.mark.slow
def test_the_app_through_gradio_client(server, demo_run, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(server, verbose=False, download_files=str(tmp_path / "downloads"))
    choices = client.predict(str(DEMO), api_name="/list_runs")
    client.predict(str(DEMO), api_name="/load_run")
    client.predict(str(demo_run.good_images[0]), api_name="/pick_good_image")
    empty = {"background": handle_file(str(demo_run.good_images[0])), "layers": [], "composite": None}
    with pytest.raises(AppError, match=r"the painted mask is empty \(no pixel >= 128\); nothing to inpaint"):
        client.predict(empty, "", 2, 2, 7.5, 0, True, api_name="/generate")

    # the app keeps working: a held-out mask shown in the editor, then Generate
    shown = client.predict(str(demo_run.heldout_masks[0]), api_name="/pick_heldout_mask")  # files the client downloaded
    editor = {"background": handle_file(shown["background"]), "layers": [handle_file(f) for f in shown["layers"]], "composite": None}
    gallery, result, mask, attention, status, files = client.predict(
        editor, str(demo_run.heldout_masks[0]), 2, 2, 7.5, 0, True, api_name="/generate")
    items = gallery["value"]  # a gr.update: the candidates, and the chosen one selected
    chosen = [i for i, item in enumerate(items) if "✓ chosen" in (item.get("caption") or "")]
    assert len(items) == 2 and chosen == [gallery["selected_index"]] and "LPIPS in mask" in items[0]["caption"]
    clean = np.asarray(Image.open(demo_run.good_images[0]).convert("RGB"))
    label = np.asarray(Image.open(mask)) > 0
    out = np.asarray(Image.open(result).convert("RGB"))
    assert label.any() and np.array_equal(out[~label], clean[~label]) and "chosen" in status
    assert sorted(Path(f).name.endswith("_mask.png") for f in files) == [False, True]
    assert Image.open(attention).size == Image.open(result).size

    added = client.predict(str(tmp_path / "dataset"), api_name="/add_to_dataset")
    assert "images/00000.png" in added and len(read_metadata(tmp_path / "dataset")) == 1
    assert choices is not None


# ----------------------------------------------------------------------------------------------------
# Public mode: what a server others reach accepts
# ----------------------------------------------------------------------------------------------------


def test_public_mode_is_on_for_a_server_others_reach(monkeypatch, capsys):
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)

    def public(*flags: str, environ: dict | None = None) -> bool:
        args = app.parse_args(list(flags))
        return serving_mode(args.public, args.private, args.share, args.server_name, environ or {})[0]

    assert not public() and not public("--server_name", "localhost") and not public("--server_name", "::1")
    assert public("--share") and public("--server_name", "0.0.0.0") and public("--server_name", "myhost") and public("--public")
    assert public(environ={"SPACE_ID": "you/defectfill"})
    assert not public("--private", "--server_name", "0.0.0.0") and not public("--private", environ={"SPACE_ID": "you/defectfill"})
    for flags, message in [(["--private", "--share"], "--private cannot be used with --share"),
                           (["--public", "--private"], "not allowed with argument"),
                           (["--public", "--num_inference_steps", "80"],
                            r"--num_inference_steps 80 is outside what a public server accepts \(1 to 50\)")]:
        with pytest.raises(SystemExit):
            app.parse_args(flags)
        assert re.search(message, capsys.readouterr().err), flags
    assert app.parse_args(["--num_inference_steps", "80"]).num_inference_steps == 80  # local mode: the page's range


def test_the_readme_space_recipe_starts_in_public_mode(monkeypatch):
    """The `app.py` docs/app.md gives a Space, with what a Space sets: public mode, on the run it names only."""
    readme = (REPO_ROOT / "docs" / "app.md").read_text()
    recipe = re.search(r"# app\.py of the Space\n(.*?)```", readme, re.S).group(1)
    flags = ast.literal_eval(re.search(r"parse_args\((\[.*?\])\)", recipe, re.S).group(1))
    space = {"SPACE_ID": "you/defectfill", "GRADIO_SERVER_NAME": "0.0.0.0"}
    for name, value in space.items():
        monkeypatch.setenv(name, value)
    policy = AppPolicy.from_settings(settings_of(*flags), PATHS, environ=space)
    assert policy.public and "SPACE_ID" in policy.reason and list(policy.runs) == [flags[flags.index("--lora") + 1]]
    assert policy.dataset_root == (Path.cwd() / "outputs" / "app-datasets").resolve() and policy.datasets


def test_the_policy_checks_every_value_a_client_sends(demo_run, tmp_path):
    policy = AppPolicy(PATHS, public=True, reason="test", locations=[str(DEMO)], runs={"demo": str(DEMO)},
                       dataset_root=tmp_path / "datasets")
    assert policy.settings(num_candidates=2.0, num_inference_steps=50, guidance_scale=7.5, seed=3) == {
        "num_candidates": 2, "num_inference_steps": 50, "guidance_scale": 7.5, "seed": 3}
    for name, value, message in [("num_candidates", 9, "Candidates: 9 is not accepted; this server takes an integer from 1 to 8"),
                                 ("num_inference_steps", 0, "from 1 to 50"), ("num_candidates", 2.5, "an integer"),
                                 ("guidance_scale", float("nan"), "a number from 1 to 15"), ("seed", -1, "from 0 to 4294967295"),
                                 ("num_inference_steps", "many", "Denoising steps: expected a number, got 'many'")]:
        with pytest.raises(RequestRefused, match=re.escape(message)):
            policy.settings(**{name: value})
    assert AppPolicy.local(PATHS).settings(num_candidates=99) == {"num_candidates": 99}  # local mode: as given

    assert policy.run_for("demo") == str(DEMO) and policy.run_choices("") == {"demo": "demo"}
    for value in (str(DEMO), "you/defectfill-bottle", "models/demo-lora-metal_nut-color"):
        with pytest.raises(RequestRefused, match="not one of the runs this server was started with"):
            policy.run_for(value)
    label, path = next(iter(policy.good_labels(demo_run).items()))
    assert label == "train/good/000.png" and policy.good_image(demo_run, label) == path == str(demo_run.good_images[0])
    for value in (path, "../../../../etc/hostname", "train/good/../../../../etc/hostname", "train\\\\good\\\\000.png"):
        with pytest.raises(RequestRefused, match="is not one of this run's good images"):
            policy.good_image(demo_run, value)
    with pytest.raises(RequestRefused, match="no run loaded"):
        policy.heldout_mask(None, "color/004_mask.png")
    assert policy.heldout_mask(demo_run, "") is None

    # what the page shows: relative to the repository, the run, its data or the dataset root; else a name alone
    assert policy.shown(demo_run.good_images[0]) == "data/synthetic_mvtec/metal_nut/train/good/000.png"
    assert policy.shown(tmp_path / "datasets" / "session-x") == "session-x" and policy.shown("you/run") == "you/run"
    assert policy.public_text("/srv/runs/x/file.png: not JSON; see /srv/runs/x.") == "file.png: not JSON; see x."
    assert AppPolicy.local(PATHS).public_text("/srv/runs/x/file.png") == "/srv/runs/x/file.png"

    # the session's folder: a digest of the session id, whatever the id holds
    assert re.fullmatch(r"session-[0-9a-f]{16}", session_folder_name("../../etc")) and session_folder_name("a") != session_folder_name("b")
    assert policy.dataset_folder("", "abc") == tmp_path / "datasets" / session_folder_name("abc")
    with pytest.raises(RequestRefused, match="needs a browser session"):
        policy.dataset_folder("", None)
    with pytest.raises(RequestRefused, match="'Add to dataset' is off on this server"):
        dataclasses.replace(policy, datasets=False).dataset_folder("", "abc")


def png_bomb(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit black PNG of width x height: a few kilobytes on disk, width x height pixels decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row, packer = b"\0" * (1 + (width + 7) // 8), zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def files_under(*roots: Path) -> set[Path]:
    """Every file and link under `roots` (links not followed; caches of Python and pytest left out)."""
    found = set()
    for root in roots:
        for parent, folders, files in os.walk(root):
            folders[:] = [f for f in folders if f not in ("__pycache__", ".pytest_cache", ".git")]
            found.update(Path(parent) / name for name in files + [f for f in folders if (Path(parent) / f).is_symlink()])
    return found


def strings_in(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings_in(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in strings_in(v)]
    return []


def test_the_editor_of_a_public_server_caps_what_the_browser_uploads(tmp_path):
    """The browser's mask editor sends its images to `accept_blobs` before an event: a layer number past the cap,
    an image with too many pixels, a form without its session are refused (HTTP 400 with the message), and more
    pending edits than a session's cap push out that session's oldest only."""
    from types import SimpleNamespace

    import gradio as gr
    from fastapi import HTTPException

    from defectfill.app.components import guard_image_editor
    from defectfill.app.policy import PublicLimits

    limits = PublicLimits(max_pending_editor_uploads=2)
    editor = guard_image_editor(gr.ImageEditor(type="pil", layers=False), limits)
    small, bomb = io_png(Image.new("L", (8, 8))), png_bomb(tmp_path / "bomb.png", 6000, 6000).read_bytes()

    def send(session: str | None, edit: str, kind: str, index, data: bytes):
        return editor.accept_blobs(SimpleNamespace(data={"id": edit, "type": kind, "index": index, "session_hash": session},
                                                   files=[("f.png", data)]))

    for args, message in [(("s", "a", "layer", "99", small), "the mask editor sent layer '99'; this server takes at most 4"),
                          (("s", "a", "background", None, bomb), "an image of the mask editor has 36,000,000 pixels"),
                          ((None, "a", "background", None, small), "names its session, its edit id and its type")]:
        with pytest.raises(HTTPException) as refused:
            send(*args)
        assert refused.value.status_code == 400 and message in refused.value.detail
    send("other", "x", "background", None, small)
    for edit in ("a", "b", "c"):
        send("s", edit, "background", None, small)
        send("s", edit, "layer", "0", small)
    assert list(editor.pending._edits) == [("other", "x"), ("s", "b"), ("s", "c")]  # the session's oldest is dropped
    assert guard_image_editor(plain := gr.ImageEditor(), None) is plain and "accept_blobs" not in vars(plain)  # local mode: Gradio's own


def io_png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_a_public_server_refuses_what_a_visitor_may_not_ask(public_server, public_root, demo_run, tmp_path):
    """A visitor drives the public server's API as the page does, and beyond: every path, run, file or size the
    server did not offer is refused with a message in the app, no server path comes back, and nothing is written
    outside the dataset root."""
    import httpx
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    datasets, outside, elsewhere = public_root / "datasets", public_root / "outside", public_root / "elsewhere"
    outside.mkdir()
    elsewhere.mkdir()
    before = files_under(public_root, REPO_ROOT)
    server_paths = (str(REPO_ROOT), str(public_root), str(DEMO))

    def no_server_path(value):
        leaked = [s for s in strings_in(value) if any(p in s for p in server_paths)]
        assert leaked == []
        return value

    client = Client(public_server, verbose=False, download_files=str(tmp_path / "downloads"))
    folder_name = session_folder_name(client.session_hash)

    def refused(message: str, *inputs, api_name: str):
        with pytest.raises(AppError, match=message):
            client.predict(*inputs, api_name=api_name)

    # runs: the ones given at launch, by label; no folder or Hub id
    runs = no_server_path(client.predict("", api_name="/list_runs"))
    [(label, value)] = runs["choices"]
    assert label == value == "metal_nut / color (demo-lora-metal_nut-color)"
    for location in (str(DEMO), "models/demo-lora-metal_nut-color", "you/defectfill-bottle", str(public_root / "missing")):
        refused(re.escape(f"this server serves only the runs it was started with; a run folder or Hub id ({location!r})"),
                location, api_name="/list_runs")
        refused("is not one of the runs this server was started with", location, api_name="/load_run")
    summary, goods, masks, _, _, dataset_box = no_server_path(client.predict(label, api_name="/load_run"))
    assert "`models/demo-lora-metal_nut-color`" in summary and dataset_box == folder_name
    assert [g for g, _ in goods["choices"]] == [v for _, v in goods["choices"]] and goods["value"] == "train/good/000.png"
    mask_label = masks["choices"][1][1]
    assert mask_label == "color/" + demo_run.heldout_masks[0].name

    # good images and masks: a label of the run's lists; no path, nothing with separators of its own
    for name in (str(demo_run.good_images[0]), "../../../../etc/hostname", "train/good/../../../../../etc/hostname", "/etc/hostname"):
        refused("is not one of this run's good images", name, api_name="/pick_good_image")
        refused("is not one of this run's held-out masks", name, api_name="/pick_heldout_mask")
    no_server_path(client.predict("train/good/000.png", api_name="/pick_good_image"))
    shown = no_server_path(client.predict(mask_label, api_name="/pick_heldout_mask"))
    editor = {"background": handle_file(shown["background"]), "layers": [handle_file(f) for f in shown["layers"]], "composite": None}
    refused("is not one of this run's held-out masks", editor, str(demo_run.heldout_masks[0]), 2, 2, 7.5, 0, True,
            api_name="/generate")
    refused("greater than maximum value 50", editor, mask_label, 2, 500, 7.5, 0, True, api_name="/generate")
    refused("greater than maximum value 8", editor, mask_label, 9, 2, 7.5, 0, True, api_name="/generate")

    # uploads: Gradio's size limit (the client's check, and the server's), then the pixel count before decoding
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (11 * 1024 * 1024))
    with pytest.raises(ValueError, match="exceeds the maximum file size of 10485760 bytes"):
        client.predict(handle_file(str(big)), api_name="/upload_good_image")
    with big.open("rb") as handle:
        answer = httpx.post(f"{public_server}gradio_api/upload", files={"files": ("big.png", handle, "image/png")})
    assert answer.status_code == 413 and "File size exceeded maximum allowed size of 10485760 bytes" in answer.text
    bomb = png_bomb(tmp_path / "bomb.png", 6000, 6000)
    huge = png_bomb(tmp_path / "huge.png", 20000, 20000)
    assert bomb.stat().st_size < 100_000 and huge.stat().st_size < 100_000
    refused(re.escape("the uploaded image has 36,000,000 pixels; this server accepts images of at most 16,777,216 pixels"),
            handle_file(str(bomb)), api_name="/upload_good_image")
    refused("the uploaded image is too large to be decoded", handle_file(str(huge)), api_name="/upload_good_image")
    bomb_layer = {**editor, "layers": [handle_file(str(bomb))]}
    refused("an image of the mask editor has 36,000,000 pixels", bomb_layer, mask_label, 2, 2, 7.5, 0, True, api_name="/generate")
    assert httpx.get(f"{public_server}gradio_api/file={REPO_ROOT / 'README.md'}").status_code == 403  # Gradio serves no server file

    # the app keeps working: Generate, then add to this session's folder; no other folder is accepted
    *_, status, files = no_server_path(client.predict(editor, mask_label, 2, 2, 7.5, 0, True, api_name="/generate"))
    assert "chosen" in status and len(files) == 2
    for folder in (str(outside), os.path.relpath(outside, Path.cwd()), "../../../../outside", f"{folder_name}/../../outside",
                   str(datasets / folder_name), "other-session"):
        refused(re.escape(f"'Add to dataset' writes only to this session's folder ({folder_name}) on this server; "
                          f"a folder of your choice ({folder!r}) is not accepted"), folder, api_name="/add_to_dataset")
    added = no_server_path(client.predict(folder_name, api_name="/add_to_dataset"))
    assert added.startswith(f"Added `images/00000.png` (mask `masks/00000_mask.png`) to `{folder_name}`")
    assert len(read_metadata(datasets / folder_name)) == 1

    # a symbolic link inside the dataset root that leads out of it: nothing is written through it
    (datasets / folder_name / "sources").symlink_to(elsewhere, target_is_directory=True)
    refused(re.escape(f"the dataset folder {folder_name} holds a symbolic link ({folder_name}/sources); nothing was written"),
            "", api_name="/add_to_dataset")
    (datasets / folder_name / "sources").unlink()
    (datasets / folder_name).rename(datasets / "set-aside")
    (datasets / folder_name).symlink_to(elsewhere, target_is_directory=True)
    refused(f"the dataset folder {folder_name} is a symbolic link out of the dataset root", "", api_name="/add_to_dataset")

    written = files_under(public_root, REPO_ROOT) - before
    assert written and {p for p in written if not p.is_relative_to(datasets)} == set()
    assert not any(outside.iterdir()) and not any(elsewhere.iterdir())


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium executable (Debian: apt-get install chromium; .ci/run installs it)")
@pytest.mark.parametrize("served, mode", [("server", "Local mode"), ("public_server", "Public mode")])
def test_a_browser_paints_a_stroke_and_generates(served, mode, request, demo_run, tmp_path):
    """Debian's chromium, headless, through Playwright: paint a stroke, Generate, read the result's pixels; on a
    local server and on a public one (the page says which)."""
    playwright = pytest.importorskip("playwright.sync_api")
    from defectfill.app.browser import paint_stroke_and_generate

    url = request.getfixturevalue(served)
    clean = np.asarray(Image.open(demo_run.good_images[0]).convert("RGB"))
    screenshot = tmp_path / "app.png"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1250})
            result, mask = paint_stroke_and_generate(page, url)
            page.screenshot(path=str(screenshot), full_page=True)
            assert "chosen" in page.inner_text("#status") and page.locator("#gallery img").count() >= 1
            assert page.inner_text("#mode").startswith(mode)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
    result, mask = np.asarray(result.convert("RGB")), np.asarray(mask.convert("L")) > 0
    # the stroke: a horizontal band through the middle of the image
    rows, cols = np.nonzero(mask)
    assert mask.any() and abs(rows.mean() - mask.shape[0] / 2) < mask.shape[0] / 8
    assert abs(cols.mean() - mask.shape[1] / 2) < mask.shape[1] / 8
    assert np.ptp(cols) > 2 * np.ptp(rows)
    assert result.shape == clean.shape
    assert np.array_equal(result[~mask], clean[~mask])  # outside the stroke: not one pixel changed
    assert np.abs(result[mask].astype(int) - clean[mask].astype(int)).mean() > 2  # inside: painted
