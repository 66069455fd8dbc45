"""The app's handlers: plain functions the page calls (and the tests call without a browser). They share an
`AppState` (the loaded pipeline, the LPIPS scorer); bad input raises a `DefectFillError` worded as the CLI's,
which the page shows."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from defectfill.app.datasets import WRITE_LOCK, check_quota, png_bytes, stored_copy
from defectfill.app.editor import as_pil, editor_value, mask_from_editor
from defectfill.app.limits import PublicLimits
from defectfill.app.runs import AppPaths, RunInfo
from defectfill.app.selection import offline_without_backbone
from defectfill.app.settings import AppSettings
from defectfill.data.mask_files import open_mask
from defectfill.errors import SynthesisError
from defectfill.images import read_rgb, to_8bit
from defectfill.models import default_device, precision_dtype
from defectfill.painting import Scorer, SynthesisResult, SynthesisSettings, mask_at_image_size, prepare_job
from defectfill.pipelines import load_pipeline
from defectfill.runs.folder import SynthesisFolder, read_metadata
from defectfill.runs.metadata import output_metadata_row
from defectfill.runs.records import SynthesisRecord
from defectfill.scoring import LpipsModel
from defectfill.vstar_map import attention_in_mask, attention_overlay, synthesize_with_attention

logger = logging.getLogger("defectfill")

# What one 'add to dataset' writes besides its PNG files (its metadata row, synthesis.json), counted against the caps.
METADATA_ALLOWANCE = 4096


def inference_dtype(name: str, device: str):
    """`--mixed_precision` as a torch dtype: auto is bf16 (fp16 where bf16 is unsupported) on CUDA, fp32 elsewhere."""
    import torch

    if name == "auto":
        if not device.startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return precision_dtype(name)


class AppState:
    """What the handlers share: the loaded pipeline (one at a time, reloaded when the run changes), the
    LPIPS scorer (None: selection off, `selection_note` says why), the device and dtype."""

    def __init__(self, settings: AppSettings, scorer: Scorer | None, selection_note: str, paths: AppPaths):
        self.settings, self.paths = settings, paths
        self.device = default_device(settings.device)
        self.dtype = inference_dtype(settings.mixed_precision, self.device)
        self.scorer = scorer
        self.selection_note = selection_note
        self._pipeline_key: tuple | None = None
        self._pipeline = None

    @classmethod
    def from_settings(cls, settings: AppSettings, paths: AppPaths) -> "AppState":
        """Loads LPIPS for Low-Fidelity Selection; offline (HF_HUB_OFFLINE) it is loaded from the local torch hub cache
        only; without its backbone weights, selection is off."""
        device = default_device(settings.device)
        missing = offline_without_backbone(settings.lpips_net)
        try:
            if missing:
                raise SynthesisError(missing)
            scorer = LpipsModel(settings.lpips_net, device).masked_scores
            note = (f"Low-Fidelity Selection is on: the candidate with the highest LPIPS ({settings.lpips_net}) inside the "
                    "mask is kept.")
        except SynthesisError as error:
            scorer = None
            note = f"**Low-Fidelity Selection is off**: {error}. Each Generate makes 1 candidate."
        return cls(settings, scorer, note, paths)

    def pipeline(self, run: RunInfo, progress: Callable | None = None):
        key = (run.base_model, run.lora, run.record.base_model if run.record else None)
        if key != self._pipeline_key:
            self._pipeline, self._pipeline_key = None, None  # free the previous one first
            if progress:
                progress(0, desc=f"loading {run.base_model} with the LoRA of {run.lora}")
            self._pipeline = load_pipeline(run.base_model, lora=run.lora, trained_on=key[2], dtype=self.dtype,
                                                     device=self.device)
            self._pipeline_key = key
        return self._pipeline


@dataclass
class Source:
    """The clean image being painted on: a file of the run's data (path) or an upload (path None)."""

    image: Image.Image
    path: str | None = None


def pick_good_image(path: str | None) -> tuple[Source, dict]:
    if not path:
        raise SynthesisError("no good image: pick one of the run's good images or upload one")
    source = Source(read_rgb(path, "good image"), str(path))
    return source, editor_value(source.image)


def upload_good_image(image) -> tuple[Source, dict]:
    """An uploaded good image: a file (the page's upload) is decoded as the command lines decode a good image
    (`images.read_rgb`: a 16-bit PNG is scaled, a broken file refused with a message); a PIL image or an array
    is scaled the same way."""
    if image is None:
        raise SynthesisError("no good image: pick one of the run's good images or upload one")
    if isinstance(image, (str, os.PathLike)):
        rgb = read_rgb(image, "the uploaded image")
    else:
        rgb = to_8bit(as_pil(image)).convert("RGB")
    source = Source(rgb)
    return source, editor_value(source.image)


def pick_heldout_mask(source: Source | None, mask_path: str | None) -> dict:
    """The editor with a held-out mask as its layer (still editable with the brush)."""
    if source is None:
        raise SynthesisError("no good image: pick one of the run's good images or upload one")
    if not mask_path:
        return editor_value(source.image)
    mask = open_mask(mask_path)  # a dataset's mask: a file or a folder of several, any non-zero pixel a defect
    return editor_value(source.image, mask_at_image_size(mask, source.image.size, f"mask {mask_path}"))


