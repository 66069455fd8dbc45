"""Setting a training run up: the accelerator, the models with their LoRA adapters and optional features, the
optimizer, the state hooks that make accelerate checkpoints hold only the LoRA (in diffusers format), and the
checks that run before anything is loaded or written."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from defectfill.bases import detect_base_family, resolve_base_id
from defectfill.errors import TrainingError
from defectfill.fileio import check_output_folder
from defectfill.models import (
    Models,
    add_lora_adapters,
    base_vae_scale_factor,
    compile_models,
    load_models,
    precision_dtype,
    set_memory_format,
)
from defectfill.models import check_resolution as check_model_resolution
from defectfill.runs.lora import load_lora_into, save_lora
from defectfill.settings import BaseModelSettings
from defectfill.training.checkpoints import CHECKPOINT_FILES, checkpoint_step, is_complete_checkpoint
from defectfill.training.settings import OptimizationSettings, RuntimeSettings, TrainingSettings


def with_resolved_base(settings: TrainingSettings) -> TrainingSettings:
    """The settings with the base model's id as it is loaded: a withdrawn Hub id becomes the mirror that serves its
    files now (said once, `defectfill.bases.resolve_base_id`); the run record then names what was loaded."""
    name = settings.model.pretrained_model_name_or_path
    resolved = resolve_base_id(name) if name else name
    if resolved == name:
        return settings
    return replace(settings, model=replace(settings.model, pretrained_model_name_or_path=resolved))


def create_accelerator(settings: TrainingSettings, output_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    monitoring = settings.monitoring
    report_to = None if monitoring.report_to in (None, "none") else monitoring.report_to
    if report_to in ("tensorboard", "all"):
        require_extra("tensorboard", "--report_to tensorboard")
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / monitoring.logging_dir))
    return Accelerator(gradient_accumulation_steps=settings.optimization.gradient_accumulation_steps,
                       mixed_precision=settings.runtime.mixed_precision, log_with=report_to, project_config=project)


def prepare_models(accelerator, settings: TrainingSettings) -> Models:
    from diffusers.training_utils import cast_training_params

    model, optimization = settings.model, settings.optimization
    models = load_models(model.pretrained_model_name_or_path, model.revision, model.variant, model.cache_dir)
    dtype = precision_dtype(accelerator.mixed_precision)
    # Frozen weights in the compute dtype; the LoRA weights added next are cast back to fp32, so the
    # optimizer never sees fp16 parameters ("Attempting to unscale FP16 gradients").
    models.vae.to(accelerator.device, dtype=dtype)
    models.unet.to(accelerator.device, dtype=dtype)
    for encoder in models.text_encoders:
        encoder.to(accelerator.device, dtype=dtype)
    add_lora_adapters(models, optimization.rank, optimization.lora_alpha, optimization.train_text_encoder)
    trained = [models.unet, *models.text_encoders] if optimization.train_text_encoder else [models.unet]
    cast_training_params(trained, dtype=torch.float32)
    enable_optional_features(models, settings.runtime, optimization.train_text_encoder)
    return models


def enable_optional_features(models: Models, runtime: RuntimeSettings, train_text_encoder: bool) -> None:
    set_memory_format(models, runtime.channels_last)
    if runtime.torch_compile:
        compile_models(models)
    if runtime.enable_xformers_memory_efficient_attention:
        require_extra("xformers", "--enable_xformers_memory_efficient_attention")
        if not torch.cuda.is_available():
            raise TrainingError("--enable_xformers_memory_efficient_attention needs a CUDA GPU; xformers has no CPU kernels")
        models.unet.enable_xformers_memory_efficient_attention()
    if runtime.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if train_text_encoder:
            for encoder in models.text_encoders:
                encoder.gradient_checkpointing_enable()
    if runtime.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True


def require_extra(module: str, flag: str, requirements: str = "requirements-gpu.txt"):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise TrainingError(f"{flag} needs the {module} package: pip install -r {requirements} ({error})") from error


def build_optimizer(models: Models, optimization: OptimizationSettings):
    unet_params = [p for p in models.unet.parameters() if p.requires_grad]
    groups = [{"params": unet_params, "lr": optimization.learning_rate}]
    if optimization.train_text_encoder:
        # One group for the text-encoder LoRA (SDXL: both encoders'), at the text-encoder learning rate.
        params = [p for encoder in models.text_encoders for p in encoder.parameters() if p.requires_grad]
        groups.append({"params": params, "lr": optimization.text_encoder_lr})
    if optimization.use_8bit_adam:
        optimizer_class = require_extra("bitsandbytes", "--use_8bit_adam", "requirements.txt").optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(groups, betas=(optimization.adam_beta1, optimization.adam_beta2),
                           weight_decay=optimization.adam_weight_decay, eps=optimization.adam_epsilon)


def prepare_for_training(accelerator, models: Models, defectfill_step, train_text_encoder: bool, optimizer, dataloader,
                         lr_scheduler):
    """`accelerator.prepare` the trained models (UNet, and with `train_text_encoder` every text encoder), the optimizer,
    data and schedule; the models (and the step, which calls them) get the prepared (possibly DDP-wrapped) modules.
    Returns (optimizer, dataloader, lr_scheduler)."""
    if train_text_encoder:
        prepared = accelerator.prepare(models.unet, *models.text_encoders, optimizer, dataloader, lr_scheduler)
        models.unet, models.text_encoder = prepared[0], prepared[1]
        if models.text_encoder_2 is not None:
            models.text_encoder_2 = prepared[2]
    else:
        prepared = accelerator.prepare(models.unet, optimizer, dataloader, lr_scheduler)
        models.unet = prepared[0]
    defectfill_step.unet, defectfill_step.text_encoder = models.unet, models.text_encoder
    defectfill_step.text_encoder_2 = models.text_encoder_2
    return prepared[-3:]


def register_state_hooks(accelerator, models: Models) -> None:
    """accelerate checkpoints store only the LoRA, in diffusers format (the save hook pops the full weights): the
    UNet's and each trained text encoder's (SDXL: `text_encoder_2.` too)."""
    from diffusers.training_utils import cast_training_params

    def role(model) -> str:
        unwrapped = accelerator.unwrap_model(model)
        if isinstance(unwrapped, type(accelerator.unwrap_model(models.unet))):
            return "unet"
        if models.text_encoder_2 is not None and unwrapped is accelerator.unwrap_model(models.text_encoder_2):
            return "text_encoder_2"
        return "text_encoder"

    def by_role(model_list) -> dict:
        return {role(m): accelerator.unwrap_model(m) for m in model_list}

    def save_hook(to_save, weights, output_dir):
        if accelerator.is_main_process:
            found = by_role(to_save)
            extra = {"text_encoder_2": found["text_encoder_2"]} if "text_encoder_2" in found else {}
            save_lora(output_dir, found["unet"], found.get("text_encoder"), fold_alpha=False, **extra)
        while weights:
            weights.pop()

    def load_hook(to_load, input_dir):
        found = by_role(to_load)
        to_load.clear()
        load_lora_into(input_dir, found.get("unet"), found.get("text_encoder"), found.get("text_encoder_2"))
        cast_training_params(list(found.values()), dtype=torch.float32)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def check_flags_before_loading(settings: TrainingSettings, output_dirs: list[Path]) -> None:
    """What can be checked without loading a model's weights or a dataset: an output folder that cannot be written, a
    missing checkpoint, a base of a family DefectFill does not support, a resolution the model cannot divide. Nothing is
    written before these pass."""
    for output_dir in output_dirs:
        check_output_folder(output_dir, "--output_dir")
    resume = settings.monitoring.resume_from_checkpoint
    if resume and resume != "latest":
        path = Path(resume)
        if not path.is_dir() or checkpoint_step(path) is None:
            raise TrainingError(f"--resume_from_checkpoint {path} is not a checkpoint folder (checkpoint-N)")
        if not is_complete_checkpoint(path):
            raise TrainingError(f"--resume_from_checkpoint {path} is incomplete (it lacks "
                                f"{', '.join(n for n in CHECKPOINT_FILES if not (path / n).is_file())})")
    model = settings.model
    # The base's family from its model_index.json: an unsupported base stops here, before anything is written.
    detect_base_family(model.pretrained_model_name_or_path, model.revision, model.cache_dir)
    check_resolution(model, settings.augmentation.resolution)


def check_resolution(model: BaseModelSettings, resolution: int) -> None:
    """--resolution must divide into the VAE's latents (SD2: a multiple of 8; the tiny model: of 2): the check every
    tool makes (`defectfill.models.check_resolution`)."""
    scale = base_vae_scale_factor(model.pretrained_model_name_or_path, model.revision, model.cache_dir)
    check_model_resolution(resolution, scale)
