"""The inpainting pipeline synthesis paints with: the pipeline class of the base's family (`StableDiffusionInpaintPipeline`
for SD 1.x/2.x inpainting, `StableDiffusionXLInpaintPipeline` for SDXL inpainting, told apart by the base's
`model_index.json` before any weight loads: `defectfill.bases`), loaded as users load it, with a run's LoRA
(`load_pipeline`) or several runs' LoRAs as named adapters (`load_named_adapters`, `use_adapter`: the dataset
builder), a LoRA checked against the base model it was trained on, and the sampler `--scheduler` names (any
diffusers scheduler class, made from the base model's scheduler config). A withdrawn Hub id (the SD2 of
`stabilityai`) is replaced by its mirror first (`bases.resolve_base_id`, said once)."""

from __future__ import annotations

import logging
import warnings

import torch

from defectfill.bases import BaseFamily, detect_base_family, mirror_of, pipeline_class_of, resolve_base_id, same_base
from defectfill.errors import InpaintingModelError, SynthesisError
from defectfill.models import check_inpainting_unet, default_device

logger = logging.getLogger("defectfill")


def base_family(base_model: str, revision: str | None = None) -> BaseFamily:
    """The base's family (`detect_base_family`: a withdrawn id replaced by its mirror), before any weight loads; a base
    DefectFill does not support is a `SynthesisError` naming what it supports."""
    try:
        return detect_base_family(resolve_base_id(base_model), revision)
    except InpaintingModelError as error:
        raise SynthesisError(str(error)) from error


def is_sdxl_pipeline(pipeline) -> bool:
    """Whether a loaded pipeline is of the SDXL family (two text encoders)."""
    return getattr(pipeline, "text_encoder_2", None) is not None


def check_lora_fits(pipeline, lora: str, trained_on: str | None, base: str) -> None:
    """Name the mismatch when a LoRA was trained on another architecture or family (load_lora_weights' own error
    is a bare shape mismatch). `trained_on` is the run's recorded base (a withdrawn id counts as its mirror)."""
    state_dict, _ = type(pipeline).lora_state_dict(lora)
    use = mirror_of(trained_on) or trained_on or "another model"
    if any(key.startswith("text_encoder_2.") for key in state_dict) and not is_sdxl_pipeline(pipeline):
        raise SynthesisError(f"the LoRA in {lora} is an SDXL LoRA (it has text_encoder_2 layers), trained on {use}; {base} is "
                             f"a {type(pipeline).__name__}. Use --pretrained_model_name_or_path {use}")
    if trained_on and not same_base(trained_on, base):
        logger.info("the LoRA in %s was trained on %s; painting with %s", lora, trained_on, base)
    modules = dict(pipeline.unet.named_modules())
    for key, tensor in state_dict.items():
        if not key.startswith("unet.") or "lora_A" not in key and "lora.down" not in key:
            continue
        name = key[len("unet."):].split(".lora")[0]
        module = modules.get(name)
        expected = getattr(module, "in_features", None)
        if module is None or expected != tensor.shape[1]:
            found = "no such layer" if module is None else f"in_features {expected}"
            raise SynthesisError(
                f"the LoRA in {lora} was trained on {trained_on or use}, not on {base}: its layer {name} "
                f"expects input size {tensor.shape[1]}, the base model has {found}. Use --pretrained_model_name_or_path {use}"
            )


def scheduler_class(name: str):
    """The diffusers scheduler class `--scheduler` names."""
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not isinstance(cls, type) or not hasattr(cls, "from_config") or not name.endswith("Scheduler"):
        raise SynthesisError(f"--scheduler {name} is not a diffusers scheduler class (e.g. DPMSolverMultistepScheduler, "
                             "UniPCMultistepScheduler)")
    return cls


def check_scheduler(name: str | None, base_model: str, revision: str | None = None) -> str:
    """Before any model loads: the sampler's class name, the one `--scheduler` names (an error when it is no diffusers
    scheduler class) or else the base model's (read from its scheduler config alone; "the base model's" when that
    cannot be read: the pipeline load will say more). A base DefectFill does not support is an error here too
    (`base_family`), before anything loads."""
    base_model = base_family(base_model, revision).name
    if name is not None:
        return scheduler_class(name).__name__
    from diffusers import DDPMScheduler

    try:  # any scheduler class reads scheduler_config.json
        return DDPMScheduler.load_config(base_model, subfolder="scheduler", revision=revision)["_class_name"]
    except Exception:  # a path or Hub id without a scheduler config
        return "the base model's"


def scheduler_calls(pipeline, num_inference_steps: int) -> int:
    """How many UNet calls the pipeline's scheduler makes for `num_inference_steps` (PNDM makes one more); a
    candidate's UNet passes (a guided pair counted once)."""
    pipeline.scheduler.set_timesteps(num_inference_steps, device=pipeline.device)
    return len(pipeline.scheduler.timesteps)


def load_pipeline(base_model: str, lora: str | None = None, trained_on: str | None = None, revision: str | None = None,
                  variant: str | None = None, dtype: torch.dtype = torch.float32, device: str | None = None,
                  scheduler: str | None = None):
    """The base inpainting pipeline of the base's family (`base_family`: a withdrawn id loads its mirror; an unsupported
    base is an error before any weight loads) with the LoRA loaded (`load_lora_weights`, as users load it), and the
    scheduler `scheduler` names (a diffusers scheduler class, made from the base model's scheduler config) in place of
    its own."""
    family = base_family(base_model, revision)
    base_model = family.name
    pipeline = pipeline_class_of(family).from_pretrained(
        base_model, revision=revision, variant=variant, torch_dtype=dtype, **pipeline_options(family))
    try:
        check_inpainting_unet(pipeline.unet, base_model)
    except InpaintingModelError as error:
        raise SynthesisError(str(error)) from error
    if scheduler:
        pipeline.scheduler = scheduler_class(scheduler).from_config(pipeline.scheduler.config)
    if lora is not None:
        check_lora_fits(pipeline, lora, trained_on, base_model)
        pipeline.load_lora_weights(lora)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(default_device(device))


def pipeline_options(family: BaseFamily) -> dict:
    """`from_pretrained` options of the family's pipeline: no safety checker for SD (synthesis paints defects, which
    it would black out); no invisible watermark for SDXL (it would perturb the pixels Low-Fidelity Selection scores)."""
    if family.is_sdxl:
        return dict(add_watermarker=False)
    return dict(safety_checker=None, requires_safety_checker=False)


def load_named_adapters(pipeline, loras: dict[str, str], trained_on: str | None = None, base: str = "the base model") -> None:
    """Load each LoRA once as a named adapter (`load_lora_weights(path, adapter_name=name)`); `use_adapter`
    switches between them without reloading anything."""
    for name, lora in loras.items():
        check_lora_fits(pipeline, lora, trained_on, base)
        with warnings.catch_warnings():  # peft warns at the second adapter of a model: several are the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            pipeline.load_lora_weights(lora, adapter_name=name)


def use_adapter(pipeline, name: str) -> None:
    """Make the named adapter the only active one (UNet and text encoder)."""
    pipeline.set_adapters([name])
