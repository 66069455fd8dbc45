#!/usr/bin/env python
"""DefectFill in the browser: pick a trained run, a good image and a mask (painted, or one of the run's
held-out masks), generate candidates, see their LPIPS-inside-the-mask scores, the chosen one, the
full-resolution result and what the [V*] token looks at, download it or add it to a dataset folder.

    python app_defectfill.py                                 # the bundled demo, offline, on a CPU
    python app_defectfill.py --lora runs/bottle-broken_large # an SD2 run (base model from its run file)
    python app_defectfill.py --lora you/defectfill-bottle-broken_large --share

The generation is `synthesis.py` (the same core as `infer_defectfill.py`); "add to dataset" writes the
imagefolder layout of `infer_defectfill.py` with the same metadata (`run_files.py`). With no `--lora`
the app opens on the bundled demo run (`models/demo-lora-metal_nut-color`, a LoRA trained by
`configs/tiny.yaml` on the bundled tiny 64 px model): a toy that shows the workflow, not SD2 quality.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry

import numpy as np
from PIL import Image

import dataset_mvtec as dm
import defectfill_method as method
import run_files as rf
import synthesis
from cli_config import parse_args_with_config
from synthesis import SynthesisError, SynthesisSettings

logger = logging.getLogger("defectfill")

REPO_ROOT = Path(__file__).resolve().parent
DEMO_RUN = REPO_ROOT / "models" / "demo-lora-metal_nut-color"
TINY_MODEL = REPO_ROOT / "models" / "tiny-sd2-inpainting"
MASK_COLOUR = (255, 40, 40)
# Errors of bad input, shown in the app as the CLI words them (the app keeps working).
INPUT_ERRORS = (SynthesisError, dm.DatasetError, rf.RunFileError)


# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="DefectFill browser app (Gradio): paint a mask, generate a defect, grow a dataset.")
    p.add_argument("--lora", default=None,
                   help="A training run: the output folder of train_defectfill.py, a folder of runs (--defect_type all: "
                        "its defect types are listed), or a Hub repo id. Default: the bundled demo run "
                        f"({DEMO_RUN.relative_to(REPO_ROOT)}, tiny 64 px model).")
    p.add_argument("--pretrained_model_name_or_path", default=None, help="Base inpainting model; default: the run's base_model.")
    p.add_argument("--data_dir", default=None, help="MVTec-layout root for the good images and held-out masks; default: the run's.")
    p.add_argument("--device", default=None, help="torch device; default: cuda if available, else cpu.")
    p.add_argument("--mixed_precision", default="auto", choices=("auto", "no", "fp16", "bf16"),
                   help="Inference dtype; auto: bf16 (or fp16 where bf16 is unsupported) on a GPU, fp32 on a CPU.")
    p.add_argument("--lpips_net", default="alex", choices=("alex", "vgg", "squeeze"), help="LPIPS backbone for Low-Fidelity Selection.")
    p.add_argument("--num_candidates", type=int, default=4, help="Default candidates per Generate (the paper: 8).")
    p.add_argument("--num_inference_steps", type=int, default=30, help="Default denoising steps (the paper: 50).")
    p.add_argument("--guidance_scale", type=float, default=7.5, help="Default classifier-free guidance scale.")
    p.add_argument("--seed", type=int, default=0, help="Default seed.")
    p.add_argument("--output_dir", default=None,
                   help="Default folder for 'add to dataset' (imagefolder layout of infer_defectfill.py); default: "
                        "outputs/app-<object>-<defect>.")
    p.add_argument("--server_name", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="Address to listen on (default 127.0.0.1, or $GRADIO_SERVER_NAME as on a Space).")
    p.add_argument("--server_port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                   help="Port (default 7860, or $GRADIO_SERVER_PORT).")
    p.add_argument("--share", action="store_true", help="Also open a temporary public gradio.live link (needs network).")
    return p


def parse_args(input_args: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_args_with_config(parser, input_args)
    if args.num_candidates < 1 or args.num_inference_steps < 1:
        parser.error("--num_candidates and --num_inference_steps must be >= 1")
    return args


def inference_dtype(name: str, device: str):
    """`--mixed_precision` as a torch dtype: auto is bf16 (fp16 where bf16 is unsupported) on CUDA, fp32 elsewhere."""
    import torch

    if name == "auto":
        if not device.startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return synthesis.precision_dtype(name)


# ----------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------


def local_path(path: str | os.PathLike | None) -> str | None:
    """An existing path, absolute; else the path relative to the repository (the bundled runs name
    `models/...` and `data/...`); else as given (a Hub id)."""
    if path is None:
        return None
    if Path(path).exists():
        return str(Path(path).resolve())
    if not Path(path).is_absolute() and (REPO_ROOT / path).exists():
        return str((REPO_ROOT / path).resolve())
    return str(path)


def list_runs(location: str) -> dict[str, str]:
    """{label: lora} of a run location: a run folder (one entry), a folder of runs (`--defect_type all`:
    one entry per sub-folder holding LoRA weights, labelled by defect type), or a Hub repo id."""
    location = (location or "").strip()
    if not location:
        raise SynthesisError("no run given: a train_defectfill.py output folder, a folder of runs, or a Hub repo id")
    path = Path(local_path(location))
    if not path.exists():
        return {location: location}  # a Hub repo id: read_run fetches its run file
    path = path.resolve()
    if (path / rf.LORA_FILENAME).is_file():
        return {run_label(path): str(path)}
    runs = {run_label(sub): str(sub) for sub in sorted(path.iterdir()) if (sub / rf.LORA_FILENAME).is_file()}
    if not runs:
        raise SynthesisError(f"--lora {location} has no {rf.LORA_FILENAME} and no run folders with one; expected the "
                             "output folder of train_defectfill.py")
    return runs


def run_label(folder: Path) -> str:
    try:
        run = rf.RunRecord.read(folder) if (folder / rf.RUN_FILENAME).is_file() else None
    except rf.RunFileError:
        run = None
    return f"{run.object_class} / {run.defect_type} ({folder.name})" if run else folder.name


@dataclass
class RunInfo:
    """A run as the app uses it: where its LoRA and base model are, its prompt and scale, and its data."""

    lora: str
    record: rf.RunRecord | None
    base_model: str
    token: str
    object_class: str | None
    defect_type: str | None
    prompt: str
    resolution: int
    crop_to_mask: bool
    crop_context: float
    data_dir: str | None
    good_images: list[Path] = field(default_factory=list)
    heldout_masks: list[Path] = field(default_factory=list)

    @property
    def is_tiny_demo(self) -> bool:
        return Path(self.base_model).resolve() == TINY_MODEL.resolve() if Path(self.base_model).exists() else False


def load_run(lora: str, base_model: str | None = None, data_dir: str | None = None) -> RunInfo:
    """Read a run (`run_files.read_run`, errors worded as the CLI's) and list its good images and held-out masks."""
    lora = local_path(lora)
    record = rf.read_run(lora)
    base = local_path(base_model or (record.base_model if record else None))
    if base is None:
        raise SynthesisError("--pretrained_model_name_or_path is needed: the run has no defectfill_run.json naming its base model")
    token = record.token if record else method.DEFAULT_TOKEN
    object_class = record.object_class if record else None
    prompt = method.object_prompt(object_class, token) if object_class else f"A photo of {token}"
    if record is not None and record.defect_crop_probability is not None:
        crop, context = synthesis.crop_at_training_scale(record.defect_crop_probability, record.crop_context or 0.5)
    else:
        crop, context = False, 0.5
    data = local_path(data_dir or (record.data_dir if record else None))
    goods, masks = [], []
    if data and object_class and Path(data).is_dir():
        goods = dm.list_good_images(data, object_class)
        if record is not None and record.defect_type in record.split.get("defect_types", {}):
            masks = dm.list_heldout_masks(data, record.split, record.defect_type)
    return RunInfo(lora, record, base, token, object_class, record.defect_type if record else None, prompt,
                   record.resolution if record else 512, crop, context, data, goods, masks)


def shown_path(path: str | os.PathLike) -> str:
    """A path for the page: relative to the repository when inside it (the bundled runs), else as is."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except (ValueError, OSError):
        return str(path)


def run_summary(run: RunInfo, selection_note: str) -> str:
    lines = [f"**Run** `{shown_path(run.lora)}`: {run.object_class or '?'} / {run.defect_type or '?'}, token `{run.token}`, "
             f"base `{shown_path(run.base_model)}`, {run.resolution} px, prompt *{run.prompt}*, "
             f"{'crop around the mask' if run.crop_to_mask else 'whole image'} (the scale it trained at)."]
    if run.is_tiny_demo:
        lines.append("The bundled tiny model is a toy (64 px, pre-trained on procedural images on a CPU): it shows the "
                     "workflow, not SD2 quality. Start the app with `--lora` on an SD2 run for real defects.")
    if not run.good_images:
        lines.append(f"No good images found for this run (data folder: `{run.data_dir}`): upload one, or start with `--data_dir`.")
    lines.append(selection_note)
    return "\n\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# State shared by the handlers
# ----------------------------------------------------------------------------------------------------


class AppState:
    """What the handlers share: the loaded pipeline (one at a time, reloaded when the run changes), the
    LPIPS scorer (None: selection off, `selection_note` says why), the device and dtype."""

    def __init__(self, args: argparse.Namespace, scorer: synthesis.Scorer | None, selection_note: str):
        self.args = args
        self.device = synthesis.default_device(args.device)
        self.dtype = inference_dtype(args.mixed_precision, self.device)
        self.scorer = scorer
        self.selection_note = selection_note
        self._pipeline_key: tuple | None = None
        self._pipeline = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "AppState":
        """Loads LPIPS for Low-Fidelity Selection; offline without its backbone weights, selection is off."""
        device = synthesis.default_device(args.device)
        try:
            scorer = synthesis.LpipsModel(args.lpips_net, device).masked_scores
            note = f"Low-Fidelity Selection is on: the candidate with the highest LPIPS ({args.lpips_net}) inside the mask is kept."
        except SynthesisError as error:
            scorer = None
            note = f"**Low-Fidelity Selection is off**: {error}. Each Generate makes 1 candidate."
        return cls(args, scorer, note)

    def pipeline(self, run: RunInfo, progress: Callable | None = None):
        key = (run.base_model, run.lora, run.record.base_model if run.record else None)
        if key != self._pipeline_key:
            self._pipeline, self._pipeline_key = None, None  # free the previous one first
            if progress:
                progress(0, desc=f"loading {run.base_model} with the LoRA of {run.lora}")
            self._pipeline = synthesis.load_pipeline(run.base_model, lora=run.lora, trained_on=key[2], dtype=self.dtype,
                                                     device=self.device)
            self._pipeline_key = key
        return self._pipeline


# ----------------------------------------------------------------------------------------------------
# Images and masks
# ----------------------------------------------------------------------------------------------------


def as_pil(value) -> Image.Image | None:
    """A PIL image of what Gradio hands over (PIL, numpy array or file path)."""
    if value is None:
        return None
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    return Image.open(value)


def mask_layer(mask: Image.Image | np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A mask as an editor layer: the mask colour, opaque where the mask is set, transparent elsewhere."""
    binary = synthesis.mask_at_image_size(mask if isinstance(mask, np.ndarray) else mask.convert("L"), size)
    layer = np.zeros((size[1], size[0], 4), dtype=np.uint8)
    layer[binary] = (*MASK_COLOUR, 255)
    return Image.fromarray(layer, "RGBA")


def editor_value(image: Image.Image, mask: Image.Image | np.ndarray | None = None) -> dict:
    """The ImageEditor value showing `image` with an optional mask layer to edit."""
    return {"background": image, "layers": [mask_layer(mask, image.size)] if mask is not None else [], "composite": None}


def mask_from_editor(value: dict | None, size: tuple[int, int]) -> np.ndarray:
    """The painted mask at the image's size: every pixel any layer paints (alpha > 0), resized nearest.
    May be empty: `synthesis.prepare_job` rejects that with the CLI's words."""
    painted = np.zeros((size[1], size[0]), dtype=bool)
    for layer in (value or {}).get("layers") or []:
        layer = as_pil(layer)
        if layer is None:
            continue
        alpha = np.asarray(layer.convert("RGBA"))[..., 3] > 0
        if alpha.shape != painted.shape:
            alpha = np.asarray(Image.fromarray(alpha.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
        painted |= alpha
    return painted


# ----------------------------------------------------------------------------------------------------
# Handlers (plain functions: the tests call them without a browser)
# ----------------------------------------------------------------------------------------------------


@dataclass
class Source:
    """The clean image being painted on: a file of the run's data (path) or an upload (path None)."""

    image: Image.Image
    path: str | None = None


def pick_good_image(path: str | None) -> tuple[Source, dict]:
    if not path:
        raise SynthesisError("no good image: pick one of the run's good images or upload one")
    try:
        with Image.open(path) as image:
            source = Source(image.convert("RGB"), str(path))
    except OSError as error:
        raise SynthesisError(f"good image {path} cannot be read as an image ({error})") from error
    return source, editor_value(source.image)


def upload_good_image(image) -> tuple[Source, dict]:
    image = as_pil(image)
    if image is None:
        raise SynthesisError("no good image: pick one of the run's good images or upload one")
    source = Source(image.convert("RGB"))
    return source, editor_value(source.image)


def pick_heldout_mask(source: Source | None, mask_path: str | None) -> dict:
    """The editor with a held-out mask as its layer (still editable with the brush)."""
    if source is None:
        raise SynthesisError("no good image: pick one of the run's good images or upload one")
    if not mask_path:
        return editor_value(source.image)
    with Image.open(mask_path) as mask:
        return editor_value(source.image, synthesis.mask_at_image_size(mask, source.image.size, f"mask {mask_path}"))


@dataclass
class Generated:
    """One Generate: what the gallery, the views, the downloads and 'add to dataset' need."""

    result: synthesis.SynthesisResult
    settings: SynthesisSettings
    run: RunInfo
    source: Source
    heldout_mask: str | None
    attention: Any
    attention_share: float
    overlay: Image.Image
    selection: bool

    @property
    def mask_image(self) -> Image.Image:
        return Image.fromarray(self.result.job.mask.astype(np.uint8) * 255)

    def captions(self) -> list[str]:
        out = []
        for c, score in enumerate(self.result.scores):
            text = f"candidate {c}: LPIPS in mask {score:.3f}" if self.selection else f"candidate {c} (no selection)"
            out.append(text + (" ✓ chosen" if c == self.result.chosen else ""))
        return out

    def status(self) -> str:
        s, r = self.settings, self.result
        chosen = (f"candidate {r.chosen} chosen (highest LPIPS inside the mask, {r.scores[r.chosen]:.3f})" if self.selection
                  else "Low-Fidelity Selection off: 1 candidate")
        return (f"{len(r.candidates)} candidate(s) at {s.resolution} px, {s.num_inference_steps} steps, guidance "
                f"{s.guidance_scale}, seed {s.seed}, {'crop ' + str(r.job.box) if s.crop_to_mask else 'whole image'}: "
                f"{chosen}. Outside the mask the result is the clean image pixel for pixel. "
                f"{100 * self.attention_share:.0f}% of the [V*] attention falls inside the mask.")


def generate(state: AppState, run: RunInfo, source: Source | None, editor: dict | None, heldout_mask: str | None,
             num_candidates: int, num_inference_steps: int, guidance_scale: float, seed: int, crop_to_mask: bool,
             progress: Callable | None = None) -> Generated:
    """Prepare the job (the painted mask), load the pipeline, generate and select (`synthesis`), and
    record what the [V*] token looked at. Bad input raises `SynthesisError` in the CLI's words."""
    if source is None:
        raise SynthesisError("no good image: pick one of the run's good images or upload one")
    selection = state.scorer is not None and int(num_candidates) > 1
    settings = SynthesisSettings(
        prompt=run.prompt, resolution=run.resolution, num_candidates=int(num_candidates) if state.scorer else 1,
        num_inference_steps=int(num_inference_steps), guidance_scale=float(guidance_scale), seed=int(seed),
        crop_to_mask=bool(crop_to_mask), crop_context=run.crop_context,
    )
    mask = mask_from_editor(editor, source.image.size)
    job = synthesis.prepare_job(source.image, mask, 0, settings, mask_name="the painted mask")
    pipeline = state.pipeline(run, progress)

    def on_step(done: int, total: int) -> None:
        if progress:
            progress((done, total), desc=f"denoising {settings.num_candidates} candidate(s)", unit="steps")

    [result], [attention] = synthesis.synthesize_with_attention(pipeline, [job], settings, run.token, state.scorer, on_step)
    return Generated(result, settings, run, source, heldout_mask, attention,
                     synthesis.attention_in_mask(attention, job.region_mask), synthesis.attention_overlay(result, attention),
                     selection)


def save_downloads(generated: Generated, folder: str | os.PathLike) -> tuple[str, str]:
    """The result and its label mask as PNG files to download."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"defectfill-{generated.run.object_class or 'image'}-{generated.run.defect_type or 'defect'}-seed{generated.settings.seed}"
    image_path, mask_path = folder / f"{stem}.png", folder / f"{stem}_mask.png"
    generated.result.image.save(image_path)
    generated.mask_image.save(mask_path)
    return str(image_path), str(mask_path)


def default_output_dir(run: RunInfo, flag: str | None) -> str:
    return flag or f"outputs/app-{run.object_class or 'synthetic'}-{run.defect_type or 'defect'}"


def add_to_dataset(generated: Generated | None, output_dir: str) -> tuple[Path, dict]:
    """Append the result to a synthesis folder in `infer_defectfill.py`'s layout (images/, masks/,
    metadata.jsonl with the same row fields, synthesis.json when the folder has none, preview.png). An
    uploaded image, or a mask that is not one of the run's files, is saved under sources/ so the row's
    source paths exist."""
    if generated is None:
        raise SynthesisError("nothing to add yet: Generate first")
    if not (output_dir or "").strip():
        raise SynthesisError("no output folder given for 'add to dataset'")
    folder = Path(output_dir.strip())
    folder.mkdir(parents=True, exist_ok=True)
    result, run = generated.result, generated.run
    index = rf.next_free_index(folder)
    source_image = generated.source.path
    if source_image is None:
        source_image = str(folder / "sources" / f"{index:05d}.png")
        Path(source_image).parent.mkdir(parents=True, exist_ok=True)
        generated.source.image.save(source_image)
    source_mask = generated.heldout_mask
    if source_mask is not None:
        with Image.open(source_mask) as held_out:
            if not np.array_equal(synthesis.mask_at_image_size(held_out, result.image.size), result.job.mask):
                source_mask = None  # painted over: the label mask itself is the source
    row = synthesis.output_metadata_row(result, source_image, source_mask or "", generated.settings, run.object_class, run.defect_type)
    if source_mask is None:
        row["source_mask"] = str(folder / rf.output_names(index)[1])
    saved = rf.save_synthesis_result(folder, index, result.image, result.job.mask, row)
    rows = rf.add_metadata_rows(folder, [saved])
    if rf.SynthesisRecord.read(folder) is None:
        s = generated.settings
        rf.SynthesisRecord(
            pretrained_model_name_or_path=run.base_model, prompt=s.prompt, resolution=s.resolution, lora=run.lora,
            token=run.token, object_class=run.object_class, defect_type=run.defect_type, num_candidates=s.num_candidates,
            num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale, seed=s.seed, composite=s.composite,
            crop_to_mask=s.crop_to_mask, crop_context=s.crop_context, data_dir=run.data_dir,
            split=run.record.split if run.record else None, scale_source="the app's settings",
        ).write(folder)
    try:
        rf.save_preview(folder, rows)
    except OSError as error:  # a row of another writer names a source that is gone: the data is still complete
        logger.warning("preview.png not updated: %s", error)
    return folder, saved


# ----------------------------------------------------------------------------------------------------
# The UI
# ----------------------------------------------------------------------------------------------------


def build_app(state: AppState, lora: str | None = None):
    """The Gradio Blocks of the app on `state`, opening on `lora` (default: the bundled demo run)."""
    import gradio as gr

    initial_location = shown_path(lora or DEMO_RUN)
    args = state.args

    def error_to_app(function):
        """Bad input becomes a message in the app (gr.Error) in the CLI's words; the app keeps working."""
        @functools.wraps(function)  # keeps the signature: gradio finds `progress=gr.Progress()` in it
        def wrapped(*a, **k):
            try:
                return function(*a, **k)
            except INPUT_ERRORS as error:
                raise gr.Error(str(error), print_exception=False) from None
        return wrapped

    def good_choices(run: RunInfo) -> list[tuple[str, str]]:
        root = Path(run.data_dir or ".")
        return [(str(p.relative_to(root / run.object_class)) if run.object_class else p.name, str(p)) for p in run.good_images]

    def mask_choices(run: RunInfo) -> list[tuple[str, str]]:
        return [("(paint with the brush)", "")] + [(f"{p.parent.name}/{p.name}", str(p)) for p in run.heldout_masks]

    @error_to_app
    def on_location(location):
        runs = list_runs(location)
        first = next(iter(runs.values()))
        return gr.update(choices=list(runs.items()), value=first)

    @error_to_app
    def on_run(lora_value):
        if not lora_value:
            raise SynthesisError("no run selected")
        run = load_run(lora_value, args.pretrained_model_name_or_path, args.data_dir)
        goods = good_choices(run)
        source, editor = pick_good_image(goods[0][1]) if goods else (None, None)
        return (run, run_summary(run, state.selection_note), gr.update(choices=goods, value=goods[0][1] if goods else None),
                gr.update(choices=mask_choices(run), value=""), source, editor, run.crop_to_mask,
                default_output_dir(run, args.output_dir))

    @error_to_app
    def on_good(path):
        return pick_good_image(path)

    @error_to_app
    def on_upload(image):
        return upload_good_image(image)

    @error_to_app
    def on_heldout(source, mask_path):
        return pick_heldout_mask(source, mask_path)

    @error_to_app
    def on_generate(run, source, editor, heldout, num_candidates, steps, guidance, seed, crop, progress=gr.Progress()):
        if run is None:
            raise SynthesisError("no run loaded: pick a run first")
        generated = generate(state, run, source, editor, heldout or None, num_candidates, steps, guidance, seed, crop, progress)
        files = save_downloads(generated, tempfile.mkdtemp(prefix="defectfill-app-"))
        gallery = list(zip(generated.result.candidates, generated.captions()))
        return (generated, gr.update(value=gallery, selected_index=generated.result.chosen), generated.result.image,
                generated.mask_image, generated.overlay, generated.status(), list(files))

    @error_to_app
    def on_add(generated, output_dir):
        folder, row = add_to_dataset(generated, output_dir)
        count = len(rf.read_metadata(folder))
        return f"Added `{row['file_name']}` (mask `{row['mask_file_name']}`) to `{folder}`: {count} image(s) in its metadata.jsonl."

    with gr.Blocks(title="DefectFill") as app:
        gr.Markdown("# DefectFill: paint a learned defect into a good image\n"
                    "Pick a run and a good image, paint where the defect goes (or pick a held-out mask), Generate. "
                    "Outside the mask the result is the clean image, pixel for pixel.")
        run_state, source_state, generated_state = gr.State(None), gr.State(None), gr.State(None)
        with gr.Row():
            location = gr.Textbox(initial_location, label="Run: folder, folder of runs (--defect_type all) or Hub id", scale=3,
                                  elem_id="run_location")
            runs = gr.Dropdown(choices=[], label="Defect type (run)", scale=2, elem_id="run")
        summary = gr.Markdown(elem_id="summary")
        with gr.Row():
            with gr.Column(scale=3):
                editor = gr.ImageEditor(label="Good image: paint the defect's mask with the brush", type="pil", image_mode="RGBA",
                                        format="png", sources=(), layers=False, transforms=(), elem_id="editor",
                                        brush=gr.Brush(default_size=10, colors=[f"rgb{MASK_COLOUR}"], color_mode="fixed"))
            with gr.Column(scale=2):
                good = gr.Dropdown(choices=[], label="Good image of the run", elem_id="good")
                upload = gr.Image(label="…or upload a good image", type="pil", sources=("upload", "clipboard"), height=160,
                                  elem_id="upload")
                heldout = gr.Dropdown(choices=[], label="Mask: a held-out mask of the run (editable) or paint", elem_id="heldout")
                with gr.Accordion("Settings", open=True):
                    selection = state.scorer is not None
                    candidates = gr.Slider(1, 16, value=args.num_candidates if selection else 1, step=1, interactive=selection,
                                           label="Candidates (Low-Fidelity Selection)" if selection
                                           else "Candidates: 1 (Low-Fidelity Selection is off: no LPIPS weights)")
                    steps = gr.Slider(1, 100, value=args.num_inference_steps, step=1, label="Denoising steps")
                    guidance = gr.Slider(1.0, 15.0, value=args.guidance_scale, step=0.5, label="Guidance scale")
                    seed = gr.Number(value=args.seed, precision=0, label="Seed")
                    crop = gr.Checkbox(value=True, label="Crop to mask (generate around the mask at full resolution)")
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
        status = gr.Markdown(elem_id="status")
        gallery = gr.Gallery(label="Candidates (LPIPS inside the mask; ✓ = chosen)", columns=8, height=220, elem_id="gallery",
                             format="png")
        with gr.Row():
            result = gr.Image(label="Result (full resolution)", type="pil", format="png", interactive=False, height=300, elem_id="result")
            mask_view = gr.Image(label="Its mask (label)", type="pil", format="png", interactive=False, height=300, elem_id="mask")
            attention = gr.Image(label="[V*] attention over the image", type="pil", format="png", interactive=False,
                                 height=300, elem_id="attention")
        with gr.Row():
            downloads = gr.File(label="Download image and mask", file_count="multiple", interactive=False, elem_id="downloads")
            with gr.Column():
                output_dir = gr.Textbox(label="Dataset folder (infer_defectfill.py layout)", elem_id="output_dir")
                add_button = gr.Button("Add to dataset", elem_id="add")
                added = gr.Markdown(elem_id="added")

        location.submit(on_location, location, runs, api_name="list_runs")
        runs.change(on_run, runs, [run_state, summary, good, heldout, source_state, editor, crop, output_dir], api_name="load_run")
        good.input(on_good, good, [source_state, editor], api_name="pick_good_image")
        upload.upload(on_upload, upload, [source_state, editor], api_name="upload_good_image")
        heldout.input(on_heldout, [source_state, heldout], editor, api_name="pick_heldout_mask")
        generate_button.click(on_generate, [run_state, source_state, editor, heldout, candidates, steps, guidance, seed, crop],
                              [generated_state, gallery, result, mask_view, attention, status, downloads], api_name="generate")
        add_button.click(on_add, [generated_state, output_dir], added, api_name="add_to_dataset")
        app.load(on_location, location, runs)
    return app


def main(args: argparse.Namespace):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    lora = args.lora or str(DEMO_RUN)
    if args.lora is None:
        logger.info("no --lora: opening the bundled demo run %s (tiny 64 px model, offline, CPU)", DEMO_RUN.relative_to(REPO_ROOT))
    list_runs(lora)  # a wrong --lora fails here, in the CLI's words, before a server starts
    state = AppState.from_args(args)
    logger.info("%s", state.selection_note.replace("**", ""))
    logger.info("device %s, dtype %s", state.device, str(state.dtype).replace("torch.", ""))
    logger.info("the pipeline (base model + LoRA) loads on the first Generate")
    app = build_app(state, lora)
    app.queue().launch(server_name=args.server_name, server_port=args.server_port, share=args.share)
    return app


if __name__ == "__main__":
    try:
        main(parse_args())
    except INPUT_ERRORS as error:
        raise SystemExit(f"error: {error}") from None
