"""The metadata row of one synthesized output (a line of a synthesis folder's metadata.jsonl), as
`infer_defectfill.py` and the app's "add to dataset" write it; `defectfill.runs.folder.SynthesisFolder.save_result`
adds the file names."""

from __future__ import annotations

from defectfill.painting import SynthesisResult, SynthesisSettings


def output_metadata_row(result: SynthesisResult, source_image: str, source_mask: str, settings: SynthesisSettings,
                        object_class: str | None, defect_type: str | None) -> dict:
    """The row's fields: the sources, the seed, the kept candidate with its LPIPS inside the mask and every
    candidate's, the UNet passes, the prompt, class and defect type, and the region generated (`crop_box`)."""
    return {
        "source_image": str(source_image), "source_mask": str(source_mask), "seed": settings.seed,
        "candidate": result.chosen, "lpips": result.final_score, "candidate_scores": list(result.scores),
        "unet_passes": result.unet_passes,
        "prompt": settings.prompt, "object_class": object_class, "defect_type": defect_type, "crop_box": list(result.job.box),
    }
