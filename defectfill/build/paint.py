"""Painting a build's items: every defect of a batch of items painted in order with its own adapter, weak ones
redrawn with the next seeds (`--min_lpips`), and each item's files written (one mask per defect, a semantic
mask, the union mask as the label, the image last) with its metadata row."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from defectfill.build.context import BuildContext
from defectfill.build.defect_masks import Defect, draw_item_masks
from defectfill.build.plan import COMBINED, MAX_DEFECTS_PER_IMAGE, Item
from defectfill.fileio import save_image_atomic
from defectfill.images import open_checked
from defectfill.painting import prepare_job, synthesize
from defectfill.pipelines import use_adapter
from defectfill.runs.folder import SynthesisFolder

logger = logging.getLogger("defectfill")


def defect_mask_name(index: int, slot: int, defect_type: str) -> str:
    return f"defect_masks/{index:05d}_{slot}_{defect_type}_mask.png"


def semantic_mask_name(index: int) -> str:
    return f"semantic/{index:05d}_semantic.png"


def paint_defects(pipeline, batch: list[tuple[Item, Image.Image, list[Defect]]], context: BuildContext,
                  scorer) -> list[dict]:
    """Paint every item's defects in order, one pipeline call per (slot, defect type) of the batch, redrawing
    weak ones; returns per item {image, results (per slot, None if rejected), rejected candidates, UNet passes (every
    draw's, a guided pair counted once)}."""
    generation = context.settings.generation
    states = [{"image": image, "slots": [None] * len(defects), "rejected": [], "unet_passes": 0.0} for _, image, defects in batch]
    for slot in range(max((len(d) for _, _, d in batch), default=0)):
        groups: dict[str, list[int]] = {}
        for i, (_, _, defects) in enumerate(batch):
            if slot < len(defects):
                groups.setdefault(defects[slot].defect_type, []).append(i)
        for defect_type, members in groups.items():
            use_adapter(pipeline, defect_type)
            settings = context.synthesis[defect_type]
            todo, first = list(members), 0
            for _ in range(generation.max_redraws + 1):
                jobs = [prepare_job(states[i]["image"], batch[i][2][slot].mask, batch[i][0].index * MAX_DEFECTS_PER_IMAGE + slot,
                                              settings) for i in todo]
                results = synthesize(pipeline, jobs, settings, scorer, first_candidate=first)
                weak = []
                for i, result in zip(todo, results):
                    states[i]["unet_passes"] += result.unet_passes
                    score = result.final_score
                    if generation.min_lpips > 0 and score < generation.min_lpips:
                        states[i]["rejected"].append({"slot": slot, "defect_type": defect_type, "first_candidate": first,
                                                      "num_candidates": settings.num_candidates, "lpips": score})
                        weak.append(i)
                    else:
                        states[i]["slots"][slot] = (result, first)
                todo, first = weak, first + settings.num_candidates
                if not todo:
                    break
            for i in members:
                if states[i]["slots"][slot] is not None:
                    states[i]["image"] = states[i]["slots"][slot][0].image
    return states


def save_item(output_dir: Path, item: Item, defects: list[Defect], state: dict, context: BuildContext,
              rejections: Counter, dropped: list[str], source_size) -> dict:
    """Write one item's masks, then its image last (the done marker); return its metadata row."""
    kept = [(d, s) for d, s in zip(defects, state["slots"]) if s is not None]
    union = np.zeros(source_size[::-1], dtype=bool)
    semantic = np.zeros(source_size[::-1], dtype=np.uint8)
    names = []
    for slot, (defect, _) in enumerate(kept):
        name = defect_mask_name(item.index, slot, defect.defect_type)
        save_image_atomic(Image.fromarray(defect.mask.astype(np.uint8) * 255), output_dir / name)
        names.append(name)
        union |= defect.mask
        semantic[defect.mask] = context.index_table[defect.defect_type]
    save_image_atomic(Image.fromarray(semantic), output_dir / semantic_mask_name(item.index))
    types = [d.defect_type for d, _ in kept]
    row = {
        "source_image": str(item.image_path), "defect_type": types[0] if len(set(types)) == 1 else COMBINED,
        "defect_types": types, "object_class": context.object_class, "num_defects": len(kept),
        "defect_mask_file_names": names, "semantic_mask_file_name": semantic_mask_name(item.index),
        "source_masks": [d.source_mask for d, _ in kept], "augmented": [d.augmented for d, _ in kept],
        "prompts": [context.synthesis[t].prompt for t in types], "seed": context.settings.generation.seed,
        "candidate": [r.chosen + first for _, (r, first) in kept], "lpips": [r.final_score for _, (r, _) in kept],
        "crop_box": [list(r.job.box) for _, (r, _) in kept], "rejected_candidates": state["rejected"],
        "mask_rejections": dict(rejections), "dropped_defects": dropped, "unet_passes": state["unet_passes"],
        "mask_from": context.settings.masks.mask_from.value,
    }
    candidates = [c for _, (r, _) in kept for c in r.candidates] if context.settings.output.save_candidates else None
    return SynthesisFolder(output_dir).save_result(item.index, state["image"], union, row, candidates)


def build_batch(pipeline, items: list[Item], context: BuildContext, scorer, output_dir: Path) -> tuple[list[dict], dict]:
    """Draw masks, paint and save a batch of items; returns (metadata rows, skipped entries)."""
    prepared, skipped = [], {}
    for item in items:
        with open_checked(item.image_path, "good image") as opened:
            image = opened.convert("RGB")
        defects, rejections, dropped = draw_item_masks(item, image, context)
        if not defects:
            skipped[str(item.index)] = {"reason": "no_mask_fits", "defect_types": list(item.defect_types),
                                        "source_image": str(item.image_path), "mask_rejections": dict(rejections)}
            logger.warning("item %d (%s on %s): no mask fits; skipped (%s)", item.index, item.defect_types[0],
                           item.image_path.name, dict(rejections))
            continue
        prepared.append((item, image, defects, rejections, dropped))
    states = paint_defects(pipeline, [(i, im, d) for i, im, d, _, _ in prepared], context, scorer)
    rows = []
    for (item, image, defects, rejections, dropped), state in zip(prepared, states):
        weak = [d.defect_type for d, s in zip(defects, state["slots"]) if s is None]
        if state["slots"][0] is None:  # the defect the item is for stayed weak after every redraw
            skipped[str(item.index)] = {"reason": "weak_after_redraws", "defect_types": list(item.defect_types),
                                        "source_image": str(item.image_path), "mask_rejections": dict(rejections),
                                        "rejected_candidates": state["rejected"], "unet_passes": state["unet_passes"]}
            logger.warning("item %d: every candidate of %s stayed below --min_lpips; skipped", item.index, item.defect_types[0])
            continue
        rows.append(save_item(output_dir, item, defects, state, context, rejections, dropped + weak, image.size))
    return rows, skipped
