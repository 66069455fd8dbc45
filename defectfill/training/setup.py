"""Setting a training run up: the accelerator, the models with their LoRA adapters and optional features, the
optimizer, the state hooks that make accelerate checkpoints hold only the LoRA (in diffusers format), and the
checks that run before anything is loaded or written."""

from __future__ import annotations

from pathlib import Path

import torch

from defectfill.errors import TrainingError
from defectfill.masks import vae_scale_factor
from defectfill.models import Models, add_lora_adapters, compile_models, load_models, precision_dtype, set_memory_format
from defectfill.runs.lora import load_lora_into, save_lora
from defectfill.training.checkpoints import CHECKPOINT_FILES, checkpoint_step, is_complete_checkpoint


def create_accelerator(args, output_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    report_to = None if args.report_to in (None, "none") else args.report_to
    if report_to in ("tensorboard", "all"):
        require_extra("tensorboard", "--report_to tensorboard")
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir))
    return Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
                       log_with=report_to, project_config=project)


def prepare_models(accelerator, args) -> Models:
    from diffusers.training_utils import cast_training_params

    models = load_models(args.pretrained_model_name_or_path, args.revision, args.variant, args.cache_dir)
    dtype = precision_dtype(accelerator.mixed_precision)
    # Frozen weights in the compute dtype; the LoRA weights added next are cast back to fp32, so the
    # optimizer never sees fp16 parameters ("Attempting to unscale FP16 gradients").
    models.vae.to(accelerator.device, dtype=dtype)
    models.unet.to(accelerator.device, dtype=dtype)
    models.text_encoder.to(accelerator.device, dtype=dtype)
    add_lora_adapters(models, args.rank, args.lora_alpha, args.train_text_encoder)
    cast_training_params([models.unet, models.text_encoder] if args.train_text_encoder else [models.unet], dtype=torch.float32)
    enable_optional_features(models, args)
    return models


def enable_optional_features(models: Models, args) -> None:
    set_memory_format(models, args.channels_last)
    if args.torch_compile:
        compile_models(models)
    if args.enable_xformers_memory_efficient_attention:
        require_extra("xformers", "--enable_xformers_memory_efficient_attention")
        if not torch.cuda.is_available():
            raise TrainingError("--enable_xformers_memory_efficient_attention needs a CUDA GPU; xformers has no CPU kernels")
        models.unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            models.text_encoder.gradient_checkpointing_enable()
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True


def require_extra(module: str, flag: str, requirements: str = "requirements-gpu.txt"):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise TrainingError(f"{flag} needs the {module} package: pip install -r {requirements} ({error})") from error


def build_optimizer(models: Models, args):
    unet_params = [p for p in models.unet.parameters() if p.requires_grad]
    groups = [{"params": unet_params, "lr": args.learning_rate}]
    if args.train_text_encoder:
        groups.append({"params": [p for p in models.text_encoder.parameters() if p.requires_grad], "lr": args.text_encoder_lr})
    if args.use_8bit_adam:
        optimizer_class = require_extra("bitsandbytes", "--use_8bit_adam", "requirements.txt").optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(groups, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


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


def check_flags_before_loading(args, output_dirs: list[Path]) -> None:
    """What can be checked without loading a model or a dataset: a bad output folder, a missing checkpoint,
    a resolution the model cannot divide. Nothing is written before these pass."""
    for output_dir in output_dirs:
        for folder in (output_dir, *output_dir.parents):
            if folder.exists() and not folder.is_dir():
                raise TrainingError(f"--output_dir {args.output_dir}: {folder} exists and is not a folder")
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        path = Path(args.resume_from_checkpoint)
        if not path.is_dir() or checkpoint_step(path) is None:
            raise TrainingError(f"--resume_from_checkpoint {path} is not a checkpoint folder (checkpoint-N)")
        if not is_complete_checkpoint(path):
            raise TrainingError(f"--resume_from_checkpoint {path} is incomplete (it lacks "
                                f"{', '.join(n for n in CHECKPOINT_FILES if not (path / n).is_file())})")
    check_resolution(args)


def check_resolution(args) -> None:
    """--resolution must divide into the VAE's latents (SD2: a multiple of 8; the tiny model: of 2)."""
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.load_config(args.pretrained_model_name_or_path, subfolder="vae", revision=args.revision,
                                        cache_dir=args.cache_dir)
    except Exception as error:  # OSError, EnvironmentError, HFValidationError: a path or id that cannot be read
        raise TrainingError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: cannot read the "
                            f"model's VAE config ({error})") from error
    scale = vae_scale_factor(vae)
    if args.resolution % scale:
        raise TrainingError(f"--resolution {args.resolution} is not a multiple of {scale}, the VAE's scale factor: try "
                            f"{max(scale, round(args.resolution / scale) * scale)}")
