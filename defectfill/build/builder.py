"""A synthetic inspection dataset for a whole class, on this process's share of the items: the steps of
`build_dataset_defectfill.py`, in order (context, items, the output folder claimed, painting, summary,
preview, export)."""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path

from defectfill.build.card import push_build
from defectfill.build.context import BuildContext, build_fingerprint, make_context
from defectfill.build.export import default_export_dir, export_mvtec
from defectfill.build.paint import build_batch
from defectfill.build.plan import Item, make_items, parse_defects_per_image, process_share
from defectfill.build.settings import PREVIEW_ROWS, BuildSettings
from defectfill.build.summary import format_summary, preview_rows, summarize, write_synthesis_record
from defectfill.data.mvtec import good_images
from defectfill.fileio import check_output_folder, write_json_atomic
from defectfill.images import check_images
from defectfill.models import precision_dtype
from defectfill.painting import Scorer
from defectfill.pipelines import load_named_adapters, load_pipeline
from defectfill.runs.files import SUMMARY_FILENAME
from defectfill.runs.folder import SynthesisFolder, item_of_file
from defectfill.scoring import LpipsModel

logger = logging.getLogger("defectfill")


def build_dataset(settings: BuildSettings, scorer: Scorer | None = None, hub_token: str | None = None) -> Path:
    """Build the dataset `settings` describe (on this process's share of the items under `accelerate launch`);
    `scorer` replaces the LPIPS scorer (tests); `hub_token` is for the upload alone (`push_to_hub`). Returns the
    output folder. Everything that can be checked without a model (the output folders, the runs, masks and
    resolution, every good image) is, before anything is written."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    started = time.perf_counter()
    # PartialState reads the process group from the launcher's environment; on CPUs (gloo) it must be told.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    output = settings.output
    check_output_folder(output.output_dir, "--output_dir")
    if output.export == "mvtec" and output.export_dir:
        check_output_folder(output.export_dir, "--export_dir")
    context = make_context(settings)
    goods = good_images(context.data_dir, context.object_class, settings.good_split, settings.image_dir, context.layout)
    items = make_items([r.defect_type for r in context.runs], goods, settings.num_images,
                       parse_defects_per_image(settings.masks.defects_per_image), settings.generation.seed)
    check_images((item.image_path for item in items), "good image")
    folder = SynthesisFolder(output.output_dir)
    fingerprint = build_fingerprint(context, items)
    folder.check(fingerprint)  # on every process (read only): an error stops them all
    # the main process holds the folder for the whole build: a second build started on it is told it is busy
    with folder.writing() if state.is_main_process else nullcontext():
        state.wait_for_everyone()
        if state.is_main_process:
            folder.claim(fingerprint)
        state.wait_for_everyone()
        done = folder.done()
        if done and state.is_main_process:
            logger.info("resuming: %d of %d items already done", len(done), len(items))
        generation_started = time.perf_counter()
        paint_share(context, items, done, folder, state, scorer)
        state.wait_for_everyone()
        if state.is_main_process:
            summary = finish(context, folder, done, time.perf_counter() - started, time.perf_counter() - generation_started)
            if settings.output.push_to_hub:
                push_build(folder.path, context, summary, settings.output.hub_dataset_id, hub_token)
    return folder.path


def load_build_pipeline(context: BuildContext, device: str):
    """The base pipeline with every run's LoRA loaded as a named adapter (its defect type)."""
    settings = context.settings
    pipeline = load_pipeline(context.base_model, None, None, settings.model.revision, settings.model.variant,
                             precision_dtype(settings.mixed_precision), device, settings.generation.scheduler)
    load_named_adapters(pipeline, {r.defect_type: r.lora for r in context.runs}, context.runs[0].record.base_model,
                        context.base_model)
    return pipeline


def paint_share(context: BuildContext, items: list[Item], done: set[int], folder: SynthesisFolder, state,
                scorer: Scorer | None) -> None:
    """Paint this process's batches of the items not yet done, adding each batch's rows to the folder."""
    from tqdm.auto import tqdm

    generation = context.settings.generation
    mine = process_share(items, generation.batch_size, done, state.process_index, state.num_processes)
    device = context.settings.device or str(state.device)
    if scorer is None and generation.scores_candidates:
        scorer = LpipsModel(generation.lpips_net, device).masked_scores
    pipeline = load_build_pipeline(context, device)
    progress = tqdm(total=len(items), initial=len(done), desc="images", unit="img", disable=not state.is_main_process)
    for batch in mine:
        batch_started = time.perf_counter()
        new_rows, new_skipped = build_batch(pipeline, batch, context, scorer, folder.path)
        for row in new_rows:  # which process made it, and its time for the batch shared by the kept images
            row["process"] = state.process_index
            row["seconds"] = round((time.perf_counter() - batch_started) / len(new_rows), 4)
        all_rows = folder.add_rows(new_rows) if new_rows else folder.rows()
        all_skipped = folder.add_skipped(new_skipped) if new_skipped else folder.skipped()
        progress.n = len(all_rows) + len(all_skipped)  # every process's items, as the shared files say
        progress.refresh()
    progress.close()


def finish(context: BuildContext, folder: SynthesisFolder, done: set[int], seconds: float, generation_wall: float) -> dict:
    """On the main process, once every process is done: orphans removed, the preview, the summary, synthesis.json,
    and the MVTec export. Returns the summary."""
    output = context.settings.output
    rows, skipped = folder.rows(), folder.skipped()
    folder.remove_orphans(folder.done())
    folder.save_preview(preview_rows(rows, PREVIEW_ROWS), max_rows=PREVIEW_ROWS)
    made_now = sum(1 for name in rows if item_of_file(name) not in done)  # by every process, this run
    summary = summarize(rows, skipped, context, seconds, made_now, generation_wall, done)
    write_synthesis_record(folder.path, context, summary["unet_passes_per_kept_image"])
    write_json_atomic(folder.path / SUMMARY_FILENAME, summary)
    if output.export == "mvtec":
        export_dir = Path(output.export_dir) if output.export_dir else default_export_dir(folder.path)
        class_dir = export_mvtec(folder.path, rows, export_dir, context.object_class, context.data_dir,
                                 context.settings.image_dir, output.export_good, context.layout)
        logger.info("MVTec AD layout in %s", class_dir)
    print(format_summary(summary))
    logger.info("%d images in %s", len(rows), folder.path)
    return summary
