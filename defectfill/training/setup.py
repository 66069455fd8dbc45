"""Setting a training run up: the accelerator, the models with their LoRA adapters and optional features, the
optimizer, the state hooks that make accelerate checkpoints hold only the LoRA (in diffusers format), and the
checks that run before anything is loaded or written."""

from __future__ import annotations

from pathlib import Path

import torch

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
    models.text_encoder.to(accelerator.device, dtype=dtype)
    add_lora_adapters(models, optimization.rank, optimization.lora_alpha, optimization.train_text_encoder)
    trained = [models.unet, models.text_encoder] if optimization.train_text_encoder else [models.unet]
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
            models.text_encoder.gradient_checkpointing_enable()
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
        groups.append({"params": [p for p in models.text_encoder.parameters() if p.requires_grad], "lr": optimization.text_encoder_lr})
    if optimization.use_8bit_adam:
        optimizer_class = require_extra("bitsandbytes", "--use_8bit_adam", "requirements.txt").optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(groups, betas=(optimization.adam_beta1, optimization.adam_beta2),
                           weight_decay=optimization.adam_weight_decay, eps=optimization.adam_epsilon)


def register_state_hooks(accelerator, models: Models) -> None:
    """accelerate checkpoints store only the LoRA, in diffusers format (the save hook pops the full weights)."""
    from diffusers.training_utils import cast_training_params

    def is_unet(model):
        return isinstance(accelerator.unwrap_model(model), type(accelerator.unwrap_model(models.unet)))

    def save_hook(to_save, weights, output_dir):
        if accelerator.is_main_process:
            unet = next(accelerator.unwrap_model(m) for m in to_save if is_unet(m))
            text_encoders = [accelerator.unwrap_model(m) for m in to_save if not is_unet(m)]
            save_lora(output_dir, unet, text_encoders[0] if text_encoders else None, fold_alpha=False)
        while weights:
            weights.pop()

    def load_hook(to_load, input_dir):
        unet, text_encoder = None, None
        while to_load:
            model = to_load.pop()
            if is_unet(model):
                unet = accelerator.unwrap_model(model)
            else:
                text_encoder = accelerator.unwrap_model(model)
        load_lora_into(input_dir, unet, text_encoder)
        cast_training_params([m for m in (unet, text_encoder) if m is not None], dtype=torch.float32)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def check_flags_before_loading(settings: TrainingSettings, output_dirs: list[Path]) -> None:
    """What can be checked without loading a model or a dataset: an output folder that cannot be written, a missing
    checkpoint, a resolution the model cannot divide. Nothing is written before these pass."""
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
    check_resolution(settings.model, settings.augmentation.resolution)


def check_resolution(model: BaseModelSettings, resolution: int) -> None:
    """--resolution must divide into the VAE's latents (SD2: a multiple of 8; the tiny model: of 2): the check every
    tool makes (`defectfill.models.check_resolution`)."""
    scale = base_vae_scale_factor(model.pretrained_model_name_or_path, model.revision, model.cache_dir)
    check_model_resolution(resolution, scale)
