"""How a run is used for synthesis, in one place: its record, with what a command line overrides, becomes the
synthesis settings (prompt, resolution, the scale the LoRA learned its defect at) and what synthesis needs
around them (base model, token, class, defect type, data folder, split). The base model is resolved here, once: a
run recorded on a withdrawn Hub id (`stabilityai/stable-diffusion-2-inpainting`) paints with its mirror
(`defectfill.bases.resolve_base_id`), and the synthesis record names what was loaded.

Every tool that paints with a run resolves it here: `infer_defectfill.py`, the dataset builder, the app,
training's validation and the tiny model's measurements. A run that records no training scale (trained
elsewhere, or before the scale was recorded) is applied to the whole image resized, as the paper trains.
"""

from __future__ import annotations

from dataclasses import dataclass

from defectfill import method
from defectfill.bases import resolve_base_id
from defectfill.errors import SynthesisError
from defectfill.masks import DEFAULT_CROP_CONTEXT
from defectfill.painting import SynthesisSettings
from defectfill.runs.records import RunRecord, SynthesisRecord

DEFAULT_RESOLUTION = 512


@dataclass(frozen=True)
class RunOverrides:
    """What a command line may change of a run's record; None keeps the run's value. The names are the flags'."""

    pretrained_model_name_or_path: str | None = None
    token: str | None = None
    object_class: str | None = None
    defect_type: str | None = None
    prompt: str | None = None
    resolution: int | None = None
    crop_to_mask: bool | None = None
    crop_context: float | None = None
    data_dir: str | None = None


def training_scale(record: RunRecord | None) -> tuple[bool, float, str]:
    """(crop_to_mask, crop_context, where they came from): a defect is generated at the scale its LoRA learned
    it, in a crop around the mask when training cropped around defects (probability > 0), else on the whole
    image resized."""
    if record is not None and record.defect_crop_probability is not None:
        return record.defect_crop_probability > 0, record.crop_context or DEFAULT_CROP_CONTEXT, "the run's training scale"
    return False, DEFAULT_CROP_CONTEXT, "default (the run records no training scale: whole image, as the paper trains)"


@dataclass(frozen=True)
class RunPlan:
    """A run resolved for synthesis: the LoRA, its record (None for a LoRA trained elsewhere), what synthesis
    uses and where each setting came from (`scale_source`)."""

    lora: str | None
    record: RunRecord | None
    base_model: str
    token: str
    object_class: str | None
    defect_type: str | None
    data_dir: str | None
    split: dict | None
    settings: SynthesisSettings
    scale_source: str

    def synthesis_record(self, **fields_) -> SynthesisRecord:
        """The `SynthesisRecord` (synthesis.json) of a folder painted with this plan; `fields_` add to or replace
        its fields (e.g. `scale_source`)."""
        s = self.settings
        values = dict(
            pretrained_model_name_or_path=self.base_model, prompt=s.prompt, resolution=s.resolution, lora=self.lora,
            token=self.token, object_class=self.object_class, defect_type=self.defect_type, num_candidates=s.num_candidates,
            num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale, seed=s.seed, composite=s.composite,
            crop_to_mask=s.crop_to_mask, crop_context=s.crop_context, data_dir=self.data_dir, split=self.split,
            scale_source=self.scale_source,
        )
        return SynthesisRecord(**{**values, **fields_})


def plan_run(lora: str | None, record: RunRecord | None, overrides: RunOverrides | None = None, **sampling) -> RunPlan:
    """The run `lora` (its folder or Hub id; None when only the record matters) with its record (None for a LoRA
    trained elsewhere) and the flags' `overrides`; `sampling` are the remaining `SynthesisSettings` fields
    (candidates, steps, guidance, seed, composite). Flags win over the record."""
    overrides = overrides or RunOverrides()

    def pick(flag, name):
        return flag if flag is not None else (getattr(record, name) if record is not None else None)

    base = pick(overrides.pretrained_model_name_or_path, "base_model")
    if base is None:
        raise SynthesisError("--pretrained_model_name_or_path is needed: the run has no defectfill_run.json naming its base model")
    base = resolve_base_id(base)  # a run recorded on a withdrawn Hub id paints with its mirror (said once)
    token = pick(overrides.token, "token") or method.DEFAULT_TOKEN
    object_class = pick(overrides.object_class, "object_class")
    prompt = overrides.prompt
    if prompt is None:
        if object_class is None:
            raise SynthesisError("--object_class (or --prompt) is needed: the run has no defectfill_run.json naming its object class")
        prompt = method.object_prompt(object_class, token)
    crop, context, source = training_scale(record)
    if overrides.crop_to_mask is not None or overrides.crop_context is not None:
        source = "flags"
    settings = SynthesisSettings(
        prompt=prompt, resolution=pick(overrides.resolution, "resolution") or DEFAULT_RESOLUTION,
        crop_to_mask=crop if overrides.crop_to_mask is None else overrides.crop_to_mask,
        crop_context=context if overrides.crop_context is None else overrides.crop_context, **sampling,
    )
    data_dir = pick(overrides.data_dir, "data_dir")
    return RunPlan(lora, record, base, token, object_class, pick(overrides.defect_type, "defect_type"),
                   str(data_dir) if data_dir else None, record.split if record is not None else None, settings, source)
