"""What a build reports: its summary (images per label and defects per type, masks augmented and rejected by
reason, candidates rejected, time per kept image), the preview rows spread over the labels, and synthesis.json."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from defectfill.build.context import BuildContext
from defectfill.data.split import merge_splits
from defectfill.pipelines import base_family
from defectfill.runs.folder import SynthesisFolder, item_of_file


def summarize(rows: dict[str, dict], skipped: dict[str, dict], context: BuildContext, seconds: float, made: int,
              generation_wall: float | None = None, done_before: set | None = None) -> dict:
    """Images per defect type, masks augmented/rejected and why, candidates rejected, time per kept image:
    wall-clock (whole run, and the generation alone, all processes together) and process time (the sum of
    every process's batch time over the images it kept), all of this run. The UNet passes per kept image are the
    folder's, every run that made it together (each row and skipped item records its own), so a resumed build
    reports what its whole dataset cost."""
    new_rows = [r for name, r in rows.items() if item_of_file(name) not in (done_before or set())]
    passes = sum(r.get("unet_passes", 0.0) for r in rows.values()) + sum(e.get("unet_passes", 0.0) for e in skipped.values())
    settings = next(iter(context.synthesis.values()))
    process_seconds = sum(r.get("seconds", 0.0) for r in new_rows)
    candidates = context.settings.generation.num_candidates
    drawn = sum(sum(r["num_candidates"] for r in row.get("rejected_candidates", [])) + candidates * row["num_defects"]
                for row in new_rows)
    per_type, per_label, reasons = Counter(), Counter(), Counter()
    rejected_candidates = 0
    augmented = 0
    for row in rows.values():
        per_label[row["defect_type"]] += 1
        per_type.update(row["defect_types"])
        augmented += sum(row.get("augmented", []))
        reasons.update(row.get("mask_rejections", {}))
        rejected_candidates += sum(r["num_candidates"] for r in row.get("rejected_candidates", []))
    skip_reasons = Counter()
    for entry in skipped.values():
        skip_reasons[entry["reason"]] += 1
        reasons.update(entry.get("mask_rejections", {}))
        rejected_candidates += sum(r["num_candidates"] for r in entry.get("rejected_candidates", []))
    return {
        "images": len(rows), "images_per_label": dict(sorted(per_label.items())),
        "defects_per_type": dict(sorted(per_type.items())),
        "multi_defect_images": sum(1 for r in rows.values() if r["num_defects"] > 1),
        "masks_augmented": augmented, "masks_rejected": sum(reasons.values()), "masks_rejected_by_reason": dict(sorted(reasons.items())),
        "candidates_rejected": rejected_candidates, "items_skipped": dict(sorted(skip_reasons.items())),
        "images_made_this_run": made, "seconds_this_run": round(seconds, 3),
        "seconds_per_kept_image": round(seconds / made, 4) if made else None,
        "generation_seconds_wall": round(generation_wall, 3) if generation_wall is not None else None,
        "generation_seconds_per_kept_image": round(generation_wall / made, 4) if made and generation_wall is not None else None,
        "process_seconds_per_kept_image": round(process_seconds / made, 4) if made else None,
        "candidates_drawn_per_kept_image": round(drawn / made, 3) if made else None,
        "sampler": context.scheduler, "num_inference_steps": settings.num_inference_steps,
        "unet_passes_per_kept_image": round(passes / len(rows), 2) if rows else None,
    }


def format_summary(summary: dict) -> str:
    lines = [f"{summary['images']} images ({summary['multi_defect_images']} with several defects)"]
    lines += [f"  {label}: {count}" for label, count in summary["images_per_label"].items()]
    lines.append(f"defects per type: {summary['defects_per_type']}")
    lines.append(f"masks augmented: {summary['masks_augmented']}, rejected: {summary['masks_rejected']} "
                 f"{summary['masks_rejected_by_reason']}")
    lines.append(f"candidates rejected (below --min_lpips): {summary['candidates_rejected']}; items skipped: {summary['items_skipped']}")
    if summary["seconds_per_kept_image"] is not None:
        lines.append(f"{summary['images_made_this_run']} images made in {summary['seconds_this_run']:.1f} s "
                     f"({summary['seconds_per_kept_image']:.3f} s per kept image; generation alone "
                     f"{summary['generation_seconds_per_kept_image']:.3f} s wall, {summary['process_seconds_per_kept_image']:.3f} s "
                     f"per process; {summary['candidates_drawn_per_kept_image']:g} candidates drawn per kept image)")
    passes = summary["unet_passes_per_kept_image"]
    lines.append(f"sampler {summary['sampler']}, {summary['num_inference_steps']} steps"
                 + (f": {passes:g} UNet passes per kept image" if passes is not None else ""))
    return "\n".join(lines)


def preview_rows(rows: dict[str, dict], count: int) -> dict[str, dict]:
    """Rows for preview.png spread over the labels (each defect type, then combined), in file order."""
    by_label: dict[str, list[str]] = {}
    for name in sorted(rows):
        by_label.setdefault(rows[name]["defect_type"], []).append(name)
    chosen, round_index = [], 0
    while len(chosen) < min(count, len(rows)):
        for names in by_label.values():
            if round_index < len(names) and len(chosen) < count:
                chosen.append(names[round_index])
        round_index += 1
    return {name: rows[name] for name in chosen}


def merged_split(context: BuildContext) -> dict | None:
    """Every run's few-shot split in one (each run saves the entry of its own defect type): the test set of a
    build is the held-out part of all its defect types."""
    splits = [(r.lora, r.split) for r in context.runs if r.split]
    return merge_splits(splits) if splits else None


def write_synthesis_record(output_dir: Path, context: BuildContext, unet_passes_per_image: float | None = None) -> None:
    """synthesis.json: the SynthesisRecord fields evaluation reads (the first run's settings, the base model the
    build used), plus the defect type index table and every run's LoRA and split."""
    first = context.runs[0]
    record = first.synthesis_record(
        pretrained_model_name_or_path=context.base_model, lora=",".join(r.lora for r in context.runs),
        defect_type=first.defect_type if len(context.runs) == 1 else None,
        scale_source="each run's training scale, unless a flag overrides it", scheduler=context.scheduler,
        unet_passes_per_image=unet_passes_per_image, mask_from=context.settings.masks.mask_from.value,
        pipeline_class=base_family(context.base_model, context.settings.model.revision).pipeline_class,
        # every run's split, merged: the test set of a build is the held-out part of all its defect types
        split=merged_split(context),
    )
    extra = {"defect_type_index": {"good": 0, **context.index_table},
             "runs": {r.defect_type: {"lora": r.lora, "split": r.split} for r in context.runs}}
    SynthesisFolder(output_dir).write_record(record, extra)
