"""Sharing a build: its dataset card (README.md: how the dataset was made, and how to load it) and its upload to
the Hub as a `datasets` dataset (`build_dataset_defectfill.py --push_to_hub --hub_dataset_id you/name`).

The folder goes up as it is: `metadata.jsonl` with ``file_name`` and ``mask_file_name`` (``load_dataset`` reads
both as images), images/, masks/, defect_masks/, semantic/, synthesis.json, build_summary.json and preview.png; the
card's YAML names the files the dataset viewer loads. The token is passed to the upload alone: no file and no
log line holds it, and a failed upload keeps the folder and says so."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from defectfill.build.context import BuildContext
from defectfill.errors import BuildError
from defectfill.fileio import write_text_atomic
from defectfill.runs.files import METADATA_FILENAME
from defectfill.runs.hub import upload_folder_to_hub

logger = logging.getLogger("defectfill")

CARD_FILENAME = "README.md"
MASK_ORIGINS = {
    "train": "the real masks of the training part of each run's few-shot split (no held-out test mask)",
    "heldout": "the real masks of the held-out part of each run's few-shot split (the test set's masks: not for "
               "training a detector that is tested on them)",
    "dir": "a folder of masks the user drew (--mask_dir)",
}


def card_metadata(context: BuildContext) -> dict:
    """The card's YAML: tags, and the config the Hub's viewer and `load_dataset(repo)` read (metadata + images)."""
    return {
        "license": "other", "task_categories": ["image-segmentation", "image-classification"],
        "tags": ["defectfill", "synthetic", "anomaly-detection", "defect-detection", "inpainting"],
        "pretty_name": f"DefectFill synthetic defects: {context.object_class}",
        "configs": [{"config_name": "default",
                     "data_files": [{"split": "train", "path": [METADATA_FILENAME, "images/*"]}]}],
    }


def runs_table(context: BuildContext) -> str:
    lines = ["| defect type | run (LoRA) | training seed | training images |", "|---|---|---|---|"]
    for run in context.runs:
        record = run.record
        seed = record.training.get("seed") if record is not None else None
        entry = (run.split or {}).get("defect_types", {}).get(run.defect_type, {})
        lines.append(f"| {run.defect_type} | `{run.lora}` | {seed if seed is not None else '?'} | {len(entry.get('train', []))} |")
    return "\n".join(lines)


def counts_table(summary: dict) -> str:
    lines = ["| label | images |", "|---|---|"]
    lines += [f"| {label} | {count} |" for label, count in summary["images_per_label"].items()]
    return "\n".join(lines)


def dataset_card(context: BuildContext, summary: dict, repo_id: str) -> str:
    """README.md of a build: what it holds (counts per label and defect type), how it was made (runs, base model,
    where the masks came from, seeds, steps), how to load it."""
    settings, masks, generation = context.settings, context.settings.masks, context.settings.generation
    origin = MASK_ORIGINS.get(masks.mask_from.value, masks.mask_from.value)
    augment = ("new masks drawn from them (flips, rotation, scale, elastic warp, a new place on the object)"
               if masks.mask_augment else "used as they are")
    body = f"""
# DefectFill synthetic defects: {context.object_class}

{summary['images']} images of `{context.object_class}` with defects painted by DefectFill (CVPR 2025, arXiv
2503.13985) LoRAs on defect-free images, each with its exact defect mask, built with
`build_dataset_defectfill.py` of defectfill.

```python
import datasets

ds = datasets.load_dataset({repo_id!r}, split="train")  # image, mask, defect_type, defect_types, ...
```

## Contents

{counts_table(summary)}

Defects per type (an image of label `combined` holds several): {summary['defects_per_type']}.
`masks/` holds the union mask of each image (white: defect), `defect_masks/` one mask per defect, `semantic/` the
defect type's index per pixel (`defect_type_index` in synthesis.json); `metadata.jsonl` has a row per image.

## How it was made

- Base model: `{context.base_model}`, sampler {context.scheduler}, {generation.num_inference_steps} steps,
  guidance {generation.guidance_scale}, {generation.num_candidates} candidate(s) per defect (the highest LPIPS inside
  the mask kept).
- Runs, one LoRA per defect type:

{runs_table(context)}

- Masks (`mask_from: {masks.mask_from.value}`): {origin}; {augment}.
- Good images: {f'--image_dir {settings.image_dir}' if settings.image_dir else f'the {settings.good_split} good images of the data folder'}
  ({context.layout or 'detected'} layout); {settings.num_images} images per defect type, defects per image
  `{masks.defects_per_image}`.
- Seed {generation.seed}: the same seed gives the same images on any number of processes.

synthesis.json records every setting and each run's few-shot split; build_summary.json the counts and timings.
"""
    return f"---\n{yaml.safe_dump(card_metadata(context), sort_keys=False)}---\n{body}"


def push_build(folder: Path, context: BuildContext, summary: dict, repo_id: str | None, token: str | None) -> str:
    """Write the dataset card into the build folder and upload the folder as a dataset repo; returns its id.
    A failed upload is a `BuildError` that says the folder is kept (the token never appears in it)."""
    write_text_atomic(folder / CARD_FILENAME, dataset_card(context, summary, repo_id or folder.name))
    try:
        pushed = upload_folder_to_hub(folder, repo_id, token, repo_type="dataset", commit_message="DefectFill synthetic dataset",
                                      ignore_patterns=["candidates/*", "*.lock"])
    except Exception as error:  # offline, bad token, no write access: the dataset is safe on disk
        message = str(error).replace(token, "***") if token else str(error)
        raise BuildError(f"the dataset is saved in {folder}, but pushing it to the Hub failed: {message}") from None
    logger.info("pushed to https://huggingface.co/datasets/%s", pushed)
    return pushed
