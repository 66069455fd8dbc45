"""The app's page: Gradio Blocks wired to the handlers (`defectfill.app.handlers`); every event has an
`api_name`, so `gradio_client` drives the same endpoints the page uses."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from defectfill.app.editor import MASK_COLOUR
from defectfill.app.handlers import (
    AppState,
    add_to_dataset,
    default_output_dir,
    generate,
    pick_good_image,
    pick_heldout_mask,
    save_downloads,
    upload_good_image,
)
from defectfill.app.runs import RunInfo, list_runs, load_run, run_summary
from defectfill.errors import DefectFillError, SynthesisError
from defectfill.runs.folder import read_metadata


def build_app(state: AppState, lora: str | None = None):
    """The Gradio Blocks of the app on `state`, opening on `lora` (default: the bundled demo run)."""
    import gradio as gr

    paths = state.paths
    initial_location = paths.shown(lora or paths.demo_run)
    args = state.args

    def error_to_app(function):
        """Bad input becomes a message in the app (gr.Error) in the CLI's words; the app keeps working."""
        @functools.wraps(function)  # keeps the signature: gradio finds `progress=gr.Progress()` in it
        def wrapped(*a, **k):
            try:
                return function(*a, **k)
            except DefectFillError as error:
                raise gr.Error(str(error), print_exception=False) from None
        return wrapped

    def good_choices(run: RunInfo) -> list[tuple[str, str]]:
        root = Path(run.data_dir or ".")
        return [(str(p.relative_to(root / run.object_class)) if run.object_class else p.name, str(p)) for p in run.good_images]

    def mask_choices(run: RunInfo) -> list[tuple[str, str]]:
        return [("(paint with the brush)", "")] + [(f"{p.parent.name}/{p.name}", str(p)) for p in run.heldout_masks]

    @error_to_app
    def on_location(location):
        runs = list_runs(location, paths)
        first = next(iter(runs.values()))
        return gr.update(choices=list(runs.items()), value=first)

    @error_to_app
    def on_run(lora_value):
        if not lora_value:
            raise SynthesisError("no run selected")
        run = load_run(lora_value, paths, args.pretrained_model_name_or_path, args.data_dir)
        goods = good_choices(run)
        source, editor = pick_good_image(goods[0][1]) if goods else (None, None)
        return (run, run_summary(run, state.selection_note, paths), gr.update(choices=goods, value=goods[0][1] if goods else None),
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
    def on_generate(run, source, editor, heldout, num_candidates, steps, guidance, seed, crop,
                    progress=gr.Progress()):  # noqa: B008 (gradio finds its progress tracker in the signature's default)
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
        count = len(read_metadata(folder))
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