@dataclass
class Generated:
    """One Generate: what the gallery, the views, the downloads and 'add to dataset' need."""

    result: SynthesisResult
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
        chosen = (f"candidate {r.chosen} chosen (highest LPIPS inside the mask, {r.final_score:.3f})" if self.selection
                  else "Low-Fidelity Selection off: 1 candidate")
        chosen += f"; {r.unet_passes:.0f} UNet passes"
        return (f"{len(r.candidates)} candidate(s) at {s.resolution} px, {s.num_inference_steps} steps, guidance "
                f"{s.guidance_scale}, seed {s.seed}, {'crop ' + str(r.job.box) if s.crop_to_mask else 'whole image'}: "
                f"{chosen}. Outside the mask the result is the clean image pixel for pixel. "
                f"{100 * self.attention_share:.0f}% of the [V*] attention falls inside the mask.")


def generate(state: AppState, run: RunInfo, source: Source | None, editor: dict | None, heldout_mask: str | None,
             num_candidates: int, num_inference_steps: int, guidance_scale: float, seed: int, crop_to_mask: bool,
             progress: Callable | None = None) -> Generated:
    """Prepare the job (the painted mask), load the pipeline, generate and select (`painting`), and
    record what the [V*] token looked at. Bad input raises `SynthesisError` in the CLI's words."""
    if source is None:
        raise SynthesisError("no good image: pick one of the run's good images or upload one")
    selection = state.scorer is not None and int(num_candidates) > 1
    settings = dataclasses.replace(  # the run's prompt, resolution and crop context, with the page's choices
        run.plan.settings, num_candidates=int(num_candidates) if state.scorer else 1,
        num_inference_steps=int(num_inference_steps), guidance_scale=float(guidance_scale), seed=int(seed),
        crop_to_mask=bool(crop_to_mask),
    )
    mask = mask_from_editor(editor, source.image.size)
    job = prepare_job(source.image, mask, 0, settings, mask_name="the painted mask")
    pipeline = state.pipeline(run, progress)

    def on_step(done: int, total: int) -> None:
        if progress:
            progress((done, total), desc=f"denoising {settings.num_candidates} candidate(s)", unit="steps")

    scorer = state.scorer if selection else None  # one candidate: nothing to select
    [result], [attention] = synthesize_with_attention(pipeline, [job], settings, run.token, scorer, on_step)
    return Generated(result, settings, run, source, heldout_mask, attention,
                     attention_in_mask(attention, job.region_mask), attention_overlay(result, attention),
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


def add_to_dataset(generated: Generated | None, output_dir: str | os.PathLike | None) -> tuple[Path, dict]:
    """Append the result to a synthesis folder in `infer_defectfill.py`'s layout (images/, masks/,
    metadata.jsonl with the same row fields, synthesis.json when the folder has none, preview.png), at the
    folder's next free number (`SynthesisFolder.append`). An uploaded image is saved under sources/, and a mask
    that is not one of the run's files is its own source, so the row's source paths exist."""
    if generated is None:
        raise SynthesisError("nothing to add yet: Generate first")
    output_dir = str(output_dir or "").strip()
    if not output_dir:
        raise SynthesisError("no output folder given for 'add to dataset'")
    folder = SynthesisFolder(output_dir)
    result, run = generated.result, generated.run
    source_mask = generated.heldout_mask
    if source_mask is not None:
        if not np.array_equal(mask_at_image_size(open_mask(source_mask), result.image.size), result.job.mask):
            source_mask = None  # painted over: the label mask itself is the source
    row = output_metadata_row(result, generated.source.path or "", source_mask or "", generated.settings, run.object_class,
                              run.defect_type)
    saved, rows = folder.append(result.image, result.job.mask, row,
                                source=generated.source.image if generated.source.path is None else None,
                                mask_is_source=source_mask is None)
    if SynthesisRecord.read(folder.path) is None:
        s = generated.settings
        plan = dataclasses.replace(run.plan, settings=s, scale_source="the app's settings")
        folder.write_record(plan.synthesis_record())
    try:
        folder.save_preview(rows)
    except OSError as error:  # a row of another writer names a source that is gone: the data is still complete
        logger.warning("preview.png not updated: %s", error)
    return folder.path, saved


def add_to_public_dataset(generated: Generated | None, folder: Path, root: Path, limits: PublicLimits) -> tuple[Path, dict, bool]:
    """'Add to dataset' on a public server: into the session's `folder` under the dataset `root`, within the caps
    of `limits` (images and bytes, per session and in total); a result whose image and mask the folder already
    holds is not stored again. Returns (folder, its row, whether it was added now)."""
    if generated is None:
        raise SynthesisError("nothing to add yet: Generate first")
    result = generated.result
    image, mask = png_bytes(result.image), png_bytes(result.job.mask)
    with WRITE_LOCK:
        repeat = stored_copy(folder, image, mask) if folder.is_dir() else None
        if repeat is not None:
            return folder, read_metadata(folder)[repeat], False
        source = png_bytes(generated.source.image) if generated.source.path is None else b""
        check_quota(root, folder, len(image) + len(mask) + len(source) + METADATA_ALLOWANCE, limits)
        path, row = add_to_dataset(generated, folder)
    return path, row, True
