"""The app's page: Gradio Blocks wired to the handlers (`defectfill.app.handlers`); every event has an
`api_name`, so `gradio_client` drives the same endpoints the page uses. Every value an event receives goes
through the server's `AppPolicy` (`defectfill.app.policy`) first: the page's widgets are no guard, a client
can send anything."""

# No `from __future__ import annotations` here: Gradio finds `request: gr.Request` by the annotation's value,
# and `gr` is imported inside `build_app`, where a string annotation could not be resolved.

import atexit
import contextlib
import functools
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from defectfill.app.editor import MASK_COLOUR
from defectfill.app.handlers import (
    AppState,
    add_to_dataset,
    add_to_public_dataset,
    default_output_dir,
    generate,
    pick_good_image,
    pick_heldout_mask,
    save_downloads,
    upload_good_image,
)
from defectfill.app.policy import GENERATE_SETTINGS, AppPolicy, RequestRefused
from defectfill.app.runs import load_run, run_summary
from defectfill.errors import DefectFillError, SynthesisError
from defectfill.runs.folder import read_metadata


def download_folder(root: Path, max_age_s: float | None) -> str:
    """A fresh folder for one Generate's downloads under `root`; with `max_age_s`, older ones are removed first
    (Gradio has copied them to its cache by then), so a public server's disk does not fill up."""
    root.mkdir(parents=True, exist_ok=True)
    if max_age_s is not None:
        for old in root.iterdir():
            with contextlib.suppress(OSError):  # removed meanwhile
                if time.time() - old.stat().st_mtime > max_age_s:
                    shutil.rmtree(old, ignore_errors=True)
    return tempfile.mkdtemp(dir=root)


def remove_on_close(app, folder: Path) -> None:
    """Remove `folder` (the app's download copies) when `app` is closed, and at the latest when the process exits."""
    remove = functools.partial(shutil.rmtree, folder, ignore_errors=True)
    atexit.register(remove)
    close = app.close

    def close_and_remove(*args, **kwargs):
        try:
            return close(*args, **kwargs)
        finally:
            remove()

    app.close = close_and_remove


def launch(app, policy: AppPolicy, **kwargs):
    """Queue and launch `app` with the policy's limits (public mode: the queue's size, one Generate at a time,
    Gradio's upload size); `kwargs` go to `launch` (server_name, server_port, share, ...)."""
    return app.queue(**policy.queue_options()).launch(**policy.launch_options(), **kwargs)


def error_to_app(policy: AppPolicy):
    """A decorator: bad input becomes a message in the app (gr.Error) in the CLI's words; the app keeps working. In
    public mode the server's paths in a message are shown relative (`AppPolicy.public_text`)."""
    import gradio as gr

    def decorate(function):
        @functools.wraps(function)  # keeps the signature: gradio finds `progress=gr.Progress()` and the request in it
        def wrapped(*a, **k):
            try:
                return function(*a, **k)
            except RequestRefused as error:  # worded by the policy: no server path in it
                raise gr.Error(str(error), print_exception=False) from None
            except DefectFillError as error:
                raise gr.Error(policy.public_text(str(error)), print_exception=False) from None
        return wrapped
    return decorate


def session_of(request) -> str | None:
    return getattr(request, "session_hash", None) if request is not None else None


def run_events(state: AppState, policy: AppPolicy) -> SimpleNamespace:
    """The events that pick a run, a good image (or an upload) and a held-out mask."""
    import gradio as gr

    paths, settings, checked = state.paths, state.settings, error_to_app(policy)

    @checked
    def on_location(location):
        runs = policy.run_choices(location)
        first = next(iter(runs.values()))
        return gr.update(choices=list(runs.items()), value=first)

    @checked
    def on_run(lora_value, request: gr.Request):
        if not lora_value:
            raise SynthesisError("no run selected")
        run = load_run(policy.run_for(lora_value), paths, settings.model.pretrained_model_name_or_path,
                       settings.data.data_dir)
        goods = policy.choices(policy.good_labels(run))
        source, editor = pick_good_image(policy.good_image(run, goods[0][1])) if goods else (None, None)
        masks = [("(paint with the brush)", "")] + policy.choices(policy.mask_labels(run))
        note = policy.public_text(state.selection_note)  # LPIPS's error may name the server's torch cache
        return (run, run_summary(run, note, paths, shown=lambda path: policy.shown(path, run)),
                gr.update(choices=goods, value=goods[0][1] if goods else None),
                gr.update(choices=masks, value=""), source, editor, run.crop_to_mask,
                policy.dataset_label(session_of(request), default_output_dir(run, settings.output_dir)))

    @checked
    def on_good(run, value):
        return pick_good_image(policy.good_image(run, value))

    @checked
    def on_upload(image):
        return upload_good_image(image)

    @checked
    def on_heldout(run, source, value):
        return pick_heldout_mask(source, policy.heldout_mask(run, value))

    return SimpleNamespace(location=on_location, run=on_run, good=on_good, upload=on_upload, heldout=on_heldout)


