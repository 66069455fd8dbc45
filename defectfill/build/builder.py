"""A synthetic inspection dataset for a whole class, on this process's share of the items: the steps of
`build_dataset_defectfill.py`, in order (context, items, the output folder claimed, painting, summary,
preview, export)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from defectfill.build.context import build_fingerprint, make_context
from defectfill.build.export import default_export_dir, export_mvtec
from defectfill.build.paint import build_batch
from defectfill.build.plan import make_items, parse_defects_per_image, process_share
from defectfill.build.summary import format_summary, preview_rows, summarize, write_synthesis_record
from defectfill.data.mvtec import good_images
from defectfill.fileio import write_json_atomic
from defectfill.masks import vae_scale_factor
from defectfill.models import precision_dtype
from defectfill.painting import Scorer
from defectfill.pipelines import check_scheduler, load_named_adapters, load_pipeline
from defectfill.runs.files import SUMMARY_FILENAME
from defectfill.runs.folder import SynthesisFolder, item_of_file
from defectfill.scoring import LpipsModel

logger = logging.getLogger("defectfill")


def build_dataset(args: argparse.Namespace, scorer: Scorer | None = None) -> Path:
    """Build the dataset the flags describe (on this process's share of the items under `accelerate launch`);
    `scorer` replaces the LPIPS scorer (tests). Returns the output folder."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from tqdm.auto import tqdm

    started = time.perf_counter()
    # PartialState reads the process group from the launcher's environment; on CPUs (gloo) it must be told.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    context = make_context(args)
    goods = good_images(context.data_dir, context.object_class, args.good_split, args.image_dir)
    items = make_items([r.defect_type for r in context.runs], goods, args.num_images,
                       parse_defects_per_image(args.defects_per_image), args.seed)
    folder = SynthesisFolder(args.output_dir)
    fingerprint = build_fingerprint(context, items)
    folder.check(fingerprint)  # on every process (read only): an error stops them all
    context.scheduler = check_scheduler(args.scheduler, context.base_model, args.revision)
    state.wait_for_everyone()
    if state.is_main_process:
        folder.claim(fingerprint)
    state.wait_for_everyone()

    done = folder.done()
    if done and state.is_main_process:
        logger.info("resuming: %d of %d items already done", len(done), len(items))
    mine = process_share(items, args.batch_size, done, state.process_index, state.num_processes)
    device = args.device or str(state.device)
    if scorer is None and (args.num_candidates > 1 or args.min_lpips > 0):
        scorer = LpipsModel(args.lpips_net, device, pretrained_backbone=not args.lpips_random_backbone).masked_scores
    pipeline = load_pipeline(context.base_model, None, None, args.revision, args.variant, precision_dtype(args.mixed_precision),
                             device, args.scheduler)
    load_named_adapters(pipeline, {r.defect_type: r.lora for r in context.runs}, context.runs[0].record.base_model,
                        context.base_model)
    context.vae_scale_factor = vae_scale_factor(pipeline.vae)

    progress = tqdm(total=len(items), initial=len(done), desc="images", unit="img", disable=not state.is_main_process)
    generation_started = time.perf_counter()
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
    state.wait_for_everyone()
    generation_wall = time.perf_counter() - generation_started
    if not state.is_main_process:
        progress.close()
        return folder.path
    rows, skipped = folder.rows(), folder.skipped()
    progress.n = len(rows) + len(skipped)
    progress.close()
    folder.remove_orphans(folder.done())
    folder.save_preview(preview_rows(rows, args.preview_rows), max_rows=args.preview_rows)
    made_now = sum(1 for name in rows if item_of_file(name) not in done)  # by every process, this run
    summary = summarize(rows, skipped, context, time.perf_counter() - started, made_now, generation_wall, done)
    write_synthesis_record(folder.path, context, summary["unet_passes_per_kept_image"])
    write_json_atomic(folder.path / SUMMARY_FILENAME, summary)
    if args.export == "mvtec":
        export_dir = Path(args.export_dir) if args.export_dir else default_export_dir(folder.path)
        class_dir = export_mvtec(folder.path, rows, export_dir, context.object_class, context.data_dir, args.image_dir,
                                 args.export_good)
        logger.info("MVTec AD layout in %s", class_dir)
    print(format_summary(summary))
    logger.info("%d images in %s", len(rows), folder.path)
    return folder.path