def result_events(state: AppState, policy: AppPolicy, editor, download_root: Path) -> SimpleNamespace:
    """The events that generate (from the `editor` component's value) and add the result to a dataset."""
    import gradio as gr

    from defectfill.app.components import editor_images

    checked = error_to_app(policy)

    @checked
    def on_generate(run, source, edited, heldout, num_candidates, steps, guidance, seed, crop, request: gr.Request,
                    progress=gr.Progress()):  # noqa: B008 (gradio finds its progress tracker in the signature's default)
        numbers = policy.settings(num_candidates=num_candidates, num_inference_steps=steps, guidance_scale=guidance,
                                  seed=seed)
        if run is None:
            raise SynthesisError("no run loaded: pick a run first")
        mask = policy.heldout_mask(run, heldout)
        edited = editor_images(editor, edited, session_of(request))  # a pending edit: this session's only
        generated = generate(state, run, source, edited, mask, **numbers, crop_to_mask=bool(crop), progress=progress)
        files = save_downloads(generated, download_folder(download_root, policy.limits.cache_seconds if policy.public else None))
        gallery = list(zip(generated.result.candidates, generated.captions()))
        return (generated, gr.update(value=gallery, selected_index=generated.result.chosen), generated.result.image,
                generated.mask_image, generated.overlay, generated.status(), list(files))

    @checked
    def on_add(generated, output_dir, request: gr.Request):
        folder = policy.dataset_folder(output_dir, session_of(request))
        if policy.public:
            folder, row, added = add_to_public_dataset(generated, folder, policy.dataset_root, policy.limits)
        else:
            (folder, row), added = add_to_dataset(generated, folder), True
        count = len(read_metadata(folder))
        shown = policy.shown(folder) if policy.public else folder
        if not added:
            return (f"This result is already in `{shown}` as `{row['file_name']}`; it was not stored again "
                    f"({count} image(s) in its metadata.jsonl).")
        return f"Added `{row['file_name']}` (mask `{row['mask_file_name']}`) to `{shown}`: {count} image(s) in its metadata.jsonl."

    return SimpleNamespace(generate=on_generate, add=on_add)


def picker_widgets(state: AppState, policy: AppPolicy) -> SimpleNamespace:
    """The run box and list, the mask editor, the good image list, the upload and the held-out mask list (in the
    layout being built). Public mode: the dropdowns take any value, so that the policy (not Gradio's list check,
    which would answer with the list) refuses what is not a label of its lists, in its words."""
    import gradio as gr

    from defectfill.app.components import guard_file_value, guard_image, guard_image_editor

    limits = policy.limits if policy.public else None
    pick_any = {"allow_custom_value": True} if policy.public else {}
    w = SimpleNamespace()
    with gr.Row():
        w.location = gr.Textbox(policy.initial_location(), label="Run: folder, folder of runs (--defect_type all) or Hub id",
                                scale=3, elem_id="run_location", visible=not policy.public, interactive=not policy.public)
        w.runs = gr.Dropdown(choices=[], label="Defect type (run)", scale=2, elem_id="run", **pick_any)
    w.summary = gr.Markdown(elem_id="summary")
    with gr.Row():
        with gr.Column(scale=3):
            w.editor = guard_image_editor(guard_file_value(gr.ImageEditor(
                label="Good image: paint the defect's mask with the brush", type="pil", image_mode="RGBA", format="png",
                sources=(), layers=False, transforms=(), elem_id="editor",
                brush=gr.Brush(default_size=10, colors=[f"rgb{MASK_COLOUR}"], color_mode="fixed")), "the mask editor"),
                limits)
        with gr.Column(scale=2):
            w.good = gr.Dropdown(choices=[], label="Good image of the run", elem_id="good", **pick_any)
            w.upload = guard_image(guard_file_value(gr.Image(
                label="…or upload a good image", type="filepath", image_mode=None, sources=("upload", "clipboard"),
                height=160, elem_id="upload"), "the uploaded image"), limits)
            w.heldout = gr.Dropdown(choices=[], label="Mask: a held-out mask of the run (editable) or paint",
                                    elem_id="heldout", **pick_any)
            settings_widgets(state, policy, w)
            w.generate = gr.Button("Generate", variant="primary", elem_id="generate")
    return w


def settings_widgets(state: AppState, policy: AppPolicy, w: SimpleNamespace) -> None:
    """The settings of a Generate, their ranges from `GENERATE_SETTINGS` (the public caps in public mode), into `w`."""
    import gradio as gr

    from defectfill.app.components import guard_number

    page = state.settings.page

    def slider(name: str, value, **kwargs):
        low, high = GENERATE_SETTINGS[name].page_range(policy.public)
        return guard_number(gr.Slider(low, high, value=value, step=GENERATE_SETTINGS[name].step, **kwargs),
                            GENERATE_SETTINGS[name].label)

    with gr.Accordion("Settings", open=True):
        selection = state.scorer is not None
        w.candidates = slider("num_candidates", page.num_candidates if selection else 1, interactive=selection,
                              label="Candidates (Low-Fidelity Selection)" if selection
                              else "Candidates: 1 (Low-Fidelity Selection is off: no LPIPS weights)")
        w.steps = slider("num_inference_steps", page.num_inference_steps, label="Denoising steps")
        w.guidance = slider("guidance_scale", page.guidance_scale, label="Guidance scale")
        low, high = GENERATE_SETTINGS["seed"].page_range(policy.public)
        w.seed = guard_number(gr.Number(value=page.seed, precision=0, label="Seed", minimum=low, maximum=high), "Seed")
        w.crop = gr.Checkbox(value=False, label="Crop to mask (generate around the mask at full resolution)")


def result_widgets(policy: AppPolicy) -> SimpleNamespace:
    """The status, the candidates, the result, its mask and [V*] map, the downloads and 'add to dataset'."""
    import gradio as gr

    w = SimpleNamespace(status=gr.Markdown(elem_id="status"))
    w.gallery = gr.Gallery(label="Candidates (LPIPS inside the mask; ✓ = chosen)", columns=8, height=220,
                           elem_id="gallery", format="png")
    with gr.Row():
        view = {"type": "pil", "format": "png", "interactive": False, "height": 300}
        w.result = gr.Image(label="Result (full resolution)", elem_id="result", **view)
        w.mask = gr.Image(label="Its mask (label)", elem_id="mask", **view)
        w.attention = gr.Image(label="[V*] attention over the image", elem_id="attention", **view)
    with gr.Row():
        w.downloads = gr.File(label="Download image and mask", file_count="multiple", interactive=False, elem_id="downloads")
        with gr.Column(visible=policy.datasets):
            w.output_dir = gr.Textbox(label="Dataset folder (infer_defectfill.py layout)" if not policy.public
                                      else "This session's dataset folder on the server", elem_id="output_dir",
                                      interactive=not policy.public)
            w.add = gr.Button("Add to dataset", elem_id="add")
            w.added = gr.Markdown(elem_id="added")
    return w


def build_app(state: AppState, lora: str | None = None, policy: AppPolicy | None = None):
    """The Gradio Blocks of the app on `state` under `policy` (default: local mode, opening on `lora`, or the
    bundled demo run)."""
    import gradio as gr

    policy = policy or AppPolicy.local(state.paths, lora)
    download_root = Path(tempfile.mkdtemp(prefix="defectfill-app-"))
    with gr.Blocks(title="DefectFill", **policy.blocks_options()) as app:
        gr.Markdown("# DefectFill: paint a learned defect into a good image\n"
                    "Pick a run and a good image, paint where the defect goes (or pick a held-out mask), Generate. "
                    "Outside the mask the result is the clean image, pixel for pixel.")
        gr.Markdown(policy.mode_note(), elem_id="mode")
        if state.scorer is None:  # said at once, not only with the first run's summary
            gr.Markdown(policy.public_text(state.selection_note), elem_id="selection")
        run_state, source_state, generated_state = gr.State(None), gr.State(None), gr.State(None)
        i, o = picker_widgets(state, policy), result_widgets(policy)
        picks, results = run_events(state, policy), result_events(state, policy, i.editor, download_root)

        i.location.submit(picks.location, i.location, i.runs, api_name="list_runs")
        i.runs.change(picks.run, i.runs, [run_state, i.summary, i.good, i.heldout, source_state, i.editor, i.crop, o.output_dir],
                      api_name="load_run")
        i.good.input(picks.good, [run_state, i.good], [source_state, i.editor], api_name="pick_good_image")
        i.upload.upload(picks.upload, i.upload, [source_state, i.editor], api_name="upload_good_image")
        i.heldout.input(picks.heldout, [run_state, source_state, i.heldout], i.editor, api_name="pick_heldout_mask")
        i.generate.click(results.generate,
                         [run_state, source_state, i.editor, i.heldout, i.candidates, i.steps, i.guidance, i.seed, i.crop],
                         [generated_state, o.gallery, o.result, o.mask, o.attention, o.status, o.downloads], api_name="generate")
        o.add.click(results.add, [generated_state, o.output_dir], o.added, api_name="add_to_dataset")
        app.load(picks.location, i.location, i.runs)
    remove_on_close(app, download_root)
    return app
